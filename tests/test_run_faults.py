"""Faults of the run folder and of a run's start, with real processes and files (issue 14).

Two trainers on one folder, a scheduler's SIGTERM to the whole process group, signals during the
start, a resume that would change what the run learns, config.json files with missing, unknown
or mistyped fields, output paths that cannot be written, a checkpoint this user may not read,
and the extras (grids, comparisons, evaluations) that must never cost the training. Each ends in
its documented exit status with nothing lost and nothing half-made.
"""

import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import prefork
import pytest
from PIL import Image
from test_reliability import (
    COMMON,
    EXIT_PREEMPTED,
    EXIT_WRITE_FAILED,
    TRAIN,
    _env,
    _metrics,
    _start,
    _train,
    _wait_for_steps,
)

from fastsp import checkpoint as checkpoint_lib
from fastsp import config as config_lib
from fastsp import evaluate, pipeline, sample
from fastsp import train as train_cli
from fastsp.config import TrainConfig
from fastsp.data_stream import _init_worker
from fastsp.run_folder import RunLock
from fastsp.training.resume import show_pair

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--device", "cpu"]


def _main(argv, out: Path) -> int:
    return train_cli.main([*TINY, *argv, "--out", str(out)])


def _files(folder: Path) -> dict[str, bytes | None]:
    """Every file under `folder` with its bytes (the lock file's pid aside)."""
    return {
        str(p.relative_to(folder)): None if p.name == ".lock" else p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run of 2 steps (in-process), to copy."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert _main(["--steps", "2"], out) == 0
    return out


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _unprivileged(cmd: list[str]) -> list[str]:
    """`cmd` without the root's power to read and write anything: as root, under setpriv without
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so that file modes apply as to any user."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot apply")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return prefork.run(cmd, env=_env(), timeout=300)


# ---------------------------------------------------------------------------------------------
# Item 1: one run per folder


@pytest.mark.slow
def test_a_second_trainer_on_a_running_folder_exits_2_and_touches_nothing(tmp_path):
    out = tmp_path / "run"
    args = ["--checkpoint-every", "2", "--keep-last", "2", "--out", str(out), "--resume"]
    first = _start([sys.executable, TRAIN, *COMMON, "--steps", "100000", *args])
    try:
        _wait_for_steps(out, first, 2)
        config_before = (out / "config.json").read_bytes()
        second = _train(["--steps", "30", "--lr", "5e-4", *args])
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"{out} is in use by another run (pid {first.pid}" in second.stderr
        assert (out / "config.json").read_bytes() == config_before  # still the first run's
    finally:
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == EXIT_PREEMPTED, stderr[-2000:]
    steps = [m["step"] for m in _metrics(out)]
    assert steps == list(range(1, len(steps) + 1))  # no line lost, none rewritten
    checkpoint_lib.verify_checkpoint(checkpoint_lib.latest_checkpoint(out))
    # that the lock goes with its process, however it ends: the kill -9 in the next test


# ---------------------------------------------------------------------------------------------
# Item 2: SIGTERM to the whole process group, with DataLoader workers


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_checkpoints_and_exits_75(tmp_path):
    data = _image_folder(tmp_path / "images")
    out = tmp_path / "run"
    args = ["--data", str(data), "--num-workers", "2", "--checkpoint-every", "0"]
    args += ["--out", str(out), "--resume"]
    process = prefork.start(
        [sys.executable, TRAIN, *COMMON, *args, "--steps", "100000"],
        env=_env(),
        start_new_session=True,  # its own process group, as a scheduler's job has
    )
    _wait_for_steps(out, process, 2)
    os.killpg(process.pid, signal.SIGTERM)  # the trainer and both workers
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr
    checkpoint = checkpoint_lib.latest_checkpoint(out)
    checkpoint_lib.verify_checkpoint(checkpoint)
    stopped = checkpoint_lib.read_state(checkpoint)["step"]
    # kill -9 of the trainer alone: its workers outlive it for a moment, and must not keep the
    # folder locked for the restart that follows at once.
    steps = ["--steps", str(stopped + 2)]
    killed = _train([*args, *steps], FASTSP_KILL_AT=f"step:{stopped + 1}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _train([*args, *steps])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"step {stopped})" in resumed.stdout


def _worker(ready) -> None:
    _init_worker(0)  # what the DataLoader runs first in each worker
    ready.set()
    time.sleep(60)


def test_a_forked_worker_lets_go_of_the_run_lock_and_ignores_sigterm(tmp_path):
    lock = RunLock.acquire(tmp_path)
    context = multiprocessing.get_context("fork")  # the DataLoader's on Linux
    ready = context.Event()
    worker = context.Process(target=_worker, args=(ready,))
    worker.start()
    try:
        assert ready.wait(30)
        lock.release()
        RunLock.acquire(tmp_path).release()  # free, though the worker lives on
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(1)
        assert worker.is_alive()  # the signal is the trainer's to answer
    finally:
        worker.kill()
        worker.join()


# ---------------------------------------------------------------------------------------------
# Item 16: a signal at any moment of the start


def _caught(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_start_exits_75_and_leaves_no_folder(tmp_path, sig):
    out = tmp_path / "run"
    # a fresh interpreter, not one forked from a server: the signal may come during its imports
    process = subprocess.Popen(
        [sys.executable, TRAIN, *COMMON, "--steps", "5", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    deadline = time.time() + 60
    # SIGTERM caught: the entry point's handlers are in (torch is not imported yet)
    while not _caught(process.pid) & (1 << (signal.SIGTERM - 1)):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.005)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "before training started; nothing was written" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Item 3: every combination checked before the work; the checkpoint before the extras


def test_guidance_for_an_unconditional_model_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main(["--cond", "none", "--sample-cfg", "3"], tmp_path / "run")
    assert exit_info.value.code == 2
    assert "--cond none trains an unconditional one" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_final_checkpoint_is_written_before_the_sample_grid(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "samples").write_text("a file where the grids' folder belongs")
    assert _main(["--steps", "2"], out) == EXIT_WRITE_FAILED
    assert "cannot write" in capsys.readouterr().err
    checkpoint_lib.verify_checkpoint(out / "checkpoints" / "step_00000002")


def test_pipeline_checks_the_comparison_and_the_stage_2_seed_before_stage_1(tmp_path, capsys):
    out = tmp_path / "pipeline"
    base = ["--preset", "tiny", "--device", "cpu", "--out", str(out)]
    assert pipeline.main([*base, "--compare-steps", "1001"]) == 2
    assert "--compare-steps 1001 is more than the 1000 timesteps" in capsys.readouterr().err
    assert pipeline.main([*base, "--seed", str(config_lib.MAX_SEED)]) == 2
    err = capsys.readouterr().err
    assert "seed + 1 = 4294967296" in err and f"--seed {config_lib.MAX_SEED - 1} or less" in err
    assert not out.exists()


def test_evaluate_checks_its_out_before_sampling(run_dir, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    argv = ["--checkpoint", str(run_dir), "--num", "8", "--steps", "2", "--out", str(folder)]
    assert evaluate.main(argv) == 2
    assert f"--out {folder} is a folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == [] and not list(run_dir.rglob("eval_*"))


# ---------------------------------------------------------------------------------------------
# Item 6: a resume may not change what the run learns


def test_every_training_field_has_a_resume_rule():
    rules = {f.name: f.metadata.get("resume") for f in dataclasses.fields(TrainConfig)}
    assert None not in rules.values(), [name for name, rule in rules.items() if rule is None]
    assert set(rules.values()) == {"same", "may change", "said"}


def test_a_resume_that_changes_the_run_is_refused_listing_every_difference(run_dir, capsys):
    before = _files(run_dir)
    changes = {
        ("--prediction-type", "x0"): "--prediction-type x0 (checkpoint: v)",
        ("--num-timesteps", "50"): "--num-timesteps 50 (checkpoint: 1000)",
        ("--beta-schedule", "linear"): "--beta-schedule linear (checkpoint: scaled_linear)",
        ("--data", "synthetic"): "--data synthetic (checkpoint: digits)",
        ("--adam-beta2", "0.99"): "--adam-beta2 0.99 (checkpoint: 0.999)",
        ("--base-channels", "32"): "--base-channels 32 (checkpoint: 16)",
    }
    argv = [word for option in changes for word in option]
    assert _main(["--steps", "4", "--resume", *argv], run_dir) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    for shown in changes.values():
        assert shown in err, err
    assert "Resume with the original values" in err and "--init" in err
    assert _files(run_dir) == before


def test_a_resume_may_change_the_learning_rate_and_says_so(run_dir, capsys):
    assert _main(["--steps", "3", "--resume", "--lr", "5e-4", "--log-every", "1"], run_dir) == 0
    assert "--lr 0.0005 from here on (the checkpoint's: 0.001)" in capsys.readouterr().out
    assert _metrics(run_dir)[-1]["lr"] == 5e-4


def test_a_resume_past_steps_has_nothing_to_do_and_leaves_the_folder_unchanged(run_dir, capsys):
    before = _files(run_dir)
    assert _main(["--steps", "1", "--resume"], run_dir) == 0
    assert "nothing to do" in capsys.readouterr().out  # item 22
    assert _files(run_dir) == before


# ---------------------------------------------------------------------------------------------
# Items 14 and 19: config.json through one reader, typed


def _edit_config(file: Path, edit) -> None:
    values = json.loads(file.read_text())
    edit(values)
    file.write_text(json.dumps(values))


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda v: v["train"].pop("batch_size"), "lacks the training fields ['batch_size']"),
        (lambda v: v["train"].pop("resolution"), "lacks the training fields ['resolution']"),
        (lambda v: v["model"].pop("head_dim"), "lacks the model fields ['head_dim']"),
        (lambda v: v["model"].update(heads=4), "unknown model fields ['heads']"),
        (lambda v: v["train"].update(batch_size="8"), "invalid value '8' for batch_size"),
        (lambda v: v["model"].update(base_channels="16"), "invalid value '16' for base_channels"),
    ],
)
def test_resume_and_sample_refuse_the_same_config_json_naming_the_field(
    run_dir, tmp_path, capsys, edit, needle
):
    file = run_dir / "checkpoints" / "step_00000002" / "config.json"
    _edit_config(file, edit)
    before = _files(run_dir)
    assert _main(["--steps", "4", "--resume"], run_dir) == 2
    resume_err = capsys.readouterr().err
    grid = tmp_path / "grid.png"
    assert sample.main(["--checkpoint", str(run_dir), "--out", str(grid), "--num", "1"]) == 2
    sample_err = capsys.readouterr().err
    for err in (resume_err, sample_err):
        assert f"{file}" in err and needle in err and len(err.splitlines()) == 1, err
    assert _files(run_dir) == before and not grid.exists()


def test_a_config_json_from_before_the_added_options_resumes_and_samples(run_dir, tmp_path):
    # Options added after runs were written (the flow process, LoRA, FSDP2) default to what those
    # runs did; a config.json without them reads as their defaults. Any other field stays required.
    added = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["absent_is_default"]]
    assert {"diffusion", "lora_rank", "parallel"} <= set(added)
    for file in [run_dir / "config.json", *run_dir.glob("checkpoints/*/config.json")]:
        _edit_config(file, lambda v: [v["train"].pop(name) for name in added])
    grid = tmp_path / "grid.png"
    assert sample.main(["--checkpoint", str(run_dir), "--out", str(grid), "--num", "1"]) == 0
    assert _main(["--steps", "3", "--resume"], run_dir) == 0
    resumed = json.loads((run_dir / "checkpoints" / "step_00000003" / "config.json").read_text())
    assert resumed["train"]["diffusion"] == "ddpm" and resumed["train"]["lora_rank"] == 0


def test_a_hand_edited_run_config_is_refused_not_overwritten(run_dir, capsys):
    file = run_dir / "config.json"
    _edit_config(file, lambda v: v["train"].update(lr="fast", speed=3))
    before = file.read_bytes()
    assert _main(["--steps", "4", "--resume"], run_dir) == 2
    assert file.read_bytes() == before
    assert f"{file} has unknown training fields ['speed']" in capsys.readouterr().err
    _edit_config(file, lambda v: v["train"].pop("speed"))
    assert _main(["--steps", "4", "--resume"], run_dir) == 2
    assert "invalid value 'fast' for lr" in capsys.readouterr().err
    assert json.loads(file.read_text())["train"]["lr"] == "fast"  # as the user left it


def test_values_of_different_types_show_their_types():
    assert show_pair(8, "8") == "8 (int; checkpoint: '8', str)"
    assert show_pair(16, 16.0) == "16 (checkpoint: 16.0)"  # a JSON number is one type
    assert show_pair("x0", "v") == "x0 (checkpoint: v)"


# ---------------------------------------------------------------------------------------------
# Items 17 and 18: paths that cannot be written or read


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda tmp: (tmp / "f").write_text("x") and tmp / "f", "is a file, not a folder"),
        (lambda tmp: (tmp / "f").write_text("x") and tmp / "f" / "run", "is a file, not a folder"),
        (lambda tmp: tmp / ("a" * 300) / "run", "is 300 bytes long, over the 255"),
    ],
)
def test_an_unusable_out_is_invalid_input_saying_what_is_wrong(tmp_path, capsys, make, needle):
    out = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(_main(["--steps", "2"], out))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and needle in err and "--resume" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_read_only_out_is_invalid_input(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = _run(_unprivileged([sys.executable, TRAIN, *TINY, "--out", str(folder / "r")]))
    finally:
        folder.chmod(0o755)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot write in {folder} (permission denied" in result.stderr
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_an_unreadable_newest_checkpoint_is_never_called_damaged(run_dir):
    newest = run_dir / "checkpoints" / "step_00000002"
    for target, mode in ((newest / "model.safetensors", 0o000), (newest, 0o000)):
        target.chmod(mode)
        try:
            argv = [*TINY, "--steps", "4", "--resume", "--out", str(run_dir)]
            result = _run(_unprivileged([sys.executable, TRAIN, *argv]))
        finally:
            target.chmod(0o755 if target.is_dir() else 0o644)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "cannot be read: permission denied" in result.stderr
        assert "damaged" not in result.stderr and "Delete" not in result.stderr
    checkpoint_lib.verify_checkpoint(newest)


# ---------------------------------------------------------------------------------------------
# Item 21: an interval without a finite step logs null


def test_metrics_of_an_all_skipped_interval_are_null(tmp_path):
    data = tmp_path / "latents"
    data.mkdir()
    np.save(data / "shard0.npy", np.full((8, 1, 8, 8), np.nan, dtype=np.float32))
    out = tmp_path / "run"
    argv = ["--data", str(data), "--cond", "none", "--steps", "2", "--log-every", "1"]
    assert _main(argv, out) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    for line in lines:
        assert '"loss": null' in line and '"grad_norm": null' in line
        assert json.loads(line)["skipped_steps"] == 1
