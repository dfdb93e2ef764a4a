"""FSDP2 (`--parallel fsdp`): the networks sharded over the ranks with
torch.distributed.fsdp.fully_shard, and their checkpoints through torch.distributed.checkpoint.

DDP (the default, fastsp.training.assembly.wrap_ddp) keeps a whole replica of the weights,
gradients, Adam moments, EMA and frozen perceptual network on every GPU; FSDP2 keeps 1/N of each
and all-gathers one block's weights just before it runs (PyTorch's FSDP2 recipe: fully_shard per
block, then the root). The frozen perceptual network is sharded the same way (under LoRA there is
none: the perceptual pass is the online model with its adapters off), and so is the EMA, whose
update then runs on the local shards (fastsp.step.local). On CUDA the blocks compute in bf16
with fp32 master weights and fp32 gradient reduction (MixedPrecisionPolicy). The step is not
captured as a CUDA graph (fastsp.training.graph_plan.plan_graph says why).

A diffusers module (--model diffusers) is sharded per block of its family (`units`). Its
perceptual pass stops the forward after the deepest tap by an exception
(fastsp.perceptual.FeatureExtractor), so FSDP2's root post-forward, which frees the last
all-gather buffer, does not run for the frozen network: the block gathered last (the tap's, or
the last one before it) stays allocated until that network's next all-gather replaces it, one
block's weights more per GPU (the dry run counts them; docs/lora_fsdp_memory.md).

A checkpoint of a sharded run is the same folder with `dcp/` (torch.distributed.checkpoint:
every rank writes its shards, rank 0 the metadata) in place of model.safetensors, ema.safetensors
and optimizer.pt (fastsp.checkpoint.SHARDED_FILES). All ranks write it into a hidden temporary
folder that rank 0 then syncs and renames into place, so it is atomic as every checkpoint is; it
loads at any world size (DCP reshards), and a single process (sampling, export, --init) reads
it without a process group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from fastsp import checkpoint as checkpoint_lib
from fastsp import dist
from fastsp.dit import DiTBlock
from fastsp.errors import CheckpointError, CheckpointWriteError, ConfigError
from fastsp.families import named_by_path
from fastsp.faults import kill_point
from fastsp.step import local
from fastsp.unet import ResBlock, SpatialTransformer

# The units FSDP2 gathers one at a time: fastsp's UNet's residual and transformer blocks and the
# DiT's blocks; in a diffusers module (fastsp.families), each module of its block lists: the
# UNets' resnets and attentions of their down, mid and up blocks, the transformers'
# transformer_blocks and Flux's single_transformer_blocks. A unit's own blocks stay in it (a UNet
# attention's transformer_blocks); what is left (embeddings, down- and upsamplers, the first and
# last layers) belongs to the root.
_BLOCKS = (ResBlock, SpatialTransformer, DiTBlock)
_BLOCK_LISTS = re.compile(
    r"(.+\.)?(resnets|attentions|transformer_blocks|single_transformer_blocks)"
)


# FSDP2 warns of a unit returning a view (an in-place op on it would skip the unit's pre-backward
# all-gather); Flux's single-stream blocks return their image tokens as a view of the joint
# sequence, which diffusers' transformer_flux reads out of place only (torch.cat, norm_out):
# tests/test_fsdp.py's Flux run trains the weights one process trains.
warnings.filterwarnings(
    "ignore", r"FSDP2-wrapped module \(FSDPFluxSingleTransformerBlock\) returned a view"
)


def check_launch(parallel: str) -> None:
    """--parallel fsdp shards over the processes torchrun starts (one is allowed: a resume at
    another world size)."""
    if parallel == "fsdp" and "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "--parallel fsdp shards the model over torchrun's processes, but this process was "
            "not started by torchrun; run torchrun --nproc_per_node=N fastsp/train.py "
            "--parallel fsdp ..., or drop --parallel fsdp"
        )


def check_memory_format(channels_last: bool) -> None:
    """FSDP2 shards contiguous parameters only: fully_shard raises NotImplementedError for a
    channels_last convolution weight (torch.distributed.fsdp._fully_shard._fsdp_param)."""
    if channels_last:
        raise ConfigError(
            "--parallel fsdp cannot shard channels_last weights (torch's fully_shard takes "
            "contiguous parameters only); add --no-channels-last"
        )


def shard(network: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    """`network` sharded in place over the default process group: each block, then the root,
    on a mesh of `device`'s type (FSDP2's default mesh takes torch's accelerator instead, which
    is CUDA for a --device cpu run on a GPU machine)."""
    # The mesh's table of ranks is a real tensor, also in the dry run's fake-tensor mode.
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if bf16 and device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in units(network):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    return fully_shard(network, mesh=mesh, mp_policy=policy)


def units(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of `network` that `shard` gives a fully_shard each, outermost first
    (_BLOCKS, _BLOCK_LISTS)."""
    found: dict[str, torch.nn.Module] = {}
    for name, module in network.named_modules():
        parent, _, index = name.rpartition(".")
        inside = any(name.startswith(f"{outer}.") for outer in found)
        listed = index.isdigit() and _BLOCK_LISTS.fullmatch(parent) is not None
        if not inside and (isinstance(module, _BLOCKS) or listed):
            found[name] = module
    return list(found.values())


