"""The forked runs many tests use (tests/prefork.py) are the runs a fresh interpreter makes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import prefork
import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "fastsp" / "train.py")
ARGS = ["--preset", "tiny", "--device", "cpu", "--batch-size", "4", "--steps", "2"]
ARGS += ["--log-every", "1", "--sample-every", "0", "--deterministic"]


def _fresh(cmd, env):
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_a_forked_run_writes_what_a_fresh_interpreter_writes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, run in (("fresh", _fresh), ("forked", prefork.run)):
        out = tmp_path / name
        result = run([sys.executable, TRAIN, *ARGS, "--out", str(out)], env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[name] = (result, out / "checkpoints" / "step_00000002")
    (fresh, fresh_dir), (forked, forked_dir) = runs["fresh"], runs["forked"]
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(fresh_dir / file), load_file(forked_dir / file)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    # the same lines, losses included, but for the run folder and the measured speed
    def _same(text):
        return re.sub(r"[\d.]+ images/s", "", text.replace(str(tmp_path / "forked"), "RUN"))

    assert _same(forked.stdout) == _same(fresh.stdout.replace(str(tmp_path / "fresh"), "RUN"))


@pytest.mark.slow
def test_exit_statuses_and_messages_are_a_fresh_interpreters(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = [sys.executable, TRAIN, "--preset", "nope"]
    fresh, forked = _fresh(bad, env), prefork.run(bad, env=env, cwd=REPO)
    assert forked.returncode == fresh.returncode == 2
    assert forked.stderr == fresh.stderr
    module = [sys.executable, "-m", "fastsp.train", "--help"]  # `python -m`: the module as main
    assert prefork.run(module, env=env, cwd=REPO).stdout == _fresh(module, env).stdout
    killed = prefork.run(
        [sys.executable, TRAIN, *ARGS, "--out", str(tmp_path / "k")],
        env={**env, "FASTSP_KILL_AT": "step:1"},  # a runtime switch: the same server serves it
        cwd=REPO,
    )
    assert killed.returncode == -9


@pytest.mark.slow
def test_a_forked_dry_run_prints_what_a_fresh_one_prints():
    # the dry-run server registers fake CUDA before torch, as `python -m fastsp.dryrun` does;
    # its children print the same figures (but for the CPU seconds they took), and a `-c`
    # script importing the dry run first is served the same way
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dry = [sys.executable, "-m", "fastsp.dryrun", "--preset", "dit_tiny", "--batch-size", "4"]
    fresh, forked = _fresh(dry, env), prefork.run(dry, env=env, cwd=REPO)
    assert fresh.returncode == forked.returncode == 0, forked.stderr[-2000:]

    def _same(text):
        return re.sub(r"\d+ s on this CPU", "", text)

    assert "FLOP per step" in fresh.stdout and _same(forked.stdout) == _same(fresh.stdout)
    script = "import sys\nimport fastsp.dryrun as dryrun\nsys.exit(dryrun.main(sys.argv[1:]))\n"
    scripted = prefork.run([sys.executable, "-c", script, *dry[3:]], env=env, cwd=REPO)
    assert scripted.returncode == 0 and _same(scripted.stdout) == _same(fresh.stdout)
