"""A torchrun worker forked from a prefork server (tests/prefork.py's `torchrun`).

torchrun starts each worker as `python -u tests/prefork_rank.py [-m MODULE | SCRIPT] ARGS...`.
This process imports nothing heavy: it hands its stdin, stdout and stderr, its environment,
working directory and command to the server listening at PREFORK_RANK_SOCKET (a
`tests/prefork_server.py` that has imported the trainer once), which forks the worker
from its imported state. This process stands in for the worker towards torchrun's agent: it
passes on every signal the agent (or a test) sends it, and ends as the worker ended, with its
exit status or by its signal. Where it ends first (SIGKILL), the worker kills itself: it
watches a pipe whose other end only this process holds. Where no server answers, or the
server's imports read another environment, it becomes the worker itself (`exec python -u ...`).
"""

import array
import json
import os
import signal
import socket
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _fresh(command: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, "-u", *command])


def _line(stream) -> dict:
    line = stream.readline()
    if not line:
        raise ConnectionError("the prefork server ended before the worker")
    return json.loads(line)


def main(command: list[str]) -> None:
    path = os.environ.get("PREFORK_RANK_SOCKET")
    if not path:
        _fresh(command)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.connect(path)
    except OSError:
        _fresh(command)
    if command[0] == "-m":
        target = {"module": command[1], "argv": command[2:]}
    else:
        target = {"script": os.path.abspath(command[0]), "argv": command[1:]}
    alive_read, alive_write = os.pipe()  # the worker's EOF on alive_read: this process is gone
    request = {**target, "env": dict(os.environ), "cwd": os.getcwd(), "unbuffered": True}
    fds = array.array("i", [0, 1, 2, alive_read])
    server.sendmsg(
        [json.dumps(request).encode() + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
    )
    os.close(alive_read)
    answers = server.makefile("r")
    answer = _line(answers)
    if "refused" in answer:  # the server's imports read another environment than this worker's
        server.close()
        os.close(alive_write)
        _fresh(command)
    pid = answer["pid"]
    for number in FORWARDED:
        signal.signal(number, lambda received, frame: os.kill(pid, received))
    returncode = _line(answers)["returncode"]
    if returncode < 0:  # ended by a signal: end by the same one
        signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    sys.exit(returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
