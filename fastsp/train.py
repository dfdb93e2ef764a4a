"""Train a diffusion model.

    python fastsp/train.py --preset digits                          # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 fastsp/train.py --preset sd21 --data /latents --cond none
    python fastsp/train.py --preset digits --out runs/digits --resume   # continue a run

Every config field is an option (`--help` lists them); the loop is fastsp.training.loop.run_loop.
Exit status (fastsp.cli): 0 success; 2 invalid input (the message names the problem and the
fix); 3 stopped after too many consecutive non-finite steps (the last checkpoint is intact); 75
stopped by SIGTERM/SIGINT: after writing a checkpoint (rerun with --resume), or before
training started with nothing written (rerun); 4 an output could not
be written (disk full, I/O error; the previous checkpoint is intact, rerun with --resume).
"""

import os
import sys

# Run as a script (`python fastsp/train.py`, `torchrun fastsp/train.py`), Python puts fastsp/
# itself first on sys.path, where fastsp/data.py would shadow any top-level `data` module. Drop it:
# the package is imported as `fastsp` from its installed location.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

if __name__ == "__main__":
    # First, before torch is imported: a SIGTERM/SIGINT at any moment of the start then stops
    # it cleanly (exit 75, nothing written) instead of a traceback or a silent 143.
    from fastsp import preemption

    preemption.install()

from fastsp import config_cli  # noqa: E402
from fastsp.cli import run_command  # noqa: E402
from fastsp.training.loop import train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    train_config, model_config = config_cli.parse_args(argv)
    return run_command(train, train_config, model_config)


if __name__ == "__main__":
    sys.exit(main())
