"""Reliability with real processes: kill -9 anywhere, preemption, elastic restarts, NaN steps.

Every test runs `fastsp/train.py` as a separate process and looks only at what it left on disk.
The kill points (FASTSP_KILL_AT, fastsp/faults.py) send a real SIGKILL at a named place.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import prefork
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastsp import checkpoint as checkpoint_lib
from fastsp.data_stream import ShardedBatchSampler

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "fastsp" / "train.py")
COMMON = ["--preset", "tiny", "--device", "cpu", "--batch-size", "8", "--log-every", "1"]
COMMON += ["--deterministic"]  # the "deterministic mode" (the CPU is so anyway)
STEPS = 6
EXIT_PREEMPTED = 75
EXIT_NUMERICAL_FAULT = 3
EXIT_WRITE_FAILED = 4

# Where a run of 6 steps with a checkpoint every 2 steps is killed: between steps, after each file
# of a checkpoint being written, before and after its rename, and after the final checkpoint.
KILL_POINTS = [
    "step:1",
    "checkpoint:2:model.safetensors",
    "step:3",
    "checkpoint:4:ema.safetensors",
    "checkpoint:4:optimizer.pt",
    "checkpoint:4:rng.pt",
    "checkpoint:4:state.json",
    "checkpoint:4:config.json",
    "checkpoint:4:before-rename",
    "checkpoint:4:after-rename",
    "step:5",
    "step:6",
]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTSP_KILL")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _train(args, **env):
    return prefork.run([sys.executable, TRAIN, *COMMON, *args], env=_env(**env), timeout=300)


def _start(cmd, **env):
    return prefork.start(cmd, env=_env(**env))  # a Popen, forked from a server (and its workers)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in ("model", "ema"):
        tensors |= {
            f"{name}.{k}": v for k, v in load_file(str(checkpoint / f"{name}.safetensors")).items()
        }
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    for index, state in optimizer["state"].items():
        tensors |= {f"adam.{index}.{k}": v for k, v in state.items()}
    return tensors


def _assert_identical(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wait_for_steps(run_dir: Path, process, count: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.1)
    raise AssertionError("the run did not reach the expected step in time")


@pytest.fixture(scope="session")
def uninterrupted(build_once):
    """The last checkpoint of a run never interrupted (read-only: the runs compared with it)."""

    def train(folder: Path) -> None:
        out = folder / "run"
        result = _train(["--steps", str(STEPS), "--checkpoint-every", "2", "--out", str(out)])
        assert result.returncode == 0, result.stderr[-2000:]

    run = build_once("reliability_uninterrupted", train) / "run"
    return run / "checkpoints" / f"step_{STEPS:08d}"


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_anywhere_then_resume_is_bit_identical(tmp_path, uninterrupted, point):
    out = tmp_path / "run"
    args = ["--steps", str(STEPS), "--checkpoint-every", "2", "--out", str(out), "--resume"]
    killed = _train(args, FASTSP_KILL_AT=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    for checkpoint in checkpoint_lib.list_checkpoints(out):  # never a half-written checkpoint
        checkpoint_lib.verify_checkpoint(checkpoint)
    resumed = _train(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_identical(out / "checkpoints" / f"step_{STEPS:08d}", uninterrupted)
    # The steps redone after the resume replace their earlier lines: one line per step, in order.
    assert [m["step"] for m in _metrics(out)] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_kill_9_while_pruning_old_checkpoints_then_resume_is_bit_identical(tmp_path, uninterrupted):
    # --keep-last 1: step 2's checkpoint is pruned after step 4's is saved; the kill lands after
    # its rename out of sight and before its removal.
    out = tmp_path / "run"
    args = ["--steps", str(STEPS), "--checkpoint-every", "2", "--keep-last", "1"]
    args += ["--out", str(out), "--resume"]
    killed = _train(args, FASTSP_KILL_AT="prune:step_00000002")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in checkpoint_lib.list_checkpoints(out)] == ["step_00000004"]
    checkpoint_lib.verify_checkpoint(out / "checkpoints" / "step_00000004")
    resumed = _train(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "step 4" in resumed.stdout
    _assert_identical(out / "checkpoints" / f"step_{STEPS:08d}", uninterrupted)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{STEPS:08d}"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, sig):
    out = tmp_path / "run"
    process = _start(
        [
            sys.executable,
            TRAIN,
            *COMMON,
            "--steps",
            "100000",
            "--checkpoint-every",
            "0",
            "--out",
            str(out),
        ]
    )
    _wait_for_steps(out, process, 3)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert "--resume" in stderr
    checkpoint = checkpoint_lib.latest_checkpoint(out)
    stopped_at = json.loads((checkpoint / "state.json").read_text())["step"]
    assert stopped_at >= 3
    checkpoint_lib.verify_checkpoint(checkpoint)
    if sig == signal.SIGINT:
        return
    # Continue two more steps; equal to a run that was never stopped.
    total = stopped_at + 2
    resumed = _train(
        ["--steps", str(total), "--checkpoint-every", "0", "--out", str(out), "--resume"]
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = tmp_path / "straight"
    assert (
        _train(
            ["--steps", str(total), "--checkpoint-every", "0", "--out", str(straight)]
        ).returncode
        == 0
    )
    _assert_identical(
        out / "checkpoints" / f"step_{total:08d}", straight / "checkpoints" / f"step_{total:08d}"
    )


def _torchrun(nproc, args, extra=()):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *extra,
        TRAIN,
        *COMMON,
        *args,
    ]


def _rank_pid(agent_pid: int, rank: int, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return int(child)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    agent = _start(
        _torchrun(2, ["--steps", "100000", "--checkpoint-every", "0", "--out", str(out)])
    )
    _wait_for_steps(out, agent, 3)
    os.kill(_rank_pid(agent.pid, 1), signal.SIGTERM)  # only rank 1 is told
    _, stderr = agent.communicate(timeout=120)
    # Each rank exits 75 (the signalled one first; torchrun then terminates the other, which
    # may already be past its checkpoint); torchrun itself exits 1 and names the root cause.
    assert agent.returncode != 0
    assert re.search(r"exitcode\s*:\s*75", stderr), stderr[-3000:]
    checkpoint = checkpoint_lib.latest_checkpoint(out)
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["world_size"] == 2
    for rank in (0, 1):  # both ranks stopped after the step that was saved
        said = re.findall(rf"rank {rank}: stopping after step (\d+)", stderr)
        assert said == [str(state["step"])], stderr[-3000:]
    checkpoint_lib.verify_checkpoint(checkpoint)


@pytest.mark.slow
def test_sigterm_to_the_torchrun_agent_checkpoints_and_resumes(tmp_path):
    # What a scheduler does on preemption: SIGTERM to the job's torchrun, which forwards it to
    # every rank. The ranks finish their step, agree, checkpoint, and --resume goes on from there.
    out = tmp_path / "run"
    args = ["--steps", "100000", "--checkpoint-every", "0", "--out", str(out), "--resume"]
    agent = _start(_torchrun(2, args))
    _wait_for_steps(out, agent, 3)
    agent.send_signal(signal.SIGTERM)
    _, stderr = agent.communicate(timeout=120)
    assert agent.returncode != 0
    checkpoint = checkpoint_lib.latest_checkpoint(out)
    assert checkpoint is not None, stderr[-3000:]
    checkpoint_lib.verify_checkpoint(checkpoint)
    state = json.loads((checkpoint / "state.json").read_text())
    for rank in (0, 1):
        said = re.findall(rf"rank {rank}: stopping after step (\d+)", stderr)
        assert said == [str(state["step"])], stderr[-3000:]
    steps = state["step"] + 2
    resumed = _train(["--steps", str(steps), "--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"step {state['step']})" in resumed.stdout
    checkpoint_lib.verify_checkpoint(out / "checkpoints" / f"step_{steps:08d}")


@pytest.mark.slow
def test_a_killed_rank_is_named_by_rank_0_with_the_intact_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["--steps", str(STEPS), "--checkpoint-every", "2", "--sample-every", "0"]
    result = prefork.run(  # torchrun's workers forked
        _torchrun(2, [*args, "--out", str(out)]),
        timeout=300,
        env=_env(FASTSP_KILL_AT="step:3", FASTSP_KILL_RANK="1"),
    )
    assert result.returncode != 0
    intact = out / "checkpoints" / "step_00000002"
    line = re.search(r"error: rank 0: rank 1 \(pid \d+ on .*\) died during step 4.*", result.stderr)
    assert line, result.stderr[-3000:]
    assert f"the last checkpoint ({intact}) is intact. Rerun with --resume" in line.group(0)
    assert "[rank0]: Traceback" not in result.stderr  # no gloo traceback from rank 0
    # Rank 0 exits 75 (preempted: resume), unless torchrun's agent, which stops the other
    # workers as soon as one has failed, sends its SIGTERM first: a race outside the trainer.
    exit_line = r"rank\s+: 0 \(local_rank: 0\)\s+exitcode\s+: (75|-15) "
    assert re.search(exit_line, result.stderr), result.stderr
    checkpoint_lib.verify_checkpoint(intact)


@pytest.mark.slow
def test_elastic_restart_after_a_rank_dies_resumes_by_itself(tmp_path, uninterrupted):
    out = tmp_path / "run"
    args = ["--steps", str(STEPS), "--checkpoint-every", "2", "--out", str(out), "--resume"]
    result = prefork.run(  # torchrun's workers forked
        _torchrun(2, args, extra=["--max-restarts=1"]),
        timeout=300,
        # torchrun shares its rendezvous store with the workers by default, and a restarted
        # process group can then read the previous attempt's gloo addresses (pytorch#135712).
        env=_env(
            FASTSP_KILL_AT="step:3",
            FASTSP_KILL_RANK="1",
            FASTSP_KILL_ATTEMPT="0",
            TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    final = _weights(out / "checkpoints" / f"step_{STEPS:08d}")
    one_process = _weights(uninterrupted)
    for name in ("model", "ema"):
        for key in (k for k in final if k.startswith(name + ".")):
            torch.testing.assert_close(final[key], one_process[key], rtol=1e-4, atol=1e-5, msg=key)


def _latent_shards(folder: Path, nan_items: list[int], count: int = 16) -> Path:
    folder.mkdir(parents=True)
    latents = np.random.default_rng(0).standard_normal((count, 1, 8, 8)).astype(np.float32)
    latents[nan_items] = np.nan
    np.save(folder / "shard0.npy", latents)
    return folder


@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    data = _latent_shards(tmp_path / "latents", nan_items=[5])
    out = tmp_path / "run"
    result = _train(["--data", str(data), "--cond", "none", "--steps", "6", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    sampler = ShardedBatchSampler(16, 8, seed=0)
    expected_bad = [any(index == 5 for index, _ in sampler.keys(step)) for step in range(6)]
    assert [m["skipped_steps"] for m in _metrics(out)] == [int(bad) for bad in expected_bad]
    assert 0 < sum(expected_bad) < 6
    weights = _weights(out / "checkpoints" / "step_00000006")
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.slow
def test_consecutive_non_finite_steps_stop_with_the_last_checkpoint_intact(tmp_path):
    # The data goes bad between two runs (a resume may not change --data itself)
    data = _latent_shards(tmp_path / "latents", nan_items=[])
    out = tmp_path / "run"
    first = _train(["--data", str(data), "--cond", "none", "--steps", "2", "--out", str(out)])
    assert first.returncode == 0, first.stderr[-2000:]
    before = _weights(out / "checkpoints" / "step_00000002")
    shutil.rmtree(data)
    _latent_shards(data, nan_items=list(range(16)))
    result = _train(
        [
            "--data",
            str(data),
            "--cond",
            "none",
            "--steps",
            "20",
            "--max-bad-steps",
            "3",
            "--checkpoint-every",
            "0",
            "--out",
            str(out),
            "--resume",
        ]
    )
    assert result.returncode == EXIT_NUMERICAL_FAULT, result.stderr[-2000:]
    assert "3 consecutive steps had non-finite gradients" in result.stderr
    assert "step_00000002" in result.stderr
    assert [p.name for p in checkpoint_lib.list_checkpoints(out)] == ["step_00000002"]
    after = _weights(out / "checkpoints" / "step_00000002")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    out = tmp_path / "run"
    first = _train(["--steps", "2", "--out", str(out)])
    assert first.returncode == 0, first.stderr[-2000:]
    # Poison one weight of the saved model (a valid file, as a bad update would leave it).
    checkpoint = out / "checkpoints" / "step_00000002"
    weights = load_file(str(checkpoint / "model.safetensors"))
    name = next(iter(weights))
    weights[name].view(-1)[0] = float("inf")
    save_file(weights, str(checkpoint / "model.safetensors"))
    before = sorted(p.name for p in checkpoint.iterdir())
    result = _train(["--steps", "4", "--out", str(out), "--resume"])
    assert result.returncode == EXIT_NUMERICAL_FAULT, result.stderr[-2000:]
    assert "not saving the checkpoint of step 4" in result.stderr
    assert f"model.{name}" in result.stderr and "step_00000002" in result.stderr
    assert [p.name for p in checkpoint_lib.list_checkpoints(out)] == ["step_00000002"]
    assert sorted(p.name for p in checkpoint.iterdir()) == before


@pytest.mark.slow
def test_resume_with_another_batch_size_or_seed_is_refused(tmp_path):
    out = tmp_path / "run"
    assert _train(["--steps", "2", "--out", str(out)]).returncode == 0
    before = _weights(out / "checkpoints" / "step_00000002")
    for option, value in (("--batch-size", "16"), ("--seed", "7")):
        result = _train(["--steps", "4", option, value, "--out", str(out), "--resume"])
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"{option} " in result.stderr and "Resume with the original value" in result.stderr
    assert [p.name for p in checkpoint_lib.list_checkpoints(out)] == ["step_00000002"]
    after = _weights(out / "checkpoints" / "step_00000002")
    assert all(torch.equal(before[k], after[k]) for k in before)


# A disk that fills up during training: the run writes its first checkpoint, then the file size
# limit drops below the size of model.safetensors (SIGXFSZ ignored, so the write fails with EFBIG
# exactly as a full disk fails with ENOSPC).
_LIMITED_TRAIN = textwrap.dedent(
    """
    import resource, runpy, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
    sys.argv = [sys.argv[2], *sys.argv[3:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


@pytest.mark.slow
def test_a_full_disk_during_training_exits_4_with_the_previous_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    assert _train(["--steps", "2", "--out", str(out)]).returncode == 0
    checkpoint = out / "checkpoints" / "step_00000002"
    before = _weights(checkpoint)
    limit = (checkpoint / "model.safetensors").stat().st_size // 2
    result = subprocess.run(
        [sys.executable, "-c", _LIMITED_TRAIN, str(limit), TRAIN, *COMMON]
        + ["--steps", "4", "--out", str(out), "--resume"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert result.returncode == EXIT_WRITE_FAILED, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cannot save checkpoint step_00000004" in result.stderr
    assert "step_00000002 is intact" in result.stderr and "--resume" in result.stderr
    assert [p.name for p in checkpoint_lib.list_checkpoints(out)] == ["step_00000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name != "step_00000002"]
    checkpoint_lib.verify_checkpoint(checkpoint)
    after = _weights(checkpoint)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # With room again, --resume goes on from step 2.
    resumed = _train(["--steps", "4", "--out", str(out), "--resume"])
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout
