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
starts a light stand-in per worker (tests/prefork_rank.py) that has the trainer server fork the
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

# One server per kind (a trainer's, which forks torchrun's workers too, or a dry run's with fake
# CUDA) and environment (what its imports read), kept in order of use, the least recently used
# first.
# Each holds an imported torch (about 0.5 GB resident, most of it shared) and costs about two
# fresh interpreters to start: a test worker needs one of each kind, and one more for each
# environment a test sets that imports read (TRITON_INTERPRET=0, say).
MAX_SERVERS = 8
_servers: dict[tuple[str, tuple[tuple[str, str], ...]], subprocess.Popen] = {}
_busy: dict[tuple[str, tuple[tuple[str, str], ...]], ForkedProcess] = {}  # a `start` child runs
_rank_sockets: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}  # each server's
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


def _server_for(env: dict[str, str], kind: str, free: bool = True) -> subprocess.Popen | None:
    """The running server of `kind` ("trainer" or "dryrun") for `env`'s import environment,
    started where none runs (the least recently used stopped past MAX_SERVERS); None where fork
    is not available, or where `free` asks for a server that takes a run on stdin and that
    server's child of `start` still runs: run a fresh interpreter."""
    key = (kind, import_environment(env))
    if free and key in _busy:
        return None
    if key in _servers and _servers[key].poll() is None:
        _servers[key] = _servers.pop(key)  # now the most recently used
        return _servers[key]
    if key in _servers:  # it has ended
        _stop_server(key)
    if not hasattr(os, "fork"):
        return None
    while len(_servers) >= MAX_SERVERS:
        _stop_server(next(iter(_servers)))
    _rank_sockets[key] = os.path.join(tempfile.mkdtemp(prefix="prefork_"), "ranks")
    options = ["--dryrun"] if kind == "dryrun" else []
    server = subprocess.Popen(
        [sys.executable, str(SERVER), *options, _rank_sockets[key]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(key[1]),
        cwd=REPO,
        text=True,
    )
    try:
        ready = _answer(server, None)
    except RuntimeError:
        ready = {}
    if ready.get("ready") is not True:
        raise RuntimeError("the prefork server did not start (its stderr says why)")
    _servers[key] = server
    return server


def torchrun(cmd: list[str], env: dict[str, str] | None = None) -> tuple[list[str], dict]:
    """`cmd` = [sys.executable, "-m", "torch.distributed.run", OPTIONS..., SCRIPT or -m MODULE,
    ARGS...] with its workers forked from the trainer server of their environment
    (tests/prefork_rank.py stands in for each towards torchrun's agent): the command and
    environment to start it with. Options written `--name value` or `--no-python`, or no room
    for a server: `cmd` and `env` as given."""
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
    if _server_for(worker, "trainer", free=False) is None:
        return cmd, env
    socket_path = _rank_sockets[("trainer", import_environment(worker))]
    target = ["-m", *cmd[at:]] if module else cmd[at:]
    return [*cmd[:3], *options, str(RANK_STAND_IN), *target], {
        **env,
        "PREFORK_RANK_SOCKET": socket_path,
    }


def _stop_server(key) -> None:
    server = _servers.pop(key)
    if key in _busy:  # a child of `start` left running (its test failed): it goes first
        _busy.pop(key).kill()
    if server.poll() is None:
        server.stdin.close()
        server.wait(timeout=30)
    _pending.pop(server.stdout.fileno(), None)  # unread answers, never a later server's
    server.stdout.close()
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


# Answer bytes read from each server's stdout past its last whole line. The pipe is read
# directly: a buffered reader could hold a second answer (a run's end right after its start)
# where select() no longer sees it.
_pending: dict[int, bytes] = {}


def _answer(server: subprocess.Popen, deadline: float | None) -> dict | None:
    """The server's next answer; None where none is whole by `deadline` (None: no limit)."""
    fd = server.stdout.fileno()
    while b"\n" not in _pending.get(fd, b""):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            raise RuntimeError("the prefork server ended")
        _pending[fd] = _pending.get(fd, b"") + chunk
    line, _, _pending[fd] = _pending[fd].partition(b"\n")
    return json.loads(line)


class ForkedProcess:
    """What the tests use of a subprocess.Popen(cmd, stdout=PIPE, stderr=PIPE, text=True) (pid,
    poll, wait, send_signal, communicate, returncode) for a run forked from a server. Its
    output goes to files, read when it has ended. Its server takes no other run meanwhile:
    one started then runs fresh (`_server_for`)."""

    def __init__(self, args: list[str], key, server: subprocess.Popen, request: dict):
        self.args, self.returncode = args, None
        self._key, self._server = key, server
        self._folder = tempfile.TemporaryDirectory(prefix="prefork_")
        self._files = [os.path.join(self._folder.name, name) for name in ("stdout", "stderr")]
        request = {**request, "stdout": self._files[0], "stderr": self._files[1]}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        self.pid = _answer(server, None)["pid"]
        _busy[key] = self
        self._output: tuple[str, str] | None = None

    def poll(self) -> int | None:
        self._ended_by(0)
        return self.returncode

    def _ended_by(self, timeout: float | None) -> bool:
        if self.returncode is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            answer = _answer(self._server, deadline)
            if answer is None:
                return False
            self.returncode = answer["returncode"]
            del _busy[self._key]
        return True

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended_by(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # as Popen: never a pid that may have been reused
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        if self._output is None:
            self._output = tuple(Path(f).read_text() for f in self._files)
            self._folder.cleanup()
        return self._output


def _forked_target(cmd: list[str], cwd: str) -> tuple[dict, str] | None:
    """What a server runs for `cmd` and the kind of server that runs it; None: run it fresh."""
    if cmd[0] == sys.executable and len(cmd) > 2 and cmd[1] == "-m" and _forked_module(cmd[2]):
        kind = "dryrun" if cmd[2] == "fastsp.dryrun" else "trainer"
        return {"module": cmd[2], "argv": cmd[3:]}, kind
    if cmd[0] == sys.executable and len(cmd) > 1 and cmd[1].endswith(".py"):
        script = Path(cwd, cmd[1])
        dry_run = script.is_file() and _dry_run_code(script.read_text())
        return {"script": str(script), "argv": cmd[2:]}, "dryrun" if dry_run else "trainer"
    if cmd[:2] == [sys.executable, "-c"] and len(cmd) > 2 and _dry_run_code(cmd[2]):
        return {"code": cmd[2], "argv": cmd[3:]}, "dryrun"
    return None


def start(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd=None, start_new_session=False
) -> ForkedProcess | subprocess.Popen:
    """`subprocess.Popen(cmd, stdout=PIPE, stderr=PIPE, text=True, env=env, cwd=cwd,
    start_new_session=start_new_session)` for the commands `run` forks, forked from the server
    of its kind where one is free (a ForkedProcess); a torchrun command with its workers forked;
    any other command as subprocess.Popen."""
    env = dict(os.environ if env is None else env)
    cwd = os.fspath(cwd) if cwd is not None else os.getcwd()
    cmd, env = torchrun(cmd, env)  # its workers from a trainer server
    target = _forked_target(cmd, cwd)
    server = _server_for(env, target[1]) if target is not None else None
    if server is None:
        return subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
            start_new_session=start_new_session,
        )
    request = {**target[0], "env": env, "cwd": cwd, "new_session": start_new_session}
    return ForkedProcess(cmd, (target[1], import_environment(env)), server, request)


def run(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd=None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)`
    for `cmd` = [sys.executable, script.py, ...], [sys.executable, "-m", "fastsp...", ...],
    torchrun's agent [sys.executable, "-m", "torch.distributed.run", ...] or a dry run's
    [sys.executable, "-c", code importing fastsp.dryrun first, ...], forked from the server of
    its kind when the environment allows (`start`); any other command runs as subprocess.run."""
    process = start(cmd, env=env, cwd=cwd)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=30)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
