"""What every command-line entry point shares: the mapping of the expected stops of a run
(`fastsp.errors`, each with its exit status; and an output that cannot be written) to a one-line
message and a status. `run_command` also destroys the process group on the way out, whatever
happened."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from fastsp import dist
from fastsp.errors import EXIT_OK, EXIT_WRITE_FAILED, ExpectedStop


def error_status(error: BaseException) -> tuple[int, str] | None:
    """(exit status, message) for an expected stop of a run; None for anything else (a bug)."""
    if isinstance(error, ExpectedStop):
        return error.exit_status, f"{error.prefix}: {error}"
    if isinstance(error, OSError):  # a sample grid or metrics line that cannot be written
        where = f" {error.filename}" if error.filename else ""
        return EXIT_WRITE_FAILED, (
            f"error: cannot write{where}: {error.strerror or error}; the last checkpoint is "
            "intact. Free space (or fix the cause) and rerun with --resume"
        )
    return None


def run_command(function: Callable[..., Any], *args: Any) -> int:
    """Call `function(*args)`; an expected stop prints its message to stderr and returns its
    status, anything else propagates (a traceback is a bug). The process group is destroyed on
    every way out."""
    try:
        function(*args)
    except Exception as error:  # noqa: BLE001 (sorted by error_status; the rest re-raised)
        known = error_status(error)
        if known is None:
            raise
        status, message = known
        print(message, file=sys.stderr)
        return status
    finally:
        dist.shutdown()
    return EXIT_OK
