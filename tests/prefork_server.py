"""The server side of tests/prefork.py: imports the trainer once, then forks one child per run.

`python tests/prefork_server.py [--dryrun] SOCKET`. With `--dryrun`, it imports fastsp.dryrun
first, which registers fake CUDA before torch loads, as `python -m fastsp.dryrun` or a
`python -c` script that imports it first does.

Runs (JSON lines on stdin): a request {"script", "module" or "code", "argv", "env", "cwd",
"stdout", "stderr", "new_session"}; the answers {"pid": ...} as soon as the child exists, then
{"returncode": ...} when it has ended (negative: the signal that ended it, as `subprocess`
reports it), on the stdout this process was started with; each child writes its own stdout and
stderr to the named files.

torchrun's workers (tests/prefork_rank.py), on the Unix socket SOCKET: each worker's stand-in
connects and sends one JSON line {"script" or "module", "argv", "env", "cwd"} with its stdin,
stdout, stderr and the read end of a pipe only it holds; the answers are {"pid": ...}, then
{"returncode": ...}, or {"refused": reason} where the worker's environment differs from this
server's in what imports read (it then starts fresh). Each forked worker kills itself when that
pipe's other end closes, so it never outlives its stand-in.

The server itself never runs a torch operation and starts no thread, so that forking it is safe
(OpenMP's thread pool does not exist yet) and each child starts where a fresh interpreter would
after its imports. It ends when its stdin closes.
"""

import array
import atexit
import io
import json
import os
import runpy
import select
import signal
import socket
import sys
import threading
import traceback

from prefork import import_environment

# What the imports below can read, taken before them (some write into os.environ): hence the
# E402s that follow
STARTED_WITH = dict(os.environ)

if sys.argv[1:2] == ["--dryrun"]:  # a dry-run server: fake CUDA registered before torch loads
    import fastsp.dryrun  # noqa: F401  # isort: skip
    import fastsp.dryrun_parallel  # noqa: F401  (the fake process group of --dry-world-size)

import torch._dynamo  # noqa: E402, F401  (torch.optim's constructor imports it)

import fastsp.train  # noqa: E402, F401  (fastsp, torch, triton)
from fastsp.family_config import DENOISER_CLASSES  # noqa: E402

try:  # the sd extra: diffusers imports each model class at first use, in every child otherwise
    import diffusers
    import diffusers.models.attention_dispatch  # noqa: F401  (fastsp.family_attention's)

    for name in (*DENOISER_CLASSES, "AutoencoderKL"):
        getattr(diffusers, name)
except ImportError:
    pass

try:  # the lora extra: the first LoRA option imports peft (fastsp.lora), in every child otherwise
    import fastsp.lora  # noqa: F401
except ImportError:
    pass


def _exit_code(error: SystemExit) -> int:
    if error.code is None:
        return 0
    if isinstance(error.code, int):
        return error.code
    print(error.code, file=sys.stderr)  # sys.exit("message") prints it and exits 1
    return 1


