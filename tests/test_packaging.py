"""The package installs as a wheel, and no module in fastsp/ shadows another top-level module."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_no_module_shadows_a_top_level_module():
    # torchrun fastsp/train.py puts fastsp/ first on sys.path: a fastsp/logging.py would replace
    # the standard library's logging for every import in the process.
    installed = set(importlib.metadata.packages_distributions())
    names = {p.stem for p in (REPO / "fastsp").glob("*.py")} - {"__init__", "__main__"}
    names |= {p.name for p in (REPO / "fastsp").iterdir() if (p / "__init__.py").is_file()}
    clashes = sorted(n for n in names if n in sys.stdlib_module_names or n in installed)
    assert not clashes, f"rename these fastsp modules: {clashes}"


@pytest.mark.slow
def test_wheel_installs_and_imports_outside_the_source_tree(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("fastsp-*.whl")
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import fastsp, fastsp.kernels, fastsp.trainer;"
        "print(fastsp.__file__); print(fastsp.kernels.__file__)"
    )
    # Run from an empty folder with a clean path, so the source tree cannot be picked up.
    result = subprocess.run(
        [sys.executable, "-I", "-c", probe, str(target)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    package_file, kernels_file = result.stdout.split()
    assert Path(package_file).is_relative_to(target) and Path(kernels_file).is_relative_to(target)
    assert Path(kernels_file).parent == target / "fastsp" / "kernels"
    # fastsp.dryrun builds its fake-CUDA extension from the installed source
    assert (target / "fastsp" / "fake_cuda.cpp").is_file()
