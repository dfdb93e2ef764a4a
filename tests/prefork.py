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
differ in anything but fastsp's runtime switches (FASTSP_*) and pytest's current test name go to
different servers, and past
`MAX_SERVERS` of those, or where fork is not available, to a fresh interpreter.
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

# One server per kind (a trainer's, or a dry run's with fake CUDA) and environment (what its
# imports read), a few at most: each holds an imported torch.
MAX_SERVERS = 4
_servers: dict[tuple[bool, tuple[tuple[str, str], ...]], subprocess.Popen] = {}


def _import_environment(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The part of `env` a server's imports may have read: all of it but fastsp's runtime
    switches (FASTSP_KILL_AT, FASTSP_CACHE, ...), which fastsp reads when it acts, and the name
    of the test pytest is running (PYTEST_CURRENT_TEST, another in every test)."""
    runtime = ("FASTSP_", "PYTEST_CURRENT_TEST")
    return tuple(sorted((k, v) for k, v in env.items() if not k.startswith(runtime)))


def _server_for(env: dict[str, str], dry_run: bool) -> subprocess.Popen | None:
    """The running server of that kind for `env`'s import environment, started if there is
    room; None: run a fresh interpreter."""
    key = (dry_run, _import_environment(env))
    server = _servers.get(key)
    if server is not None and server.poll() is None:
        return server
    if not hasattr(os, "fork") or (server is None and len(_servers) >= MAX_SERVERS):
        return None
    server = subprocess.Popen(
        [sys.executable, str(SERVER), *(["--dryrun"] if dry_run else [])],
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


@atexit.register
def _stop() -> None:
    for server in _servers.values():
        if server.poll() is None:
            server.stdin.close()
            server.wait(timeout=30)


def _ours(module: str) -> bool:
    """fastsp's commands are forked; other modules (torchrun's agent) start fresh."""
    return module.split(".")[0] == "fastsp"


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
    server of its kind when the environment allows; any other command runs as subprocess.run."""
    env = dict(os.environ if env is None else env)
    cwd = os.fspath(cwd) if cwd is not None else os.getcwd()
    cmd = [os.fspath(part) for part in cmd]
    if cmd[0] == sys.executable and len(cmd) > 2 and cmd[1] == "-m" and _ours(cmd[2]):
        target = {"module": cmd[2], "argv": cmd[3:]}
        dry_run = cmd[2] == "fastsp.dryrun"
    elif cmd[0] == sys.executable and len(cmd) > 1 and cmd[1].endswith(".py"):
        target = {"script": os.path.join(cwd, cmd[1]), "argv": cmd[2:]}
        script = Path(target["script"])
        dry_run = script.is_file() and _dry_run_code(script.read_text())
    elif cmd[:2] == [sys.executable, "-c"] and len(cmd) > 2 and _dry_run_code(cmd[2]):
        target, dry_run = {"code": cmd[2], "argv": cmd[3:]}, True
    else:
        target = None
    server = _server_for(env, dry_run) if target is not None else None
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
