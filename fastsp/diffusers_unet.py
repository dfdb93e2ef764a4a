"""diffusers' UNet2DConditionModel in and out: `load_unet`, `export_to_diffusers`, the key map.

fastsp's UNet and diffusers' compute the same function for the Stable Diffusion 1.x and 2.x
families (the config rules are `fastsp.diffusers_unet_config.unet_config_from_diffusers` and its
inverse); the state dicts differ in names and in two fused projections:

    fastsp                                  diffusers
    down.{i}.res.{j}.emb_proj               down_blocks.{i}.resnets.{j}.time_emb_proj
    ....attn.{j}.blocks.{k}.attn1.to_qkv    ....attentions.{j}.transformer_blocks.{k}.attn1.to_q,
                                              to_k, to_v   (concatenated along the output dim)
    ....blocks.{k}.attn2.to_kv              ...transformer_blocks.{k}.attn2.to_k, to_v
    ...                                     (the table _BLOCKS x _PARTS below)

proj_in / proj_out keep each family's layout (Linear for SD 2.x, 1x1 conv for SD 1.x) in both
models, so no tensor is reshaped. The weights are read straight from the safetensors files (one
file, or shards with `diffusion_pytorch_model.safetensors.index.json`), each tensor into its
place in the model's own storage (the fused ones into row slices): host memory peaks at the
model's size plus one tensor, and diffusers is not imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from fastsp import checkpoint as checkpoint_lib
from fastsp.diffusers_unet_config import (
    DIFFUSERS_UNET_CLASS,
    diffusers_config_from_unet,
    diffusers_unet_folder,
    read_diffusers_config,
    unet_config_from_diffusers,
)
from fastsp.errors import CheckpointError, CheckpointWriteError
from fastsp.model_config import UNetConfig
from fastsp.run_folder import check_out_folder
from fastsp.unet import UNet

# diffusers' published unet/config.json of stabilityai/stable-diffusion-2-1-base (its bookkeeping
# fields left out): what the `sd21` preset converts from, and the tests' and benchmarks' full-size
# model.
SD21_BASE_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    act_fn="silu",
    attention_head_dim=(5, 10, 20, 20),
    block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False,
    cross_attention_dim=1024,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    downsample_padding=1,
    dual_cross_attention=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    num_class_embeds=None,
    only_cross_attention=False,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True,
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"  # diffusers' name for a scheduler's config
INDEX_NAME = WEIGHTS_NAME + ".index.json"
# The version of diffusers' config format the export writes (read by from_pretrained).
EXPORT_DIFFUSERS_VERSION = "0.42.0"

# ---------------------------------------------------------------------------------------------
# The key map: a block of fastsp's UNet and its diffusers name ({i}, {j}: level and index)...
_BLOCKS = (
    ("leaf", "conv_in", "conv_in"),
    ("leaf", "time_embed.0", "time_embedding.linear_1"),
    ("leaf", "time_embed.2", "time_embedding.linear_2"),
    ("res", "down.{i}.res.{j}", "down_blocks.{i}.resnets.{j}"),
    ("attn", "down.{i}.attn.{j}", "down_blocks.{i}.attentions.{j}"),
    ("leaf", "down.{i}.downsample.conv", "down_blocks.{i}.downsamplers.0.conv"),
    ("res", "mid.res1", "mid_block.resnets.0"),
    ("attn", "mid.attn", "mid_block.attentions.0"),
    ("res", "mid.res2", "mid_block.resnets.1"),
    ("res", "up.{i}.res.{j}", "up_blocks.{i}.resnets.{j}"),
    ("attn", "up.{i}.attn.{j}", "up_blocks.{i}.attentions.{j}"),
    ("leaf", "up.{i}.upsample.conv", "up_blocks.{i}.upsamplers.0.conv"),
    ("leaf", "norm_out", "conv_norm_out"),
    ("leaf", "conv_out", "conv_out"),
)
# ... and the parts of each kind of block ({k}: transformer block); a tuple of diffusers names
# is one fastsp tensor made of theirs concatenated along dim 0 (the output features).
_TB = "transformer_blocks.{k}"
_PARTS: dict[str, tuple[tuple[str, str | tuple[str, ...]], ...]] = {
    "leaf": (("", ""),),
    "res": (
        ("norm1", "norm1"),
        ("conv1", "conv1"),
        ("emb_proj", "time_emb_proj"),
        ("norm2", "norm2"),
        ("conv2", "conv2"),
        ("skip", "conv_shortcut"),
    ),
    "attn": (
        ("norm", "norm"),
        ("proj_in", "proj_in"),
        ("blocks.{k}.norm1", f"{_TB}.norm1"),
        (
            "blocks.{k}.attn1.to_qkv",
            (f"{_TB}.attn1.to_q", f"{_TB}.attn1.to_k", f"{_TB}.attn1.to_v"),
        ),
        ("blocks.{k}.attn1.to_out", f"{_TB}.attn1.to_out.0"),
        ("blocks.{k}.norm2", f"{_TB}.norm2"),
        ("blocks.{k}.attn2.to_q", f"{_TB}.attn2.to_q"),
        ("blocks.{k}.attn2.to_kv", tuple(f"{_TB}.attn2.to_{x}" for x in "kv")),
        ("blocks.{k}.attn2.to_out", f"{_TB}.attn2.to_out.0"),
        ("blocks.{k}.norm3", f"{_TB}.norm3"),
        ("blocks.{k}.ff.proj_in", f"{_TB}.ff.net.0.proj"),
        ("blocks.{k}.ff.proj_out", f"{_TB}.ff.net.2"),
        ("proj_out", "proj_out"),
    ),
}


def _join(*names: str) -> str:
    return ".".join(n for n in names if n)


def _pattern(template: str) -> re.Pattern:
    """'down.{i}.res.{j}.{p}' -> a regex: indices as named groups, {p} a weight or a bias."""
    escaped = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    escaped = escaped.replace("{p}", "(?P<p>weight|bias)")
    return re.compile(re.sub(r"{(\w)}", r"(?P<\1>\\d+)", escaped))


def _rules() -> tuple[tuple[re.Pattern, tuple[str, ...]], ...]:
    rules = []
    for kind, prefix, diffusers_prefix in _BLOCKS:
        for part, names in _PARTS[kind]:
            names = (names,) if isinstance(names, str) else names
            theirs = tuple(_join(diffusers_prefix, name, "{p}") for name in names)
            rules.append((_pattern(_join(prefix, part, "{p}")), theirs))
    return tuple(rules)


_RULES = _rules()


def diffusers_names(name: str) -> tuple[str, ...]:
    """The diffusers tensor names that make fastsp's tensor `name` (several: concatenated)."""
    for pattern, theirs in _RULES:
        match = pattern.fullmatch(name)
        if match:
            return tuple(t.format(**match.groupdict()) for t in theirs)
    raise KeyError(f"fastsp tensor {name!r} has no diffusers name in the key map")