def _files_as_stdio(request: dict) -> None:
    """A run's stdin from /dev/null, its stdout and stderr into the files it names."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)


def _run_child(request: dict, stdio=_files_as_stdio) -> None:
    """In the forked child: become `python script argv...` and never return."""
    code = 1
    try:
        if request.get("new_session"):  # Popen's start_new_session: its own process group
            os.setsid()
        stdio(request)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        try:
            if "code" in request:  # python -c code: the working directory first on the path
                sys.path[0] = ""
                sys.argv = ["-c", *request["argv"]]
                main = type(sys)("__main__")
                sys.modules["__main__"] = main
                exec(compile(request["code"], "<string>", "exec"), main.__dict__)
            elif "module" in request:  # python -m module: the working directory first on the path
                sys.path[0] = os.getcwd()
                sys.argv = ["-m", *request["argv"]]  # runpy puts the module's file first
                # a fresh `python -m` runs the module as __main__ beside no imported copy
                sys.modules.pop(request["module"], None)
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            else:  # python script.py: the script's folder first on the path
                script = os.path.abspath(request["script"])
                sys.argv = [script, *request["argv"]]
                sys.path[0] = os.path.dirname(script)
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as error:
            code = _exit_code(error)
        except BaseException:  # what an uncaught exception does to a fresh interpreter
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _fork() -> int:
    if threading.active_count() != 1:  # a forked child would lose the other threads' locks
        raise RuntimeError("the prefork server must be single-threaded before it forks")
    return os.fork()


def _ready():
    """The answers' stream (a copy of the stdout this process was started with), the first
    answer sent."""
    answers = os.fdopen(os.dup(1), "w")
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    return answers


_IMPORTS_READ = dict(import_environment(STARTED_WITH))


def _import_differences(env: dict[str, str]) -> list[str]:
    """The variables in which a worker's environment differs from this server's where imports
    may have read them (prefork.import_environment)."""
    worker, mine = dict(import_environment(env)), _IMPORTS_READ
    return sorted(n for n in worker.keys() | mine.keys() if worker.get(n) != mine.get(n))


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    """One worker's request line and the file descriptors that came with it."""
    fds = array.array("i")
    data, ancillary, _, _ = connection.recvmsg(1 << 16, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    while not data.endswith(b"\n"):
        more = connection.recv(1 << 16)
        if not more:
            raise ConnectionError("a worker's stand-in left before its request was whole")
        data += more
    return json.loads(data), list(fds)


def _worker_stdio(fds: list[int]):
    """In a forked worker: the stand-in's stdin, stdout and stderr, written through unbuffered
    (torchrun starts workers with `python -u`), and death with the stand-in."""

    def stdio(request: dict) -> None:
        stdin, stdout, stderr, alive = fds
        for fd, target in ((0, stdin), (1, stdout), (2, stderr)):
            os.dup2(target, fd)
            os.close(target)
        for name, fd in (("stdout", 1), ("stderr", 2)):
            raw = io.FileIO(fd, "w", closefd=False)
            setattr(sys, name, io.TextIOWrapper(raw, encoding="utf-8", write_through=True))

        def die_with_the_stand_in() -> None:
            os.read(alive, 1)  # end of file: the stand-in has ended
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=die_with_the_stand_in, daemon=True).start()

    return stdio


class _Requests:
    """The requests on stdin, read from the descriptor itself: select() cannot see a second
    line that a buffered reader took in with the first."""

    def __init__(self):
        self.pending, self.ended = b"", False

    def read(self) -> list[dict]:
        chunk = os.read(0, 1 << 16)
        self.ended = not chunk
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        return [json.loads(line) for line in lines]


def serve(path: str) -> None:
    """Fork a run per request on stdin (its answers on the stdout this process was started
    with) and a torchrun worker per stand-in on the socket at `path`, until stdin closes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    answers = _ready()
    requests = _Requests()
    # pid -> its stand-in's connection, or None for a run asked for on stdin
    children: dict[int, socket.socket | None] = {}

    def fork() -> int:
        """os.fork, the child without this loop's sockets and answers."""
        pid = _fork()
        if pid == 0:
            for other in (listener, answers, *(c for c in children.values() if c)):
                other.close()
        return pid

    while not requests.ended:
        readable, _, _ = select.select([listener, 0], [], [], 0.02)
        if 0 in readable:
            for request in requests.read():
                pid = fork()
                if pid == 0:
                    _run_child(request)
                children[pid] = None
                answers.write(json.dumps({"pid": pid}) + "\n")
                answers.flush()
        if listener in readable:
            connection, _ = listener.accept()
            request, fds = _receive(connection)
            differences = _import_differences(request["env"])
            if differences or len(fds) != 4:
                reason = f"imports read {differences}" if differences else "no stdio"
                connection.sendall(json.dumps({"refused": reason}).encode() + b"\n")
                connection.close()
            else:
                pid = fork()
                if pid == 0:
                    connection.close()
                    _run_child(request, stdio=_worker_stdio(fds))
                children[pid] = connection
                connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            for fd in fds:
                os.close(fd)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = children.pop(pid)
            answer = json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n"
            if connection is None:
                answers.write(answer)
                answers.flush()
                continue
            try:
                connection.sendall(answer.encode())
            except OSError:  # the stand-in is gone (it was killed): nothing to tell
                pass
            connection.close()


if __name__ == "__main__":
    serve(sys.argv[-1])
