"""Benchmark-wide setup: as in tests/conftest.py, without a GPU the Triton kernels run in Triton's
interpreter, which must be switched on before triton is first imported.

Not for the step benchmark alone (``pytest benchmarks/bench_step.py``): a CPU user's training step
runs the plain-torch feature loss, and timing it through the interpreter would measure the
interpreter.
"""

import os
import shutil
import sys

_STEP_ONLY = [a for a in sys.argv[1:] if a.endswith(".py") or "::" in a] and all(
    "bench_step" in a for a in sys.argv[1:] if a.endswith(".py") or "::" in a
)
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None and not _STEP_ONLY:
    os.environ["TRITON_INTERPRET"] = "1"