def _state(model, ema, optimizer) -> dict[str, Any]:
    model, ema = named_by_path(model), named_by_path(ema)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    for group in optimizer_state["param_groups"]:
        # the step's learning rate is a device tensor (fastsp.step); a number on disk, as in a
        # fresh optimizer, so that saved and loaded state dicts have one layout
        group["lr"] = float(group["lr"])
    return {"model": model_state, "ema": get_model_state_dict(ema), "optimizer": optimizer_state}


def save_checkpoint(
    run_dir: Path, step: int, model, ema, optimizer, state: dict, config_text: str
) -> Path | None:
    """Every rank: the sharded checkpoint of step `step`, written atomically; its folder on
    rank 0 (None elsewhere)."""
    main = torch_dist.get_rank() == 0
    root = Path(run_dir) / checkpoint_lib.CHECKPOINTS_DIR
    final = root / checkpoint_lib.step_dir_name(step)
    tmp = root / f".tmp-{final.name}-sharded"  # one name every rank knows
    error = None
    if main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftover
            (tmp / "dcp").mkdir(parents=True)
        except OSError as failure:
            error = failure
    if dist.any_rank(error is not None):
        raise CheckpointWriteError(f"cannot create {tmp} ({error}); check the disk and resume")
    try:
        dcp.save(_state(model, ema, optimizer), checkpoint_id=tmp / "dcp")
        kill_point(f"checkpoint:{step}:dcp")
        if main:
            torch.save({"cpu": torch.get_rng_state()}, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
            (tmp / "config.json").write_text(config_text)
            checkpoint_lib.sync_and_rename(tmp, final)
            kill_point(f"checkpoint:{step}:after-rename")
    except (OSError, CheckpointException) as failure:  # DCP's: a write failed on some rank
        error = failure
    finally:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.any_rank(error is not None):
        raise CheckpointWriteError(
            f"cannot save checkpoint {final.name} ({error or 'on another rank'}); the previous "
            "checkpoints are intact: free space and resume with --resume"
        )
    return final if main else None


def load_training_state(checkpoint: Path, model, ema, optimizer) -> dict[str, Any]:
    """Every rank: model, EMA and optimizer states and the RNG of a sharded checkpoint,
    resharded to this run's world size; state.json's contents."""
    state = checkpoint_lib.read_state(checkpoint)
    rng = checkpoint_lib.read_rng(Path(checkpoint) / "rng.pt")
    saved = _state(model, ema, optimizer)
    try:
        dcp.load(saved, checkpoint_id=Path(checkpoint) / "dcp")
    except CheckpointException as error:  # DCP wraps every reader failure in it
        raise CheckpointError(
            f"{checkpoint}/dcp is damaged ({checkpoint_lib.dcp_failure(error)}); delete the "
            "folder to resume from the previous checkpoint"
        ) from None
    set_state_dict(
        named_by_path(model),
        optimizer,
        model_state_dict=saved["model"],
        optim_state_dict=saved["optimizer"],
    )
    set_model_state_dict(named_by_path(ema), saved["ema"])
    torch.set_rng_state(rng["cpu"])
    return state


def nonfinite_names(model, ema) -> list[str]:
    """This rank's shards of the model and the EMA with a non-finite element, by name (the
    caller asks every rank: fastsp.dist.any_rank)."""
    tensors = {
        f"{prefix}.{name}": local(value)
        for prefix, module in (("model", model), ("ema", ema))
        for name, value in module.state_dict().items()
        if value.is_floating_point()
    }
    finite = torch.stack([torch.isfinite(v).all() for v in tensors.values()]).tolist()
    return [name for name, ok in zip(tensors, finite, strict=True) if not ok]
