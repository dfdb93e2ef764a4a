"""FSDP2 (--parallel fsdp, fastsp.training.parallel) with CPU processes over gloo: the sharded
run trains the weights a one-process run trains, for both objectives, through a kill -9 in the
middle and resumes at another world size (2 -> 1, 1 -> 2) from torch.distributed.checkpoint
folders, on fastsp's UNet and on a diffusers Flux (--model diffusers, whose blocks are the units
fully_shard gathers); and what it refuses.
"""

import os
import subprocess
import sys
from pathlib import Path

import prefork
import pytest
import torch
from family_tiny import TINY, tiny_denoiser, write_pipeline_folder, write_shards
from safetensors.torch import load_file

from fastsp import checkpoint as checkpoint_lib
from fastsp import config_cli
from fastsp.config import TrainConfig
from fastsp.dit import DiTBlock
from fastsp.errors import ConfigError
from fastsp.families import DiffusersDenoiser
from fastsp.family_config import DiffusersConfig
from fastsp.training import parallel
from fastsp.training.graph_plan import plan_graph
from fastsp.training.loop import train
from fastsp.training.plan import plan_run
from fastsp.unet import ResBlock, SpatialTransformer, UNet

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "fastsp" / "train.py")
COMMON = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--batch-size", "8"]
COMMON += ["--log-every", "2", "--checkpoint-every", "2", "--sample-every", "0"]


def _launch(nproc: int | None, args: list[str], **env) -> subprocess.CompletedProcess:
    """fastsp/train.py in one plain process (nproc None) or under torchrun with nproc ranks."""
    launcher = [sys.executable]
    if nproc is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    # forked from a server (tests/prefork.py): a plain process, or torchrun's agent and ranks
    return prefork.run([*launcher, TRAIN, *args], env=environment, timeout=300)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _weights(checkpoint: Path, which: str) -> dict[str, torch.Tensor]:
    if checkpoint_lib.is_sharded(checkpoint):
        return checkpoint_lib.load_model(checkpoint, which).model.state_dict()
    return load_file(checkpoint / f"{which}.safetensors")


def _assert_same_weights(sharded: Path, single: Path) -> None:
    assert checkpoint_lib.is_sharded(sharded) and not checkpoint_lib.is_sharded(single)
    for which in ("model", "ema"):
        ours, theirs = _weights(sharded, which), _weights(single, which)
        assert ours.keys() == theirs.keys()
        for name, tensor in theirs.items():
            # fused AdamW after a reduce-scatter in another summation order (as tests/test_train's
            # DDP comparison)
            torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_fsdp_mse_survives_kill_9_and_resumes_on_one_process(tmp_path):
    # 2 ranks train to step 2 (a sharded checkpoint), are killed by SIGKILL after step 3, and
    # one rank resumes from step 2 to 4: the weights are the one-process run's.
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    _ok(_launch(None, [*COMMON, "--steps", "4", "--out", str(single)]))
    fsdp = [*COMMON, "--parallel", "fsdp", "--out", str(sharded)]
    killed = _launch(2, [*fsdp, "--steps", "4"], FASTSP_KILL_AT="step:3")
    assert killed.returncode != 0
    assert [p.name for p in checkpoint_lib.list_checkpoints(sharded)] == ["step_00000002"]
    resumed = _ok(_launch(1, [*fsdp, "--steps", "4", "--resume"]))
    assert "resuming from" in resumed.stdout
    final = sharded / "checkpoints" / "step_00000004"
    assert checkpoint_lib.read_state(final)["world_size"] == 1
    checkpoint_lib.verify_checkpoint(final)
    _assert_same_weights(final, single / "checkpoints" / "step_00000004")


@pytest.fixture
def stage1(build_once) -> Path:
    """A stage-1 run of two steps, shared by the stage-2 tests (tests/conftest.py build_once)."""
    run = build_once(
        "fsdp_stage1",
        lambda folder: _ok(_launch(None, [*COMMON, "--steps", "2", "--out", str(folder / "run")])),
    )
    return run / "run"


@pytest.mark.slow
def test_fsdp_self_perceptual_resumes_from_one_process_on_two(tmp_path, stage1):
    # Stage 2 with its frozen perceptual network sharded too: one rank to step 2, two ranks
    # from there to 4, against one plain process.
    stage2 = [*COMMON, "--objective", "self_perceptual", "--init", str(stage1)]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    _ok(_launch(None, [*stage2, "--steps", "4", "--out", str(single)]))
    fsdp = [*stage2, "--parallel", "fsdp", "--out", str(sharded)]
    _ok(_launch(1, [*fsdp, "--steps", "2"]))
    _ok(_launch(2, [*fsdp, "--steps", "4", "--resume"]))
    final = sharded / "checkpoints" / "step_00000004"
    assert checkpoint_lib.read_state(final)["world_size"] == 2
    assert "FSDP2 over 2 processes" in (sharded / "backends.json").read_text()
    _assert_same_weights(final, single / "checkpoints" / "step_00000004")


