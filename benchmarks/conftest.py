"""Benchmark-wide setup: as in tests/conftest.py, without a GPU the Triton kernels run in Triton's
interpreter, which must be switched on before triton is first imported."""

import os
import shutil

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"
