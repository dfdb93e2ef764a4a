"""The package installs as a wheel, and no module in fastsp/ shadows another top-level module."""

import importlib.metadata
import os
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
        "import fastsp, fastsp.kernels, fastsp.training.loop;"
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


def _python_from_the_repository_root(code: str, pythonpath: Path | None = None):
    """`python -c code` started from the repository root, which Python puts first on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


def test_bare_kernels_name_is_the_installed_package_not_our_folder(tmp_path):
    # A stand-in for Hugging Face's `kernels` (which transformers 5 depends on and diffusers
    # imports), installed with its metadata so the libraries' availability checks see it.
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    (site / "kernels-99.0.dist-info").mkdir()
    (site / "kernels-99.0.dist-info" / "METADATA").write_text("Name: kernels\nVersion: 99.0\n")
    probe = (
        "import kernels, fastsp.kernels.feature_mse as op;"
        "print(kernels.WHO); print(kernels.__file__); print(op.__file__)"
    )
    result = _python_from_the_repository_root(probe, pythonpath=site)
    assert result.returncode == 0, result.stderr[-3000:]
    who, bare_file, op_file = result.stdout.split()
    assert who == "installed" and Path(bare_file).is_relative_to(site)
    assert Path(op_file) == REPO / "kernels" / "feature_mse.py"


def test_bare_kernels_name_without_an_installed_package_is_an_empty_namespace():
    # transformers' availability check counts a package without __file__ and version as absent
    probe = (
        "import sys; sys.path[:] = [''] + [p for p in sys.path if p.endswith('.zip') or "
        "'site-packages' not in p and 'dist-packages' not in p];"
        "import kernels;"
        "print(kernels.__file__, list(kernels.__path__), hasattr(kernels, 'feature_mse'))"
    )
    result = _python_from_the_repository_root(probe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["None", "[]", "False"]


@pytest.mark.slow
def test_diffusers_models_import_from_the_repository_root():
    pytest.importorskip("diffusers")
    probe = "from diffusers import UNet2DConditionModel, AutoencoderKL; print('imported')"
    result = _python_from_the_repository_root(probe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "imported"
