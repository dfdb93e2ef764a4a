"""The expected stops of every fastsp command, each with its exit status and message prefix.

The ground floor: this module imports nothing, and every module that raises or maps an expected
stop imports it from here. Anything else that escapes a command is a bug and keeps its traceback.
`fastsp.cli.run_command` turns an `ExpectedStop` into `prefix: message` on stderr and its status.
"""

EXIT_OK = 0
EXIT_FAULT = 1  # the dry run: the step would fail on a GPU
EXIT_INVALID_INPUT = 2  # the message names the problem and the fix
EXIT_NUMERICAL_FAULT = 3  # too many consecutive non-finite steps; the last checkpoint is intact
EXIT_WRITE_FAILED = 4  # disk full, I/O error; the previous checkpoint is intact
EXIT_CAPTURE_FAILED = 5  # the step could not be captured as a CUDA graph; nothing was trained
EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again later": here with --resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's status: Ctrl-C outside the trainer's handler


class ExpectedStop(Exception):
    """A stop a command reports in one line, without a traceback."""

    exit_status = EXIT_INVALID_INPUT
    prefix = "error"


class ConfigError(ExpectedStop, ValueError):
    """An invalid configuration value; the message names the field, the value and what's allowed."""


class DataError(ExpectedStop, ValueError):
    """Bad user data: the message names the file or folder, the problem and the fix."""


class CheckpointError(ExpectedStop, ValueError):
    """A checkpoint that cannot be used; the message names the path and the fix."""


class EvaluationError(ExpectedStop, ValueError):
    """Invalid input to an evaluation; the message names the problem and the fix."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (disk full, I/O error); nothing of it was kept."""

    exit_status = EXIT_WRITE_FAILED


class NumericalFault(ExpectedStop, RuntimeError):
    """Too many consecutive steps with non-finite gradients; the last checkpoint is intact."""

    exit_status = EXIT_NUMERICAL_FAULT


class GraphCaptureError(ExpectedStop, RuntimeError):
    """The DDP step could not be captured as a CUDA graph. Not a silent eager fallback: a capture
    that fails mid-backward can leave DDP's reducer half-way through its buckets, and an eager
    step after it would sync the wrong gradients. A runtime failure, not bad input: the message
    names the way round it (--no-cuda-graph)."""

    exit_status = EXIT_CAPTURE_FAILED


class DryRunFault(ExpectedStop, RuntimeError):
    """What a GPU would raise running this step; the message is one line naming the fault."""

    exit_status = EXIT_FAULT
    prefix = "fault"


class RankLost(ExpectedStop, RuntimeError):
    """Another torchrun rank's process died (killed, out of memory): the message names it and
    the intact checkpoint; rerun with --resume, as after a preemption."""

    exit_status = EXIT_PREEMPTED


class Preempted(ExpectedStop):
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint; rerun with --resume."""

    exit_status = EXIT_PREEMPTED
    prefix = "preempted"