def test_fsdp_without_torchrun_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    cfg, model_cfg = config_cli.parse_args([*COMMON, "--parallel", "fsdp", "--out", str(out)])
    with pytest.raises(ConfigError, match="--parallel fsdp .* torchrun"):
        train(cfg, model_cfg)
    assert not out.exists()


def test_cuda_graph_capture_under_fsdp_is_refused_with_the_reason():
    graph = plan_graph(TrainConfig(parallel="fsdp"), 8, "cuda")
    assert not graph.captured and "FSDP2" in graph.describe()
    assert plan_graph(TrainConfig(), 8, "cuda").captured


@pytest.mark.slow
def test_fsdp_lora_trains_the_adapters_one_process_trains(tmp_path, stage1):
    # LoRA under FSDP2, self-perceptual: no frozen network to shard, the perceptual pass is the
    # sharded online model with its adapters off (fastsp.lora.adapters_off). Two ranks train
    # the adapters (and their EMA) one plain process trains; the base stays --init's weights.
    lora = [*COMMON, "--objective", "self_perceptual", "--init", str(stage1), "--steps", "4"]
    lora += ["--lora-rank", "4"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    _ok(_launch(None, [*lora, "--out", str(single)]))
    _ok(_launch(2, [*lora, "--parallel", "fsdp", "--out", str(sharded)]))
    backends = (sharded / "backends.json").read_text()
    assert "FSDP2 over 2 processes" in backends and "adapters off" in backends
    final = sharded / "checkpoints" / "step_00000004"
    _assert_same_weights(final, single / "checkpoints" / "step_00000004")
    init = load_file(checkpoint_lib.list_checkpoints(stage1)[-1] / "ema.safetensors")
    _assert_adapters_trained_on(init, _weights(final, "model"))


def _assert_adapters_trained_on(base: dict, trained: dict) -> None:
    """`trained` (a LoRA model's weights) kept `base`'s weights and trained its adapters."""
    for name, tensor in trained.items():
        if "lora_B" in name:  # peft starts B at zero: trained, it is not
            assert tensor.abs().max() > 0, name
        elif "lora_" not in name:
            assert torch.equal(tensor, base[name.replace(".base_layer.", ".")]), name


def test_fsdp_refuses_channels_last_weights_before_anything_is_written(tmp_path):
    # torch's fully_shard takes contiguous parameters only (the sd21 preset sets channels_last)
    cfg, model_cfg = config_cli.parse_args(
        [*COMMON, "--parallel", "fsdp", "--channels-last", "--out", str(tmp_path / "run")]
    )
    with pytest.raises(ConfigError, match="channels_last .* add --no-channels-last"):
        plan_run(cfg, model_cfg, world_size=2, device_type="cuda", read_sources=False)
    assert not (tmp_path / "run").exists()


def _diffusers(family: str) -> DiffusersDenoiser:
    spec = TINY[family]
    config = DiffusersConfig(family=family, class_name=spec["cls"], diffusers=spec["config"])
    return DiffusersDenoiser(config, tiny_denoiser(family))


def _unit_names(network: torch.nn.Module) -> set[str]:
    chosen = {id(unit) for unit in parallel.units(network)}
    return {name for name, module in network.named_modules() if id(module) in chosen}


def test_the_units_are_each_family_s_blocks_and_the_rest_is_the_root():
    # The diffusers UNet (SDXL's layout): every resnet and attention of its down, mid and up
    # blocks, not the transformer blocks inside an attention; the samplers, embeddings and the
    # first and last layers stay with the root. Flux: its double- and single-stream blocks.
    sdxl = _diffusers("sdxl")
    unet = sdxl.denoiser
    expected = {
        f"denoiser.{path}.{kind}.{i}"
        for path, block in [
            *((f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)),
            ("mid_block", unet.mid_block),
            *((f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)),
        ]
        for kind in ("resnets", "attentions")
        for i in range(len(getattr(block, kind, ())))
    }
    assert any(".attentions." in name for name in expected)
    assert _unit_names(sdxl) == expected
    in_units = {id(p) for unit in parallel.units(sdxl) for p in unit.parameters()}
    root = [n for n, p in sdxl.named_parameters() if id(p) not in in_units]
    blocks = ("down_blocks", "mid_block", "up_blocks")
    assert all(n.split(".")[1] not in blocks or "samplers." in n for n in root)
    assert {n.split(".")[1] for n in root} >= {"conv_in", "time_embedding", "add_embedding"}
    flux = _diffusers("flux")
    assert _unit_names(flux) == {
        "denoiser.transformer_blocks.0",
        *(f"denoiser.single_transformer_blocks.{i}" for i in range(3)),
    }
    # fastsp's own UNet: its residual and transformer blocks, as before the families
    network = UNet(config_cli.parse_args(["--preset", "tiny"])[1])
    blocks = (ResBlock, SpatialTransformer, DiTBlock)
    assert parallel.units(network) == [m for m in network.modules() if isinstance(m, blocks)]


def _tiny_flux_options(tmp_path: Path) -> list[str]:
    """The options of a run of a tiny diffusers Flux from its pipeline folder, on its shards."""
    pipeline = write_pipeline_folder("flux", tmp_path / "pipeline")
    data = write_shards("flux", tmp_path / "data")
    flux = [*COMMON, "--model", "diffusers", "--diffusion", "flow", "--cond", "context"]
    return flux + ["--data", str(data), "--resolution", "8", "--init", str(pipeline)]


@pytest.mark.slow
def test_fsdp_flux_self_perceptual_resumes_from_two_processes_on_one(tmp_path):
    # A tiny diffusers Flux in stage 2 straight from its pipeline folder, its frozen perceptual
    # network sharded too: two ranks to step 2, one rank from there to 4, against one plain
    # process. The checkpoint's DCP keys are diffusers' own names (one process reads them).
    flux = _tiny_flux_options(tmp_path)
    flux += ["--objective", "self_perceptual"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    _ok(_launch(None, [*flux, "--steps", "4", "--out", str(single)]))
    fsdp = [*flux, "--parallel", "fsdp", "--out", str(sharded)]
    _ok(_launch(2, [*fsdp, "--steps", "2"]))
    _ok(_launch(1, [*fsdp, "--steps", "4", "--resume"]))
    for step in ("step_00000002", "step_00000004"):
        _assert_same_weights(sharded / "checkpoints" / step, single / "checkpoints" / step)
    final = sharded / "checkpoints" / "step_00000004"
    assert checkpoint_lib.read_state(final)["world_size"] == 1
    assert _weights(final, "model").keys() == tiny_denoiser("flux").state_dict().keys()


@pytest.mark.slow
def test_fsdp_lora_on_flux_trains_the_adapters_one_process_trains(tmp_path):
    # The large-model recipe: LoRA on a diffusers Flux under FSDP2, self-perceptual with the
    # sharded transformer's adapters off for the perceptual pass; two ranks train the adapters
    # (and their EMA) one plain process trains, and the base stays the pipeline's weights.
    flux = _tiny_flux_options(tmp_path)
    flux += ["--objective", "self_perceptual", "--lora-rank", "4", "--steps", "2"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    _ok(_launch(None, [*flux, "--out", str(single)]))
    _ok(_launch(2, [*flux, "--parallel", "fsdp", "--out", str(sharded)]))
    assert "adapters off" in (sharded / "backends.json").read_text()
    final = sharded / "checkpoints" / "step_00000002"
    _assert_same_weights(final, single / "checkpoints" / "step_00000002")
    base = tiny_denoiser("flux").state_dict()  # the pipeline folder's weights (seeded)
    _assert_adapters_trained_on(base, _weights(final, "model"))


def test_a_diffusers_family_under_fsdp_is_planned_with_capture_refused(tmp_path):
    # --parallel fsdp with --model diffusers passes the plan (fastsp.family_config.check_run);
    # its step is not captured, for FSDP2's reason, where the same DDP run on CUDA is.
    flux = _tiny_flux_options(tmp_path)
    flux += ["--objective", "self_perceptual", "--out", str(tmp_path / "run")]
    plans = {}
    for parallel_option in ("ddp", "fsdp"):
        cfg, model_cfg = config_cli.parse_args([*flux, "--parallel", parallel_option])
        plans[parallel_option] = plan_run(
            cfg, model_cfg, world_size=2, device_type="cuda", read_sources=False
        ).graph
    assert plans["ddp"].captured and not plans["fsdp"].captured
    assert "--parallel fsdp: torch does not capture FSDP2's" in plans["fsdp"].describe()
    assert not (tmp_path / "run").exists()
