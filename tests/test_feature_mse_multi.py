"""fastsp.feature_mse_multi (grouped kernel, one launch for all pairs) against float64 references.

As in test_feature_mse.py: outputs poisoned, tiny launch constants, kernels run in Triton's
interpreter on CPU.
"""

import math
import warnings

import fastsp.kernels.feature_mse as kfm
import fastsp.kernels.feature_mse_multi as kfmm
import pytest
import torch
import torch.nn.functional as F

from fastsp.feature_loss import TritonUnavailableError, feature_mse_multi, feature_mse_multi_ref

# Different shapes, odd sizes, channels_last, a sliced view and a broadcast pair.
_PAIRS = [
    lambda dt: (torch.randn(3, 5, 7, dtype=dt), torch.randn(3, 5, 7, dtype=dt)),
    lambda dt: (torch.randn(41, 40, dtype=dt), torch.randn(41, 40, dtype=dt)),
    lambda dt: (torch.randn(3000, dtype=dt), torch.randn(3000, dtype=dt)),
    lambda dt: tuple(
        torch.randn(2, 6, 5, 3, dtype=dt).to(memory_format=torch.channels_last) for _ in range(2)
    ),
    lambda dt: (torch.randn(9, 40, dtype=dt)[1:8, ::3], torch.randn(7, 14, dtype=dt)),
    lambda dt: (torch.randn(4, 6, 5, dtype=dt), torch.randn(1, 6, 1, dtype=dt)),
]
_WEIGHTS = [0.5, 1.5, 2.0, 0.25, 1.0, 3.0]
# (dtype, atol, rtol): kernel error <= 2 x torch's own error in that dtype + atol + rtol * |ref|max
_DTYPES = [
    (torch.float32, 1e-6, 1e-6),
    (torch.bfloat16, 1e-5, 1e-3),
    (torch.float16, 1e-6, 2e-4),
]
_TEST_LAUNCH = (64, 8, 4)


