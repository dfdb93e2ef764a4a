"""build_run assembles a run without writing anything; run_loop writes it and says which backends
it used; the command-line layer maps expected stops to exit statuses and tears the process group
down on every way out; the pipeline's stages are one config replaced."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as torch_dist

from fastsp import cli, dist, errors, pipeline
from fastsp import config as config_lib
from fastsp.errors import (
    CheckpointError,
    CheckpointWriteError,
    ConfigError,
    DataError,
    DryRunFault,
    GraphCaptureError,
    NumericalFault,
    Preempted,
)
from fastsp.step import StepConfig
from fastsp.training.graph_plan import plan_graph
from fastsp.training.loop import build_run, run_loop

REPO = Path(__file__).resolve().parents[1]
BACKEND_PARTS = {
    "attention",
    "feature_mse",
    "optimizer",
    "precision",
    "compile",
    "parallel",
    "lora",
    "cuda_graph",
    "graph_environment",
}


def _tiny(tmp_path, **fields):
    fields = {"out": str(tmp_path / "run"), "device": "cpu", "steps": 2, **fields}
    return config_lib.resolve("tiny", fields, {})


def test_build_run_validates_and_assembles_without_writing(tmp_path):
    cfg, model_cfg = _tiny(tmp_path, grad_accum=2, label_dropout=0.2)
    run = build_run(cfg, model_cfg)
    assert not (tmp_path / "run").exists()
    # the model config is completed from the data set (digits: 1 channel, 10 classes)
    assert (run.model_cfg.in_channels, run.model_cfg.num_classes) == (1, 10)
    assert run.step.config == StepConfig.from_train(
        cfg, run.model_cfg, world_size=1, rank=0, bf16=False
    )
    assert run.step.config.grad_accum == 2 and run.step.config.label_dropout == 0.2
    assert run.step.config.shape == (1, cfg.resolution, cfg.resolution)
    assert run.start_step == 0 and run.resume_from is None and run.perceptual_loss is None
    assert set(run.backends) == BACKEND_PARTS
    assert run.backends["attention"].startswith("sdpa")
    assert run.backends["precision"] == "fp32"
    assert run.backends["optimizer"] == "torch AdamW (fused)"
    assert run.backends["compile"] == "off"
    assert run.backends["cuda_graph"] == "eager (the step runs on cpu, CUDA graphs need CUDA)"
    assert run.backends["graph_environment"] == (
        "unchanged (no CUDA-graph capture with DDP on CUDA)"
    )
    # under the test suite's TRITON_INTERPRET=1 the CPU feature MSE runs the kernels
    assert run.backends["feature_mse"].startswith("triton")


def test_build_run_refuses_bad_input_before_any_file(tmp_path):
    cfg, model_cfg = _tiny(tmp_path, batch_size=6, grad_accum=4)
    with pytest.raises(ConfigError, match="divisible"):
        build_run(cfg, model_cfg)
    assert not (tmp_path / "run").exists()


def test_reference_step_reports_its_optimizer_and_no_graph(tmp_path):
    cfg, model_cfg = _tiny(tmp_path, train_step="reference", cuda_graph=True)
    run = build_run(cfg, model_cfg)
    assert run.backends["optimizer"] == "torch AdamW (for-loop, torch's default on CPU)"
    assert "the reference step is the eager oracle" in run.backends["cuda_graph"]
    assert "the step runs on cpu" in run.backends["cuda_graph"]


def test_run_loop_prints_and_records_its_backends(tmp_path, capsys):
    run = build_run(*_tiny(tmp_path, cuda_graph=False))
    run_loop(run)
    recorded = json.loads((tmp_path / "run" / "backends.json").read_text())
    assert recorded == run.backends
    assert recorded["cuda_graph"] == (
        "eager (the step runs on cpu, CUDA graphs need CUDA; --no-cuda-graph)"
    )
    stdout = capsys.readouterr().out
    for part, backend in recorded.items():
        assert f"{part.replace('_', ' ')}: {backend}" in stdout
    # in the first lines, before the loop's progress and the final summary
    assert stdout.index("cuda graph:") < stdout.index("run folder:")


@pytest.mark.parametrize(
    "error, status, prefix",
    [
        (ConfigError("bad --lr"), errors.EXIT_INVALID_INPUT, "error: bad --lr"),
        (DataError("bad image"), errors.EXIT_INVALID_INPUT, "error: bad image"),
        (CheckpointError("damaged"), errors.EXIT_INVALID_INPUT, "error: damaged"),
        (CheckpointWriteError("disk full"), errors.EXIT_WRITE_FAILED, "error: disk full"),
        (NumericalFault("nan"), errors.EXIT_NUMERICAL_FAULT, "error: nan"),
        (Preempted("SIGTERM"), errors.EXIT_PREEMPTED, "preempted: SIGTERM"),
        (GraphCaptureError("capture"), errors.EXIT_CAPTURE_FAILED, "error: capture"),
        (DryRunFault("sync"), errors.EXIT_FAULT, "fault: sync"),
        (OSError(28, "No space left", "m.jsonl"), errors.EXIT_WRITE_FAILED, "error: cannot"),
    ],
)
def test_run_command_maps_expected_stops_to_statuses(error, status, prefix, capsys):
    def stop():
        raise error

    assert cli.run_command(stop) == status
    assert capsys.readouterr().err.startswith(prefix)


def test_run_command_lets_a_bug_through():
    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run_command(bug)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fails", [False, True])
def test_run_command_destroys_the_process_group(fails, monkeypatch):
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)

    def job():
        dist.init("cpu")
        assert torch_dist.is_initialized()
        if fails:
            raise NumericalFault("stop")

    status = cli.run_command(job)
    assert status == (errors.EXIT_NUMERICAL_FAULT if fails else errors.EXIT_OK)
    assert not torch_dist.is_initialized()


def test_pipeline_stages_are_one_config_replaced(tmp_path):
    args, extra = pipeline.build_parser().parse_known_args(
        ["--preset", "tiny", "--out", str(tmp_path), "--stage1-steps", "7", "--seed", "4"]
        + ["--lr", "3e-3", "--cond", "none"]
    )
    (stage1, model1), (sp, model_sp), (mse, model_mse) = pipeline.stage_configs(args, extra)
    assert model1 == model_sp == model_mse
    assert (stage1.steps, stage1.seed, stage1.lr, stage1.objective) == (7, 4, 3e-3, "mse")
    assert stage1.out == str(tmp_path / "stage1_mse") and stage1.resume
    for stage2, objective in ((sp, "self_perceptual"), (mse, "mse")):
        assert stage2.objective == objective
        assert (stage2.steps, stage2.seed, stage2.lr) == (1000, 5, 2e-4)
        assert stage2.init == str(tmp_path / "stage1_mse")
        assert stage2.cond == "none"  # options passed through reach every stage
    # every field but the ones each stage sets is the one config's
    differ = {k for k, v in vars(sp).items() if vars(mse)[k] != v}
    assert differ == {"objective", "out"}


def test_pipeline_refuses_a_bad_stage_before_training(tmp_path, capsys):
    # --seed 2**32 - 1 is valid for stage 1, but the stage-2 seed (seed + 1) is out of range
    status = pipeline.main(["--preset", "tiny", "--out", str(tmp_path), "--seed", str(2**32 - 1)])
    assert status == errors.EXIT_INVALID_INPUT
    assert "seed" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_exit_statuses_live_in_the_package_not_in_an_entry_script():
    source = (REPO / "fastsp" / "train.py").read_text()
    assert "EXIT_" not in source and "except" not in source
    result = subprocess.run(
        [sys.executable, str(REPO / "fastsp" / "train.py"), "--preset", "nope"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == errors.EXIT_INVALID_INPUT
    assert "unknown preset 'nope'" in result.stderr or "nope" in result.stderr


@pytest.mark.parametrize(
    ("fields", "world_size", "device_type", "expected"),
    [
        # the one case that captures a DDP backward: NCCL's async error handling off
        ({}, 2, "cuda", {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}),
        ({}, 1, "cuda", {}),  # one process: no process group
        ({}, 2, "cpu", {}),  # gloo, no graphs
        ({"cuda_graph": False}, 2, "cuda", {}),
        ({"train_step": "reference"}, 2, "cuda", {}),  # the oracle runs eagerly
        ({"optimizer": "apex_fused_adam"}, 2, "cuda", {}),  # no found_inf: runs eagerly
    ],
)
def test_graph_environment_is_assigned_only_for_a_captured_ddp_step(
    tmp_path, fields, world_size, device_type, expected
):
    cfg, _ = _tiny(tmp_path, **{"cuda_graph": True, **fields})
    assert plan_graph(cfg, world_size, device_type).environment == expected
