"""Test-wide setup.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before
triton is first imported; hence here, before any test module imports fastsp.

The suite runs on parallel workers (pytest-xdist: `-n logical --dist loadgroup`, pyproject.toml's
addopts; `-n 0` runs it in one process). What keeps that safe, and what every test keeps to:
- Files go under tmp_path or tmp_path_factory only: never runs/, benchmarks/results/, the
  repository or the home folder (FASTSP_CACHE points into this run's temporary folder). The one
  exception is bytecode, in the `__pycache__` folders Python itself uses (ignored by git): the
  suite's processes write it as they import, PYTHONDONTWRITEBYTECODE or not, so that each
  module is compiled once per run (by the first process that imports it) and only the modules
  the suite imports are compiled, not every one installed (the README's install compiles
  none: `pip install --no-compile`, uv's default).
- Distributed runs take a port the system picks (torchrun --standalone, or a socket bound to
  port 0 for MASTER_PORT), never a fixed one.
- What several tests read is built once per run by `build_once` (a session fixture): read-only
  for the tests; a test that writes copies it into its tmp_path first.
- A resource outside tmp_path that several workers may build at once (the dry run's fake-CUDA
  extension, in torch's extension folder) is built under a lock by its owner (fastsp.fake_cuda).
- Tests marked `slow` are handed out first, so that the longest ones do not end the run alone.
- Under Triton's interpreter, the language is patched once per kernel launch, not again at every
  helper call inside it (tests/interpreter_speed.py).
"""

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller, before the workers start
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # for every process of the run
    sys.dont_write_bytecode = False
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"
if "PYTEST_XDIST_WORKER" in os.environ:
    # One thread per worker, inherited by the processes the tests start: the workers already
    # fill the cores, and OpenMP's spinning barriers make oversubscribed ops many times slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    from interpreter_speed import skip_repatching

    skip_repatching()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds (scheduled first)")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: otherwise as collected
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def run_root(tmp_path_factory) -> Path:
    """A folder that every worker of this test run shares (the parent of the workers' own
    temporary folders; without xdist, the session's temporary folder)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@pytest.fixture(scope="session")
def build_once(run_root) -> Callable[[str, Callable[[Path], None]], Path]:
    """build_once(name, build) -> run_root/name, made by build(folder) in whichever worker asks
    first while the others wait for it; a build that failed is redone by the next caller."""

    def build(name: str, make: Callable[[Path], None]) -> Path:
        folder = run_root / name
        done = run_root / f"{name}.done"
        with FileLock(str(run_root / f"{name}.lock")):
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                make(folder)
                done.touch()
        return folder

    return build


@pytest.fixture(scope="session", autouse=True)
def fastsp_cache(run_root):
    """$FASTSP_CACHE for every test and the processes it starts: a folder of this run that the
    workers share (the classifier cache writes atomically), never the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTSP_CACHE", str(run_root / "fastsp_cache"))
        yield run_root / "fastsp_cache"