# ---------------------------------------------------------------------------------------------
# Reading safetensors files: the 8-byte header size, the JSON header, then the raw tensors.

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class _Stored:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    nbytes: int


def _read_header(file: Path) -> dict[str, _Stored]:
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as error:
        raise CheckpointError(f"{file} is not a readable safetensors file ({error})") from None
    stored = {}
    for name, entry in header.items():  # {name: {dtype, shape, data_offsets}, __metadata__}
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                f"{file}: tensor {name} is {entry.get('dtype')}; fastsp reads F32, F16, BF16, F64"
            )
        begin, end = entry["data_offsets"]
        stored[name] = _Stored(file, dtype, tuple(entry["shape"]), 8 + size + begin, end - begin)
    return stored


def _weights_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index} is not a safetensors index ({error})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder} lacks the shards {missing} its {INDEX_NAME} names")
        return files
    raise CheckpointError(
        f"{folder} holds a diffusers UNet config.json but neither {WEIGHTS_NAME} nor "
        f"{INDEX_NAME}; save the UNet with safe_serialization (the default)"
    )


def _into(target: torch.Tensor, stored: _Stored, handle) -> None:
    """Read one stored tensor into `target` (same number of elements), converting its dtype."""
    direct = target.dtype == stored.dtype and target.is_contiguous()
    buffer = target if direct else torch.empty(target.shape, dtype=stored.dtype)
    if buffer.nbytes != stored.nbytes:
        raise CheckpointError(f"{stored.file} is damaged: its header gives a tensor a wrong size")
    handle.seek(stored.start)
    # view(torch.uint8): the raw bytes of any dtype, numpy included (bf16 has no numpy type)
    if handle.readinto(buffer.view(-1).view(torch.uint8).numpy()) != buffer.nbytes:
        raise CheckpointError(f"{stored.file} is truncated: the file ends inside a tensor")
    if buffer is not target:
        target.copy_(buffer)


