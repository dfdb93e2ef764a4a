"""Train a diffusion model.

    python fastsp/train.py --preset digits                          # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 fastsp/train.py --preset sd21 --data /latents --cond none
    python fastsp/train.py --preset digits --out runs/digits --resume   # continue a run

Every config field is an option (`--help` lists them); the loop itself is fastsp.trainer.train.
Exit status: 0 success; 2 invalid input (the message names the problem and the fix); 3 stopped
after too many consecutive non-finite steps (the last checkpoint is intact); 75 stopped by
SIGTERM/SIGINT after writing a checkpoint (rerun with --resume); 4 an output could not be written
(disk full, I/O error; the previous checkpoint is intact, rerun with --resume once fixed).
"""

import os
import sys

# Run as a script (`python fastsp/train.py`, `torchrun fastsp/train.py`), Python puts fastsp/
# itself first on sys.path, where fastsp/data.py would shadow any top-level `data` module. Drop it:
# the package is imported as `fastsp` from its installed location.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from fastsp import config as config_lib  # noqa: E402
from fastsp.checkpoint import CheckpointError, CheckpointWriteError  # noqa: E402
from fastsp.data import DataError  # noqa: E402
from fastsp.trainer import NumericalFault, Preempted, train  # noqa: E402

EXIT_INVALID_INPUT = 2
EXIT_NUMERICAL_FAULT = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", here with --resume
EXIT_WRITE_FAILED = 4


def main(argv: list[str] | None = None) -> int:
    train_config, model_config = config_lib.parse_args(argv)
    return run_reporting_errors(train, train_config, model_config)


def run_reporting_errors(function, *args) -> int:
    """Call `function(*args)`, turning the trainer's expected stops into messages and statuses."""
    try:
        function(*args)
    except CheckpointWriteError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except (config_lib.ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except NumericalFault as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NUMERICAL_FAULT
    except OSError as error:  # a sample grid or metrics line that cannot be written
        where = f" {error.filename}" if error.filename else ""
        print(
            f"error: cannot write{where}: {error.strerror or error}; the last checkpoint is "
            "intact. Free space (or fix the cause) and rerun with --resume",
            file=sys.stderr,
        )
        return EXIT_WRITE_FAILED
    except Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
