"""The dry run's fake CUDA (stdlib only: it must load before torch is imported).

fastsp/fake_cuda.cpp registers a CUDA device guard, CUDA hooks ("built, not available") and a
CUDA generator in a CPU-only torch; `load_fake_cuda` builds it with torch.utils.cpp_extension at
first use (in a child process, once however many dry runs start together), caches it, and
loads it with RTLD_GLOBAL. fastsp.dryrun calls it first thing, which is why importing the dry
run registers fake CUDA in the whole process.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fastsp.errors import EXIT_INVALID_INPUT

_SOURCE = Path(__file__).with_name("fake_cuda.cpp")
_loaded = False  # the registrations are in this process


def _extension_dir() -> Path:
    """Where the built extension is cached: torch's extension folder, one subfolder per torch
    version and source text (a changed .cpp or another torch is a new build)."""
    torch_version = importlib.metadata.version("torch")
    digest = hashlib.sha256(_SOURCE.read_bytes() + torch_version.encode()).hexdigest()[:12]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"fastsp_fake_cuda_{digest}"


def _library(folder: Path) -> Path:
    """The built extension in `folder`, built first if it is not there: under a lock on the
    folder, so that concurrent dry runs (a job's ranks, a test suite's workers) build it once,
    and moved into place whole, so that none loads a library another is still linking."""
    library = folder / "fastsp_fake_cuda.so"
    if library.is_file():
        return library
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:  # before any command runs: no fastsp.cli to map it
        print(
            f"error: the dry run builds its fake-CUDA extension into {folder}, which cannot be "
            f"written ({error.strerror or error}); set TORCH_EXTENSIONS_DIR to a folder you can "
            "write in",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_INVALID_INPUT) from None
    with open(folder / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not library.is_file():  # not built by the process that held the lock before
            build = folder / f"build-{os.getpid()}"
            build.mkdir(exist_ok=True)
            os.replace(_build(build), library)
            shutil.rmtree(build, ignore_errors=True)  # the compiler's objects
    return library


def _build(folder: Path) -> Path:
    """Compile fake_cuda.cpp in a child process (building needs torch imported, and this process
    must not import torch before the library is loaded); returns the shared library."""
    code = (
        "import sys; from torch.utils.cpp_extension import load; "
        "load('fastsp_fake_cuda', [sys.argv[1]], build_directory=sys.argv[2], "
        "is_python_module=False, verbose=False)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(_SOURCE), str(folder)], capture_output=True, text=True
    )
    library = folder / "fastsp_fake_cuda.so"
    if result.returncode != 0 or not library.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise SystemExit(
            f"error: building the dry run's fake-CUDA extension ({_SOURCE}) in {folder} failed "
            "(it needs g++ and ninja): " + " | ".join(tail)
        )
    return library


def load_fake_cuda() -> None:
    """Load fake_cuda.cpp's registrations into this process, building them first if needed.
    Must run before `import torch`: torch reads the CUDA hooks registry once, at first use.
    Loading again is a no-op (a process that imported the dry run runs it again as __main__)."""
    global _loaded
    if _loaded:
        return
    if "torch" in sys.modules:
        raise RuntimeError(
            "fastsp.dryrun must be imported before torch (it registers fake CUDA, which torch "
            "reads once): run `python -m fastsp.dryrun ...` in its own process"
        )
    torch_lib = Path(importlib.util.find_spec("torch").submodule_search_locations[0]) / "lib"
    if any((torch_lib / name).exists() for name in ("libtorch_cuda.so", "libtorch_hip.so")):
        # A CUDA (or ROCm) build registers the real guard, hooks and generator; registering
        # them twice would stop the process (c10's registry exits on a duplicate key).
        _loaded = True
        return
    library = _library(_extension_dir())
    for name in ("libc10.so", "libtorch_cpu.so"):  # the symbols the extension links against
        ctypes.CDLL(str(torch_lib / name), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    _loaded = True
