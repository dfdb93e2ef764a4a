"""Trainer runs for the tests, forked from a process that has imported the trainer once.

A `python fastsp/train.py` of a few tiny steps spends most of its CPU time importing torch,
torch._dynamo (torch.optim's constructor imports it) and fastsp; the fault tests start dozens of
them. `run` hands such a run to a server (tests/prefork_server.py, started in each test worker
at first use) that has done those imports once and forks a child per run. The child is a real
process, with its own pid, files and signal handlers (kill -9 kills it; `FASTSP_KILL_AT` works as
in a fresh one), running the same `fastsp/train.py` as `__main__` with the run's argv,
environment and working directory; `run` returns what `subprocess.run(..., capture_output=True,
text=True)` would. Python reads some variables only at import (TRITON_INTERPRET,
OMP_NUM_THREADS, PYTHONPATH, ...), so a forked child cannot change them: runs whose environments
differ in anything but the variables read only when used (`RUNTIME_NAMES`, `RUNTIME_PREFIXES`)
go to different servers; past `MAX_SERVERS` of those the least recently used one stops (a test
worker runs one test at a time, so none of its runs is in flight), and where fork is not
available runs start a fresh interpreter.

torchrun's agent is forked as a trainer run is, and its workers too (`torchrun`): the agent
starts a light stand-in per worker (tests/prefork_rank.py) that has a rank server fork the
worker with the stand-in's stdio, passes on the signals it gets and ends as the worker ends; the
worker dies with its stand-in.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = Path(__file__).with_name("prefork_server.py")
REPO = SERVER.parent.parent

# One server per kind (a trainer's, a dry run's with fake CUDA, or torchrun workers') and
# environment (what its imports read), kept in order of use, the least recently used first.
# Each holds an imported torch (about 0.5 GB resident, most of it shared) and costs about two
# fresh interpreters to start: a test worker needs one of each kind, and one more for each
# environment a test sets that imports read (TRITON_INTERPRET=0, say).
MAX_SERVERS = 8
_servers: dict[tuple[str, tuple[tuple[str, str], ...]], subprocess.Popen] = {}
_rank_sockets: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
RANK_STAND_IN = SERVER.with_name("prefork_rank.py")


# Variables that nothing reads at import, so that a child forked from a server may differ from
# it in them:
# - fastsp's runtime switches (FASTSP_KILL_AT, FASTSP_CACHE, ...), read when fastsp acts; the
#   name of the test pytest is running (another in every test); the servers' own;
# - what torchrun's agent gives each worker (torch.distributed.elastic's LocalElasticAgent), read
#   when the process group starts, and TORCH_NCCL_ASYNC_ERROR_HANDLING, read by ProcessGroupNCCL
#   when it is created; TORCH_DISABLE_SHARE_RDZV_TCP_STORE, read by the agent's rendezvous;
# - what libraries write into a test worker's own environment as its tests run, read when they
#   act: inductor's cache folder and its tensor-pointer handle (written at its first compile,
#   for its compile workers) and sklearn's KMP_ settings (written at its import, read by Intel's
#   OpenMP, which the Linux wheels of torch and sklearn do not load: both bundle GNU's libgomp).
# Without the last group, every test worker would start a new server of each kind after its
# first in-process compile or digits load.
RUNTIME_PREFIXES = ("FASTSP_", "PYTEST_CURRENT_TEST", "PREFORK_", "TORCHELASTIC_", "KMP_")
RUNTIME_NAMES = {
    *("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"),
    *("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE"),
    *("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"),
    *("TORCHINDUCTOR_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"),
}


def import_environment(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The part of `env` a server's imports may have read: all of it but the variables read
    only when used (RUNTIME_PREFIXES, RUNTIME_NAMES)."""
    return tuple(
        sorted(
            (k, v)
            for k, v in env.items()
            if not k.startswith(RUNTIME_PREFIXES) and k not in RUNTIME_NAMES
        )
    )


def _server_for(env: dict[str, str], kind: str) -> subprocess.Popen | None:
    """The running server of `kind` ("trainer", "dryrun" or "ranks") for `env`'s import
    environment, started where none runs (the least recently used stopped past MAX_SERVERS);
    None where fork is not available: run a fresh interpreter."""
    key = (kind, import_environment(env))
    if key in _servers and _servers[key].poll() is None:
        _servers[key] = _servers.pop(key)  # now the most recently used
        return _servers[key]
    if key in _servers:  # it has ended
        _stop_server(key)
    if not hasattr(os, "fork"):
        return None
    while len(_servers) >= MAX_SERVERS:
        _stop_server(next(iter(_servers)))
    options = {"trainer": [], "dryrun": ["--dryrun"]}.get(kind)
    if kind == "ranks":
        _rank_sockets[key] = os.path.join(tempfile.mkdtemp(prefix="prefork_"), "ranks")
        options = ["--ranks", _rank_sockets[key]]
    server = subprocess.Popen(
        [sys.executable, str(SERVER), *options],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(key[1]),
        cwd=REPO,
        text=True,
    )
    if json.loads(server.stdout.readline() or "{}").get("ready") is not True:
        raise RuntimeError("the prefork server did not start (its stderr says why)")
    _servers[key] = server
    return server


