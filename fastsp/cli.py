"""What every command-line entry point shares: the mapping of the expected stops of a run
(`fastsp.errors`, each with its exit status; an output that cannot be written; Ctrl-C) to a
one-line message and a status. `run_command` also destroys the process group on the way out,
whatever happened.

A write failure and an interrupt carry the command's own advice (`rerun`: what is intact and how
to go on), so no command prints another's: the trainer's default names the checkpoint and
--resume, prepare's the finished shards, export's the untouched folder."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from fastsp import dist
from fastsp.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_WRITE_FAILED, ExpectedStop

TRAINER_RERUN = (
    "the last checkpoint is intact. Free space (or fix the cause) and rerun with --resume"
)


def error_status(error: BaseException, rerun: str = TRAINER_RERUN) -> tuple[int, str] | None:
    """(exit status, message) for an expected stop of a command; None for anything else (a
    bug). `rerun`: the command's advice after a write failure or an interrupt."""
    if isinstance(error, ExpectedStop):
        return error.exit_status, f"{error.prefix}: {error}"
    if isinstance(error, OSError):  # an output that cannot be written
        where = f" {error.filename}" if error.filename else ""
        return EXIT_WRITE_FAILED, f"error: cannot write{where}: {error.strerror or error}; {rerun}"
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED, f"interrupted (Ctrl-C): {rerun}"
    return None


def run_command(function: Callable[..., Any], *args: Any, rerun: str = TRAINER_RERUN) -> int:
    """Call `function(*args)`; an expected stop prints its message to stderr and returns its
    status, anything else propagates (a traceback is a bug). The process group is destroyed on
    every way out. `rerun`: the command's advice (module docstring)."""
    try:
        function(*args)
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 (sorted by error_status)
        known = error_status(error, rerun)
        if known is None:
            raise
        status, message = known
        print(message, file=sys.stderr)
        return status
    finally:
        dist.shutdown()
    return EXIT_OK