def _poisoned_empty(shape, dtype, device):
    return torch.full(shape, math.nan, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _poison_and_small_launch(monkeypatch):
    for module in (kfm, kfmm):
        monkeypatch.setattr(module, "_empty", _poisoned_empty)
        monkeypatch.setattr(module, "_DEFAULT_LAUNCH", _TEST_LAUNCH)


def _pairs(dtype, seed=0):
    torch.manual_seed(seed)
    pairs = [make(dtype) for make in _PAIRS]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _run(fn, xs, ys, weights, grad_out, cast=None):
    """(loss, input grads, target grads, weight grad or None) of fn on fresh leaves."""
    xs = [(x.to(cast) if cast else x).detach().requires_grad_() for x in xs]
    ys = [(y.to(cast) if cast else y).detach().requires_grad_() for y in ys]
    if isinstance(weights, torch.Tensor):
        weights = (weights.to(cast) if cast else weights).detach().requires_grad_()
    leaves = [*xs, *ys] + ([weights] if isinstance(weights, torch.Tensor) else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the broadcast pair warns, as mse_loss does
        out = fn(xs, ys, weights)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    n = len(xs)
    return out, grads[:n], grads[n : 2 * n], grads[2 * n] if len(grads) > 2 * n else None


def _assert_rule(name, got, torch_got, ref, atol, rtol):
    err = (got.double() - ref).abs().max().item()
    torch_err = (torch_got.double() - ref).abs().max().item()
    bound = 2 * torch_err + atol + rtol * ref.abs().max().item()
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch {torch_err:.3g})"


@pytest.mark.parametrize("tensor_weights", [False, True])
@pytest.mark.parametrize("dtype, atol, rtol", _DTYPES)
def test_matches_float64_reference(dtype, atol, rtol, tensor_weights):
    xs, ys = _pairs(dtype)
    weights = torch.tensor(_WEIGHTS) if tensor_weights else _WEIGHTS
    g = torch.tensor(0.7)
    got = _run(feature_mse_multi, xs, ys, weights, g)
    torch_got = _run(feature_mse_multi_ref, xs, ys, weights, g)
    ref = _run(feature_mse_multi_ref, xs, ys, weights, g.double(), cast=torch.float64)
    assert got[0].dtype == torch_got[0].dtype
    _assert_rule("loss", got[0], torch_got[0], ref[0], atol, rtol)
    for i, (a, b, c) in enumerate(
        zip(got[1] + got[2], torch_got[1] + torch_got[2], ref[1] + ref[2], strict=True)
    ):
        assert a.shape == c.shape and a.dtype == b.dtype
        _assert_rule(f"grad {i}", a, b, c, atol, rtol)
    if tensor_weights:
        _assert_rule("grad weights", got[3], torch_got[3], ref[3], atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", _DTYPES)
def test_fused_and_unfused_backward_agree(dtype, atol, rtol):
    xs, ys = _pairs(dtype)
    xs = [x.detach().requires_grad_() for x in xs]
    for g in (1.0, -3.0):
        grad = torch.tensor(g, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the broadcast pair warns, as mse_loss does
            out = feature_mse_multi(xs, ys, _WEIGHTS)
        fused = torch.autograd.grad(out, xs, grad, retain_graph=True)
        unfused = torch.autograd.grad(out, xs, grad)
        for a, b in zip(fused, unfused, strict=True):
            assert torch.equal(a, b)  # one rounding on both paths


def test_mixed_dtypes_and_one_sided_grads():
    torch.manual_seed(0)
    xs = [torch.randn(41, 40, dtype=torch.bfloat16), torch.randn(3, 5, 7)]
    ys = [torch.randn(41, 40), torch.randn(3, 5, 7, dtype=torch.float16)]
    ys_leaf = [y.detach().requires_grad_() for y in ys]
    out = feature_mse_multi(xs, ys_leaf, [1.0, 2.0])
    assert out.dtype == torch.float32
    grads = torch.autograd.grad(out, ys_leaf, torch.tensor(0.3))
    yd = [y.double().requires_grad_() for y in ys]
    ref = torch.autograd.grad(
        feature_mse_multi_ref([x.double() for x in xs], yd, [1.0, 2.0]), yd, torch.tensor(0.3)
    )
    for a, r in zip(grads, ref, strict=True):
        assert a.dtype in (torch.float32, torch.float16)
        torch.testing.assert_close(a.double(), r, atol=1e-6, rtol=2e-3)


def test_bit_identical_runs():
    xs, ys = _pairs(torch.bfloat16)
    runs = [_run(feature_mse_multi, xs, ys, _WEIGHTS, torch.tensor(0.7)) for _ in range(3)]
    for run in runs[1:]:
        assert torch.equal(run[0], runs[0][0])
        assert all(
            torch.equal(a, b) for a, b in zip(run[1] + run[2], runs[0][1] + runs[0][2], strict=True)
        )


def test_empty_pair_gives_nan_like_torch():
    xs = [torch.randn(0).requires_grad_(), torch.randn(30)]
    ys = [torch.randn(0), torch.randn(30)]
    out = feature_mse_multi(xs, ys, [1.0, 1.0])
    assert out.isnan() and feature_mse_multi_ref(xs, ys, [1.0, 1.0]).isnan()
    (g,) = torch.autograd.grad(out, xs[0])
    assert g.shape == (0,)


def test_launch_rule():
    # sd21 mid-block (2.6 M elements), an empty pair, 3000 elements and 1e9 elements
    numels = [32 * 1280 * 64, 0, 3000, 10**9]
    block, tiles, starts, _ = kfmm.launch_rule(numels)
    assert block == 4096 and starts[-1] <= 4096 + len(numels)
    for n, first, end in zip(numels, starts, starts[1:], strict=False):
        assert (end - first - 1) * tiles * block < n <= (
            end - first
        ) * tiles * block or n == 0 == end - first


def test_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="need as many targets and weights"):
        feature_mse_multi([x], [x, x], [1.0])
    with pytest.raises(ValueError, match="need as many targets and weights"):
        feature_mse_multi([x], [x], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        feature_mse_multi([], [], [])
    with pytest.raises(RuntimeError, match="must match the size"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feature_mse_multi([x], [torch.randn(3, 5)], [1.0])
    with pytest.raises(TritonUnavailableError) as err:
        feature_mse_multi([x.double()], [x.to(device="meta")], [1.0], backend="triton")
    assert len(err.value.reasons) == 3, err.value.reasons
    # no float64 kernels: auto falls back to the reference
    out = feature_mse_multi([x.double().requires_grad_()], [x.double()], [1.0])
    assert "fastsp" not in type(out.grad_fn).__name__


def test_double_backward_raises():
    x = torch.randn(3, 5, 7, requires_grad=True)
    out = feature_mse_multi([x], [torch.randn(3, 5, 7)], [2.0])
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out, x, create_graph=True)


def test_dispatch():
    x, y = torch.randn(3, 5, 7, requires_grad=True), torch.randn(3, 5, 7)
    assert "fastsp" in type(feature_mse_multi([x], [y], [2.0]).grad_fn).__name__
    torch.testing.assert_close(
        feature_mse_multi([x], [y], [2.0], backend="torch"), 2.0 * F.mse_loss(x, y), rtol=0, atol=0
    )


def test_torch_compile_fullgraph():
    xs, ys = _pairs(torch.float32)
    w = torch.tensor(_WEIGHTS)

    def step(xs, ys, w):
        return feature_mse_multi(xs, ys, _WEIGHTS) + feature_mse_multi(xs, ys, w)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = [
        _run(lambda a, b, c, fn=fn: fn(a, b, w), xs, ys, _WEIGHTS, torch.tensor(1.5))
        for fn in (step, compiled)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a, b in zip(
            [results[0][0], *results[0][1], *results[0][2]],
            [results[1][0], *results[1][1], *results[1][2]],
            strict=True,
        ):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, atol, rtol", _DTYPES)
def test_gpu_matches_float64_reference(dtype, atol, rtol, monkeypatch):
    monkeypatch.setattr(kfm, "_DEFAULT_LAUNCH", (4096, 4096, 1024))
    monkeypatch.setattr(kfmm, "_DEFAULT_LAUNCH", (4096, 4096, 1024))
    xs, ys = _pairs(dtype)
    xs, ys = [x.cuda() for x in xs], [y.cuda() for y in ys]
    g = torch.tensor(0.7, device="cuda")
    got = _run(feature_mse_multi, xs, ys, _WEIGHTS, g)
    torch_got = _run(feature_mse_multi_ref, xs, ys, _WEIGHTS, g)
    ref = _run(feature_mse_multi_ref, xs, ys, _WEIGHTS, g.double(), cast=torch.float64)
    _assert_rule("loss", got[0], torch_got[0], ref[0], atol, rtol)
    for a, b, c in zip(got[1] + got[2], torch_got[1] + torch_got[2], ref[1] + ref[2], strict=True):
        _assert_rule("grad", a, b, c, atol, rtol)