def torchrun(cmd: list[str], env: dict[str, str] | None = None) -> tuple[list[str], dict]:
    """`cmd` = [sys.executable, "-m", "torch.distributed.run", OPTIONS..., SCRIPT or -m MODULE,
    ARGS...] with its workers forked from a rank server (tests/prefork_rank.py stands in for
    each towards torchrun's agent): the command and environment to start it with. Options
    written `--name value` or `--no-python`, or no room for a server: `cmd` and `env` as given."""
    env = dict(os.environ if env is None else env)
    cmd = [os.fspath(part) for part in cmd]
    if cmd[:3] != [sys.executable, "-m", "torch.distributed.run"]:
        return cmd, env
    options, module, nproc, at = [], False, 1, 3
    while at < len(cmd) and cmd[at].startswith("-"):
        option = cmd[at]
        if option in ("-m", "--module"):
            module = True
        elif "=" in option:
            name, value = option.split("=", 1)
            if name in ("--nproc_per_node", "--nproc-per-node"):
                nproc = int(value) if value.isdigit() else 1
            options.append(option)
        elif option == "--standalone":
            options.append(option)
        else:  # a value in the next word, or a mode the stand-in does not play
            return cmd, env
        at += 1
    worker = dict(env)
    if nproc > 1:  # what torch.distributed.run sets for its workers when the caller has not
        worker.setdefault("OMP_NUM_THREADS", "1")
    server = _server_for(worker, "ranks")
    if server is None:
        return cmd, env
    socket_path = _rank_sockets[("ranks", import_environment(worker))]
    target = ["-m", *cmd[at:]] if module else cmd[at:]
    return [*cmd[:3], *options, str(RANK_STAND_IN), *target], {
        **env,
        "PREFORK_RANK_SOCKET": socket_path,
    }


def _stop_server(key) -> None:
    server = _servers.pop(key)
    if server.poll() is None:
        server.stdin.close()
        server.wait(timeout=30)
    if key in _rank_sockets:
        shutil.rmtree(os.path.dirname(_rank_sockets.pop(key)), ignore_errors=True)


@atexit.register
def _stop() -> None:
    while _servers:
        _stop_server(next(iter(_servers)))


def _forked_module(module: str) -> bool:
    """fastsp's commands and torchrun's agent (torch.distributed.run, which then starts its
    workers' stand-ins) are forked; other modules start fresh."""
    return module.split(".")[0] == "fastsp" or module == "torch.distributed.run"


def _dry_run_code(code: str) -> bool:
    """Source whose first import past the standard library is the dry run's: it registers fake
    CUDA before torch loads, which a dry-run server has done the same way."""
    for line in code.splitlines():
        if line.startswith(("import ", "from ")):
            module = line.split()[1]
            if module.split(".")[0] not in sys.stdlib_module_names:
                return module == "fastsp.dryrun"
    return False


def _answer(server: subprocess.Popen, deadline: float) -> dict:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select([server.stdout], [], [], left)
        if ready:
            line = server.stdout.readline()
            if not line:
                raise RuntimeError("the prefork server ended")
            return json.loads(line)


def run(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd=None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)`
    for `cmd` = [sys.executable, script.py, ...], [sys.executable, "-m", "fastsp...", ...] or a dry
    run's [sys.executable, "-c", code importing fastsp.dryrun first, ...], forked from the
    server of its kind when the environment allows; a torchrun command (`torchrun`) with its
    workers forked; any other command runs as subprocess.run."""
    env = dict(os.environ if env is None else env)
    cwd = os.fspath(cwd) if cwd is not None else os.getcwd()
    cmd, env = torchrun(cmd, env)  # torchrun's workers fork from a rank server
    if cmd[0] == sys.executable and len(cmd) > 2 and cmd[1] == "-m" and _forked_module(cmd[2]):
        target = {"module": cmd[2], "argv": cmd[3:]}
        kind = "dryrun" if cmd[2] == "fastsp.dryrun" else "trainer"
    elif cmd[0] == sys.executable and len(cmd) > 1 and cmd[1].endswith(".py"):
        target = {"script": os.path.join(cwd, cmd[1]), "argv": cmd[2:]}
        script = Path(target["script"])
        dry_run = script.is_file() and _dry_run_code(script.read_text())
        kind = "dryrun" if dry_run else "trainer"
    elif cmd[:2] == [sys.executable, "-c"] and len(cmd) > 2 and _dry_run_code(cmd[2]):
        target, kind = {"code": cmd[2], "argv": cmd[3:]}, "dryrun"
    else:
        target = None
    server = _server_for(env, kind) if target is not None else None
    if server is None:
        return subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
        )
    with tempfile.TemporaryDirectory(prefix="prefork_") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        request = {**target, "env": env, "cwd": cwd, "stdout": str(out), "stderr": str(err)}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        deadline = time.monotonic() + timeout
        pid = _answer(server, deadline)["pid"]
        try:
            returncode = _answer(server, deadline)["returncode"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            _answer(server, time.monotonic() + 30)
            raise subprocess.TimeoutExpired(cmd, timeout) from None
        return subprocess.CompletedProcess(cmd, returncode, out.read_text(), err.read_text())
