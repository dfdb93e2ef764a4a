"""How fastsp.feature_loss imports its kernels: triton not installed falls back to F.mse_loss (and
says so), anything else that breaks the kernels package fails the import loudly.

Each case runs in a fresh interpreter, where a meta-path finder (or ``sys.modules[name] = None``)
fakes the failure before ``fastsp.feature_loss`` is first imported. The program imports
``fastsp.feature_loss`` directly, so it works whether ``fastsp/__init__.py`` imports it eagerly or
on first use.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

# Installs a finder that raises FAILURE when MODULE is imported; FAILURE and MODULE are filled in.
_FAKE_FAILURE = """
import importlib.abc
import sys


class _Fail(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise {failure}
        return None


sys.meta_path.insert(0, _Fail())
"""

_USE_THE_FALLBACK = """
import json

import torch
import torch.nn.functional as F

import fastsp.feature_loss as fl

x, y = torch.randn(3, 5, 7, requires_grad=True), torch.randn(3, 5, 7)
for reduction in ("none", "mean", "sum"):
    out = fl.feature_mse(x, y, reduction)
    assert type(out.grad_fn).__name__ == "MseLossBackward0", out.grad_fn
    assert torch.equal(out, F.mse_loss(x, y, reduction=reduction)), reduction
multi = fl.feature_mse_multi([x, y], [y, x], [0.5, 2.0])
assert torch.equal(multi, 0.5 * F.mse_loss(x, y) + 2.0 * F.mse_loss(y, x))
print("reasons:", json.dumps(fl.triton_unsupported_reasons(x, y)))
print("cpu:", fl.feature_mse_backend(torch.device("cpu")))
print("cuda:", fl.feature_mse_backend(torch.device("cuda")))
try:
    fl.feature_mse(x, y, backend="triton")
except fl.TritonUnavailableError as err:
    print("forced:", json.dumps(err.reasons))
"""

_IMPORT = """
try:
    import fastsp.feature_loss
except Exception as err:
    print("raised:", type(err).__name__)
    print(err)
    print("cause:", type(err.__cause__).__name__)
else:
    print("imported")
"""


def _run(program: str, tmp_path) -> str:
    # cwd outside the checkout: fastsp is found as installed, not as ./fastsp.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(program)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "fake, reason",
    [
        # import of triton halted: ModuleNotFoundError with name 'triton'
        ("import sys\nsys.modules['triton'] = None\n", "triton is not installed"),
        (
            _FAKE_FAILURE.format(
                module="triton",
                failure="ModuleNotFoundError(\"No module named 'triton'\", name='triton')",
            ),
            "triton is not installed",
        ),
        # A module of triton's own missing counts too (the rule: name "triton" or "triton.*"),
        # and the reason names it.
        (
            _FAKE_FAILURE.format(
                module="triton",
                failure="ModuleNotFoundError(\"No module named 'triton._C.libtriton'\", "
                "name='triton._C.libtriton')",
            ),
            "triton is not installed (no module 'triton._C.libtriton')",
        ),
    ],
    ids=["sys.modules None", "finder", "triton submodule"],
)
def test_triton_not_installed_falls_back_to_torch(fake, reason, tmp_path):
    out = _run(fake + _USE_THE_FALLBACK, tmp_path)
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines["cuda"] == f"torch F.mse_loss ({reason})", out
    # CPU: also the interpreter rule, which holds once triton is installed
    assert lines["cpu"].startswith(f"torch F.mse_loss ({reason}; the Triton kernels run on"), out
    reasons = json.loads(lines["reasons"])
    assert reasons[0] == reason and reasons[1].startswith("the Triton kernels run on CUDA"), out
    assert json.loads(lines["forced"]) == reasons, out


@pytest.mark.parametrize(
    "module, failure, shown",
    [
        ("fastsp.kernels.feature_mse", "ImportError('boom')", "ImportError: boom"),
        (
            "fastsp.kernels.feature_mse_multi",
            "NameError(\"name 'tl' is not defined\")",
            "NameError: name 'tl' is not defined",
        ),
        (
            "fastsp.kernels._common",
            "SyntaxError('invalid syntax')",
            "SyntaxError: invalid syntax",
        ),
        # A module of fastsp missing (not triton): a broken install, not the fallback.
        (
            "fastsp.kernels._common",
            "ModuleNotFoundError(\"No module named 'fastsp.kernels._common'\", "
            "name='fastsp.kernels._common')",
            "ModuleNotFoundError: No module named 'fastsp.kernels._common'",
        ),
    ],
    ids=["ImportError", "NameError", "SyntaxError", "fastsp module missing"],
)
def test_broken_kernels_fail_the_import(module, failure, shown, tmp_path):
    out = _run(_FAKE_FAILURE.format(module=module, failure=failure) + _IMPORT, tmp_path)
    assert out.startswith("raised: KernelImportError\n"), out
    assert f"importing {module} failed: {shown}\n" in out, out
    assert "pip install -e ." in out and "a triton" in out, out  # the two fixes
    assert f"cause: {failure.split('(')[0]}" in out, out  # the original error is chained


def test_the_kernels_import(tmp_path):
    # Control for the cases above: the same program without a fake failure imports.
    assert _run(_IMPORT, tmp_path) == "imported\n"
