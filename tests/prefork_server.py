"""The server side of tests/prefork.py: imports the trainer once, then forks one child per run.

Started with `--dryrun`, it imports fastsp.dryrun first, which registers fake CUDA before torch
loads, as `python -m fastsp.dryrun` or a `python -c` script that imports it first does.

Protocol (JSON lines): a request {"script", "module" or "code", "argv", "env", "cwd", "stdout",
"stderr"}
on stdin; the answers {"pid": ...} as soon as the child exists, then {"returncode": ...} when it
has ended (negative: the signal that ended it, as `subprocess` reports it). The answers go out
on the stdout this process was started with; each child writes its own stdout and stderr to the
named files. The server itself never runs a torch operation and starts no thread, so that
forking it is safe (OpenMP's thread pool does not exist yet) and each child starts where a fresh
interpreter would after its imports.
"""

import atexit
import json
import os
import runpy
import sys
import threading
import traceback

if sys.argv[1:] == ["--dryrun"]:  # a dry-run server: fake CUDA registered before torch loads
    import fastsp.dryrun  # noqa: F401  # isort: skip
    import fastsp.dryrun_parallel  # noqa: F401  (the fake process group of --dry-world-size)

import torch._dynamo  # noqa: F401  (torch.optim's constructor imports it: every trainer pays it)

import fastsp.train  # noqa: F401  (fastsp, torch, triton)
from fastsp.family_config import DENOISER_CLASSES

try:  # the sd extra: diffusers imports each model class at first use, in every child otherwise
    import diffusers
    import diffusers.models.attention_dispatch  # noqa: F401  (fastsp.family_attention's)

    for name in (*DENOISER_CLASSES, "AutoencoderKL"):
        getattr(diffusers, name)
except ImportError:
    pass


def _exit_code(error: SystemExit) -> int:
    if error.code is None:
        return 0
    if isinstance(error.code, int):
        return error.code
    print(error.code, file=sys.stderr)  # sys.exit("message") prints it and exits 1
    return 1


def _run_child(request: dict) -> None:
    """In the forked child: become `python script argv...` and never return."""
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
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


def serve() -> None:
    answers = os.fdopen(os.dup(1), "w")
    if threading.active_count() != 1:  # a forked child would lose the other threads' locks
        raise RuntimeError("the prefork server must be single-threaded before it forks")
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_child(request)
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve()
