"""Trainer runs for the tests, forked from a process that has imported the trainer once.

A `python fastsp/train.py` of a few tiny steps spends most of its CPU time importing torch,
torch._dynamo (torch.optim's constructor imports it) and fastsp; the fault tests start dozens of
them. `run` hands such a run to a server (tests/prefork_server.py, one per test worker, started
at first use) that has done those imports once and forks a child per run. The child is a real
process, with its own pid, files and signal handlers (kill -9 kills it; `FASTSP_KILL_AT` works as
in a fresh one), running the same `fastsp/train.py` as `__main__` with the run's argv,
environment and working directory; `run` returns what `subprocess.run(..., capture_output=True,
text=True)` would. Python reads some variables only at import (TRITON_INTERPRET,
OMP_NUM_THREADS, PYTHONPATH, ...), so a forked child cannot change them: a run whose environment
differs from the server's in anything but fastsp's runtime switches (FASTSP_*) runs in a fresh
interpreter instead, as does every run where fork is not available.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = Path(__file__).with_name("prefork_server.py")
REPO = SERVER.parent.parent

_server: subprocess.Popen | None = None
_server_env: dict[str, str] | None = None


def _start(env: dict[str, str]) -> subprocess.Popen:
    global _server, _server_env
    _server = subprocess.Popen(
        [sys.executable, str(SERVER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=REPO,
        text=True,
    )
    _server_env = dict(env)
    if json.loads(_server.stdout.readline() or "{}").get("ready") is not True:
        raise RuntimeError("the prefork server did not start (its stderr says why)")
    atexit.register(_stop)
    return _server


def _stop() -> None:
    if _server is not None and _server.poll() is None:
        _server.stdin.close()
        _server.wait(timeout=30)


def _forkable(env: dict[str, str]) -> bool:
    if not hasattr(os, "fork") or _server_env is None:
        return hasattr(os, "fork")
    keys = set(env) | set(_server_env)
    return all(k.startswith("FASTSP_") or env.get(k) == _server_env.get(k) for k in keys)


def _base_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("FASTSP_")}


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
    for `cmd` = [sys.executable, script.py, ...] or [sys.executable, "-m", module, ...], forked
    from the server when the environment allows; any other command runs as subprocess.run."""
    env = dict(os.environ if env is None else env)
    cwd = os.fspath(cwd) if cwd is not None else os.getcwd()
    cmd = [os.fspath(part) for part in cmd]
    if cmd[0] == sys.executable and len(cmd) > 2 and cmd[1] == "-m":
        target = {"module": cmd[2], "argv": cmd[3:]}
    elif cmd[0] == sys.executable and len(cmd) > 1 and cmd[1].endswith(".py"):
        target = {"script": os.path.join(cwd, cmd[1]), "argv": cmd[2:]}
    else:
        target = None
    if target is None or not _forkable(env):
        return subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
        )
    server = _server if _server is not None and _server.poll() is None else None
    if server is None:
        server = _start(_base_env(env))
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