@torch.no_grad()
def _fill(model: UNet, folder: Path) -> None:
    """Every tensor of `model` from the diffusers weights in `folder`; every stored tensor used."""
    stored: dict[str, _Stored] = {}
    for file in _weights_files(folder):
        stored.update(_read_header(file))
    plan = []  # (stored, target slice)
    problems = []
    for name, target in model.state_dict().items():
        sources = diffusers_names(name)
        absent = [s for s in sources if s not in stored]
        if absent:
            problems.append(f"{absent[0]} missing")
            continue
        rows = sum(stored[s].shape[0] for s in sources)
        if rows != target.shape[0] or any(stored[s].shape[1:] != target.shape[1:] for s in sources):
            shapes = " + ".join(str(list(stored[s].shape)) for s in sources)
            problems.append(f"{' + '.join(sources)} {shapes} vs fastsp {name} {list(target.shape)}")
            continue
        row = 0
        for s in sources:
            plan.append((stored[s], target[row : row + stored[s].shape[0]]))
            row += stored[s].shape[0]
    used = {s for name in model.state_dict() for s in diffusers_names(name)}
    left_over = sorted(set(stored) - used)
    if left_over:
        problems.append(f"{len(left_over)} tensors fastsp does not map (e.g. {left_over[0]})")
    if problems:
        raise CheckpointError(
            f"{folder}'s weights do not fit its config.json: {'; '.join(problems[:3])}"
            f"{f' and {len(problems) - 3} more' if len(problems) > 3 else ''}"
        )
    plan.sort(key=lambda item: (str(item[0].file), item[0].start))  # sequential reads
    handles: dict[Path, Any] = {}
    try:
        for entry, target in plan:
            if entry.file not in handles:
                handles[entry.file] = open(entry.file, "rb")  # noqa: SIM115 (closed below)
            _into(target, entry, handles[entry.file])
    finally:
        for handle in handles.values():
            handle.close()


# ---------------------------------------------------------------------------------------------
# Public: load, the trainer's init and perceptual sources, export


def _diffusers_model_config(folder: Path) -> UNetConfig:
    try:
        config = read_diffusers_config(folder)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder}/config.json cannot be read ({error})") from None
    return unet_config_from_diffusers(config)


def load_unet(path: str | Path, dtype: torch.dtype | None = None) -> UNet:
    """A fastsp UNet (eval mode, on the CPU) from a local folder:

    - a diffusers UNet folder (config.json naming UNet2DConditionModel, and
      diffusion_pytorch_model.safetensors, fp32 or fp16, or shards with its .index.json),
    - a diffusers pipeline folder (its unet/),
    - a fastsp checkpoint or run folder (its EMA weights).

    dtype: the parameters' dtype (None: float32, fastsp's master weights; fp16 files are
    converted tensor by tensor).
    """
    dtype = torch.float32 if dtype is None else dtype
    folder = diffusers_unet_folder(path)
    if folder is None:
        model = checkpoint_lib.load_model(path, "ema").model
        return model.to(dtype)
    config = _diffusers_model_config(folder)
    with torch.device("meta"):
        model = UNet(config).to(dtype)
    model = model.to_empty(device="cpu")  # uninitialised storage: every tensor is read below
    _fill(model, folder)
    return model.eval()


def resolve_source(path: str | Path) -> Path:
    """An --init / --perceptual-checkpoint path: a diffusers UNet folder (a pipeline's unet/),
    or the fastsp checkpoint of a checkpoint or run folder."""
    return diffusers_unet_folder(path) or checkpoint_lib.resolve_checkpoint(path)


