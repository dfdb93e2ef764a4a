"""The forked runs many tests use (tests/prefork.py) are the runs a fresh interpreter makes."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import prefork
import pytest
from safetensors.torch import load_file
from test_reliability import _rank_pid

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


# A run that says where it came from, then waits for SIGTERM (exit 75)
WAITER = """
import json, os, signal, sys, time
print("on stdout"); print("on stderr", file=sys.stderr)
signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(75))
said = {"pid": os.getpid(), "group": os.getpgid(0), "forked": "fastsp.train" in sys.modules}
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(said, f)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(0.05)
"""
FORKED = "import sys; print('fastsp.train' in sys.modules)"


def test_a_started_run_is_a_forked_popen_and_its_server_takes_no_other_run(tmp_path):
    # prefork.start stands for subprocess.Popen: the pid is the run's own, in a process group
    # of its own with start_new_session; a run asked for meanwhile starts fresh, and the server
    # forks again once the started run has ended
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    waiter, said = tmp_path / "waiter.py", tmp_path / "said.json"
    waiter.write_text(WAITER)
    (tmp_path / "forked.py").write_text(FORKED)
    asks = [sys.executable, str(tmp_path / "forked.py")]
    assert prefork.run(asks, env=env).stdout == "True\n"  # its server is up
    process = prefork.start(
        [sys.executable, str(waiter), str(said)], env=env, start_new_session=True
    )
    for _ in range(1200):
        if said.exists() or process.poll() is not None:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    own = {"pid": process.pid, "group": process.pid, "forked": True}
    assert json.loads(said.read_text()) == own
    assert prefork.run(asks, env=env).stdout == "False\n"  # fresh: the server is busy
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=0.1)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.communicate(timeout=60) == ("on stdout\n", "on stderr\n")
    assert process.returncode == 75 and process.poll() == 75
    assert prefork.run(asks, env=env).stdout == "True\n"


# A torchrun worker that says where it came from: forked workers have the trainer imported
WORKER = """
import json, os, signal, sys, time
seen = sys.argv[1]
rank = os.environ["RANK"]
said = {"pid": os.getpid(), "forked": "fastsp.train" in sys.modules, "argv": sys.argv[2:]}
print(f"rank {rank} on stdout"); print(f"rank {rank} on stderr", file=sys.stderr)
def stop(number, frame):
    open(os.path.join(seen, f"stopped{rank}"), "w").close()
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
with open(os.path.join(seen, f"{rank}.json.tmp"), "w") as f:
    json.dump(said, f)
os.replace(os.path.join(seen, f"{rank}.json.tmp"), os.path.join(seen, f"{rank}.json"))
if sys.argv[2] == "wait":
    while True:
        time.sleep(0.05)
if rank == "1":  # exit 3 only once rank 0 has said its piece: torchrun then stops the others
    for _ in range(1200):
        if os.path.exists(os.path.join(seen, "0.json")):
            break
        time.sleep(0.05)
sys.exit(int(rank) * 3)
"""


def _worker_run(tmp_path, name, mode):
    seen = tmp_path / name
    seen.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return seen, [*torchrun, "--nproc_per_node=2", str(script), str(seen), mode]


def _said(seen, rank, deadline=60):
    path = seen / f"{rank}.json"
    for _ in range(deadline * 20):
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never started")


@pytest.mark.slow
def test_torchrun_workers_are_forked_and_their_stand_ins_pass_on_output_and_status(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    seen, cmd = _worker_run(tmp_path, "exit", "exit")
    result = prefork.run(cmd, env=env, cwd=tmp_path)
    for rank in (0, 1):
        said = _said(seen, rank, deadline=1)
        assert said["forked"] and said["argv"] == ["exit"]
        assert f"rank {rank} on stdout" in result.stdout
        assert f"rank {rank} on stderr" in result.stderr
    # rank 1 exits 3: torchrun sees that status and names it
    assert result.returncode != 0
    assert re.search(r"exitcode\s*:\s*3", result.stderr), result.stderr[-3000:]
    # an environment the server's imports did not read: the workers start fresh, and work
    cmd, environment = prefork.torchrun(cmd, env)
    seen, cmd[-2] = tmp_path / "fresh", str(tmp_path / "fresh")
    seen.mkdir()
    environment["PYTHONHASHSEED"] = "1"
    fresh = subprocess.run(cmd, capture_output=True, text=True, env=environment, timeout=120)
    assert not _said(seen, 0, deadline=1)["forked"] and fresh.returncode != 0


@pytest.mark.slow
def test_a_torchrun_worker_gets_its_stand_ins_signals_and_dies_with_it(tmp_path):
    seen, cmd = _worker_run(tmp_path, "wait", "wait")
    cmd, env = prefork.torchrun(cmd, {**os.environ, "OMP_NUM_THREADS": "1"})
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        workers = {rank: _said(seen, rank)["pid"] for rank in (0, 1)}
        by_rank = {rank: _rank_pid(agent.pid, rank) for rank in (0, 1)}  # the agent's children
        assert not set(by_rank.values()) & set(workers.values())
        os.kill(by_rank[0], 9)  # the stand-in killed: its worker goes with it
        for _ in range(200):
            if not Path(f"/proc/{workers[0]}").exists() or _zombie(workers[0]):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the worker outlived its stand-in")
        # torchrun then stops rank 1 with SIGTERM, which its stand-in passes on: it exits 75
        _, stderr = agent.communicate(timeout=120)
    finally:
        agent.kill()
    assert (seen / "stopped1").exists() and not (seen / "stopped0").exists()
    assert agent.returncode != 0, stderr[-3000:]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True
