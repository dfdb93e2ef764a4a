"""End-to-end training: one process, torchrun with two processes, resume, samples, metrics."""

import io
import json
import os
import sys
from pathlib import Path

import prefork
import pytest
import torch
from safetensors.torch import load_file

from fastsp import checkpoint as checkpoint_lib
from fastsp import config_cli
from fastsp import sample as sample_cli
from fastsp.diffusion import NoiseSchedule
from fastsp.sampling import generate
from fastsp.training.loop import train
from fastsp.training.outputs import Progress

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = str(REPO / "fastsp" / "train.py")


def _train(argv):
    cfg, model_cfg = config_cli.parse_args(argv)
    return train(cfg, model_cfg)


def _run(cmd, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return prefork.run(cmd, env=env, timeout=300, **kwargs)


def _torchrun(nproc, args):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        TRAIN_SCRIPT,
        *args,
    ]
    result = _run(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_preset_loss_falls_and_writes_samples(tmp_path):
    # The digits preset itself (its model and data), shortened: loss must fall, a grid must exist.
    out = tmp_path / "digits"
    checkpoint = _train(
        [
            "--preset",
            "digits",
            "--steps",
            "60",
            "--batch-size",
            "32",
            "--log-every",
            "10",
            "--sample-num",
            "16",
            "--sample-steps",
            "4",
            "--out",
            str(out),
        ]
    )
    losses = [m["loss"] for m in _metrics(out)]
    assert len(losses) == 6
    assert losses[-1] < 0.6 * losses[0], losses
    grid = out / "samples" / "step_00000060.png"
    assert grid.is_file() and grid.stat().st_size > 0
    assert checkpoint == out / "checkpoints" / "step_00000060"
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["model"]["num_classes"] == 10 and saved["train"]["label_dropout"] == 0.1
    assert json.loads((checkpoint / "state.json").read_text())["samples_seen"] == 60 * 32


def test_unconditional_and_grad_accum(tmp_path):
    out = tmp_path / "uncond"
    _train(
        [
            "--preset",
            "tiny",
            "--cond",
            "none",
            "--grad-accum",
            "2",
            "--steps",
            "4",
            "--out",
            str(out),
        ]
    )
    saved = checkpoint_lib.read_config(checkpoint_lib.resolve_checkpoint(out))
    assert saved["model"]["num_classes"] == 0 and saved["train"]["grad_accum"] == 2


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--preset", "tiny", "--steps", "3", "--batch-size", "8"]
    _train([*common, "--out", str(a)])
    _train([*common, "--grad-accum", "4", "--out", str(b)])
    wa = load_file(str(a / "checkpoints" / "step_00000003" / "model.safetensors"))
    wb = load_file(str(b / "checkpoints" / "step_00000003" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


def test_resume_continues_exactly(tmp_path):
    # 6 straight steps == 3 steps, then --resume to 6 (same process count, deterministic CPU).
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--preset", "tiny", "--batch-size", "8"]
    _train([*common, "--steps", "6", "--out", str(straight)])
    _train([*common, "--steps", "3", "--out", str(split)])
    _train([*common, "--steps", "6", "--out", str(split), "--resume"])
    for file in ("model.safetensors", "ema.safetensors"):
        wa = load_file(str(straight / "checkpoints" / "step_00000006" / file))
        wb = load_file(str(split / "checkpoints" / "step_00000006" / file))
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (file, name)


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    _train(["--preset", "tiny", "--steps", "2", "--out", str(tmp_path / "r"), "--resume"])
    assert "starting fresh" in capsys.readouterr().out
    assert (tmp_path / "r" / "checkpoints" / "step_00000002").is_dir()


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    """2 ranks (gloo) train 3 steps, checkpoint, resume to 6; equals 1 process for 6 steps."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--preset", "tiny", "--device", "cpu", "--batch-size", "8", "--log-every", "3"]
    _run_single = _run([sys.executable, TRAIN_SCRIPT, *common, "--steps", "6", "--out", str(one)])
    assert _run_single.returncode == 0, _run_single.stderr[-3000:]
    _torchrun(2, [*common, "--steps", "3", "--out", str(two)])
    assert (two / "checkpoints" / "step_00000003").is_dir()
    resumed = _torchrun(2, [*common, "--steps", "6", "--out", str(two), "--resume"])
    assert "resuming from" in resumed.stdout
    state = json.loads((two / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == 6 * 8
    for file in ("model.safetensors", "ema.safetensors"):
        w1 = load_file(str(one / "checkpoints" / "step_00000006" / file))
        w2 = load_file(str(two / "checkpoints" / "step_00000006" / file))
        assert w1.keys() == w2.keys()
        for name in w1:
            torch.testing.assert_close(
                w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=f"{file}:{name}"
            )
    # The two runs logged the same losses (all-reduced mean over ranks == the 1-process mean).
    loss_one = [m["loss"] for m in _metrics(one)]
    loss_two = [m["loss"] for m in _metrics(two)]
    assert loss_two == pytest.approx(loss_one, rel=1e-4)


def test_sample_cli(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _train(["--preset", "tiny", "--steps", "2", "--out", str(run_dir)])
    png = tmp_path / "grid.png"
    code = sample_cli.main(
        ["--checkpoint", str(run_dir), "--num", "6", "--steps", "3", "--out", str(png)]
    )
    assert code == 0 and png.is_file()
    guided = tmp_path / "guided.png"
    code = sample_cli.main(
        [
            "--checkpoint",
            str(run_dir / "checkpoints" / "step_00000002"),
            "--num",
            "4",
            "--steps",
            "2",
            "--cfg",
            "3",
            "--cfg-rescale",
            "0.7",
            "--label",
            "3",
            "--sampler",
            "euler",
            "--out",
            str(guided),
        ]
    )
    assert code == 0 and guided.is_file()
    from PIL import Image

    with Image.open(png) as image:  # 6 images of 8x8 in a 3x2 grid with 1-pixel padding, x16
        assert image.size == ((3 * 9 + 1) * 16, (2 * 9 + 1) * 16)
    assert (
        sample_cli.main(
            ["--checkpoint", str(run_dir), "--label", "10", "--out", str(tmp_path / "x.png")]
        )
        == 2
    )
    assert "not a class" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_sample_grid_is_deterministic(tmp_path):
    run_dir = tmp_path / "run"
    _train(["--preset", "tiny", "--steps", "2", "--out", str(run_dir)])
    loaded = checkpoint_lib.load_model(run_dir)
    model, schedule = loaded.model, NoiseSchedule.from_config(loaded.train_config)
    labels = torch.arange(4)
    a = generate(model, schedule, 4, (1, 8, 8), labels=labels, num_steps=3, seed=7)
    b = generate(model, schedule, 4, (1, 8, 8), labels=labels, num_steps=3, seed=7)
    assert torch.equal(a, b) and a.shape == (4, 1, 8, 8) and a.abs().max() <= 1


WORKER_ENVIRONMENT_SCRIPT = """
import json, os, sys
from fastsp import config as config_lib
from fastsp import config_cli
from fastsp.training.graph_plan import plan_graph

cfg, _ = config_lib.resolve("tiny", {"cuda_graph": True, "out": sys.argv[1]}, {})
before = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
# as fastsp.training.loop.build_run applies it, for the run that captures DDP on CUDA
os.environ.update(plan_graph(cfg, int(os.environ["WORLD_SIZE"]), "cuda").environment)
after = os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"]
with open(os.path.join(sys.argv[1], os.environ["RANK"] + ".json"), "w") as f:
    json.dump({"before": before, "after": after}, f)
"""


@pytest.mark.slow
def test_torchrun_workers_get_the_nccl_setting_for_graph_capture(tmp_path):
    """torchrun's agent sets TORCH_NCCL_ASYNC_ERROR_HANDLING in every worker (here "1", as its
    default), so the capture recipe's "0" must be assigned, not set as a default."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    script = tmp_path / "worker.py"
    script.write_text(WORKER_ENVIRONMENT_SCRIPT)
    seen = tmp_path / "seen"
    seen.mkdir()
    result = prefork.run([*torchrun, "--nproc_per_node=2", str(script), str(seen)], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in ("0", "1"):
        assert json.loads((seen / f"{rank}.json").read_text()) == {"before": "1", "after": "0"}
    # The real CPU run (gloo, no graphs) keeps the agent's value and records that it did.
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--out", str(out)]
    result = prefork.run([*torchrun, "--nproc_per_node=2", TRAIN_SCRIPT, *args], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    backends = json.loads((out / "backends.json").read_text())
    assert backends["graph_environment"] == "unchanged (no CUDA-graph capture with DDP on CUDA)"


def test_off_a_terminal_the_log_has_plain_lines_not_carriage_returns(tmp_path):
    # nohup, Slurm, CI: stdout and stderr are files or pipes; one line per log interval
    args = ["--preset", "tiny", "--device", "cpu", "--steps", "4", "--log-every", "2"]
    result = _run([sys.executable, TRAIN_SCRIPT, *args, "--out", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stdout and "\r" not in result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all("loss" in line and "images/s" in line for line in lines)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_on_a_terminal_the_progress_bar_stays(monkeypatch, capsys, terminal):
    monkeypatch.setattr(sys, "stderr", _Terminal() if terminal else io.StringIO())
    progress = Progress(total=4, initial=0, is_main=True)
    progress.update()
    progress.log(1, 0.5, 100.0)
    progress.close()
    assert progress.plain is not terminal
    assert ("\r" in sys.stderr.getvalue()) is terminal  # tqdm's bar redraws in place
    assert ("step 1/4: loss 0.5000" in capsys.readouterr().out) is not terminal