def source_model_config(source: Path) -> dict[str, Any]:
    """The model section of a source's config, as a fastsp checkpoint's config.json holds it."""
    if diffusers_unet_folder(source) == source:
        return json.loads(json.dumps(asdict(_diffusers_model_config(source))))
    return checkpoint_lib.read_config(source)["model"]


def load_state_into(model: UNet, source: Path) -> None:
    """The weights of a resolved source (see `resolve_source`) into `model` (same shape): a
    diffusers folder's weights, or a fastsp checkpoint's EMA weights (a LoRA run's merged)."""
    if diffusers_unet_folder(source) == source:
        _fill(model, source)
    elif checkpoint_lib.read_configs(source)[0].lora_rank or checkpoint_lib.is_sharded(source):
        model.load_state_dict(
            checkpoint_lib.load_model(source, "ema", merge=True).model.state_dict()
        )
    else:
        checkpoint_lib.load_weights(model, source / "ema.safetensors")


def diffusers_state_dict(model: UNet) -> dict[str, torch.Tensor]:
    """`model`'s tensors under diffusers' names, the fused ones split (views, no copies)."""
    out = {}
    for name, tensor in model.state_dict().items():
        theirs = diffusers_names(name)
        for key, part in zip(theirs, tensor.chunk(len(theirs)), strict=True):
            out[key] = part
    return out


def export_to_diffusers(
    model: UNet,
    out_dir: str | Path,
    sample_size: int | None = None,
    scheduler_config: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a diffusers UNet folder that UNet2DConditionModel.from_pretrained(out_dir)
    loads without options: config.json and diffusion_pytorch_model.safetensors (the model's
    dtype). Assembled in a temporary folder beside out_dir and renamed into place; out_dir must
    not exist or be empty. sample_size: the latent size pipelines default to (None: unset).
    scheduler_config: written as scheduler_config.json beside them (see write_diffusers_folder)."""
    config = diffusers_config_from_unet(model.config, sample_size)
    assert config["_class_name"] == DIFFUSERS_UNET_CLASS
    weights = diffusers_state_dict(model)
    return write_diffusers_folder(out_dir, config, weights, scheduler_config)


@contextlib.contextmanager
def assembled_beside(out: Path) -> Iterator[Path]:
    """A new temporary folder beside `out` (new or empty: `check_export_folder`) to assemble an
    export in; leaving the block syncs its files and renames it to `out`, so `out` is either
    whole or absent. A write that fails (a full disk; safetensors raises its own type) removes it
    and reads as a CheckpointWriteError naming `out`; any other error removes it too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
        if out.exists():
            out.rmdir()  # empty, checked by check_export_folder
        os.replace(tmp, out)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(error, "strerror", None) or str(error)
        raise CheckpointWriteError(
            f"cannot write {out}: {reason}; nothing of it was written (it is assembled beside "
            "it and renamed into place): free space (or fix the cause) and rerun"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_diffusers_folder(
    out_dir: str | Path,
    config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    scheduler_config: dict[str, Any] | None = None,
) -> Path:
    """A diffusers model folder: config.json (config plus `_diffusers_version`) and the weights
    as diffusion_pytorch_model.safetensors, assembled in a temporary folder beside out_dir and
    renamed into place; out_dir must not exist or be empty. With scheduler_config, also
    scheduler_config.json (plus `_diffusers_version`): the scheduler the model samples with, which
    a diffusers scheduler class's from_pretrained(out_dir) reads (fastsp.flow.scheduler_config)."""
    out = Path(out_dir)
    check_export_folder(out)
    config = {**config, "_diffusers_version": EXPORT_DIFFUSERS_VERSION}
    with assembled_beside(out) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if scheduler_config is not None:
            scheduler_config = {**scheduler_config, "_diffusers_version": EXPORT_DIFFUSERS_VERSION}
            text = json.dumps(scheduler_config, indent=2, sort_keys=True) + "\n"
            (tmp / SCHEDULER_CONFIG_NAME).write_text(text)
    return out


def check_export_folder(out_dir: str | Path, option: str = "--to-diffusers") -> None:
    """Refuse, before any work, an export folder that cannot be written or is not new/empty."""
    out = Path(out_dir)
    check_out_folder(out, option)
    if out.is_dir() and any(out.iterdir()):
        raise CheckpointError(f"{out} already exists and is not empty; pass a new folder")
