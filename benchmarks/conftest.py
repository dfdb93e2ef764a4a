"""Benchmark-wide setup for the pytest-benchmark sweep of the kernels (bench_feature_mse.py): as
in tests/conftest.py, without a GPU the Triton kernels run in Triton's interpreter, which must be
switched on before triton is first imported. The step benchmark is a script
(benchmarks/bench_step.py), so no pytest run here times a CPU training step through the
interpreter.

The test suite's parallel workers (pyproject.toml's `-n logical`) stay off here: pytest-benchmark
refuses to time under xdist, and a timing needs the cores to itself.
"""

import os
import shutil

import pytest

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    config.option.numprocesses = 0
