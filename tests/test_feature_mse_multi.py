"""fastsp.feature_mse_multi (grouped kernel, one launch for all pairs) against float64 references.

As in test_feature_mse.py: outputs poisoned, tiny launch constants (the production ones in
test_matches_float64_reference_at_production_launch), kernels run in Triton's interpreter on CPU.
"""

import math
import warnings

import fastsp.kernels._common as kcommon
import fastsp.kernels.feature_mse as kfm
import fastsp.kernels.feature_mse_multi as kfmm
import pytest
import torch
import torch.nn.functional as F
from host_reads import HostRead, no_host_reads

from fastsp.feature_loss import (
    TritonUnavailableError,
    feature_mse_multi,
    feature_mse_multi_ref,
    feature_mse_ref,
)

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
# (dtype, atol, rtol) for _assert_rule. fp32: rtol 2.4e-7 = 2 ulp (eps 1.19e-7). The bf16 (eps
# 7.8e-3) and fp16 (eps 9.8e-4) rtols are below one ulp of their dtype, tighter than 2 ulp: there
# torch's own error, which includes its final rounding, already gives the 2 x torch term the room.
_DTYPES = [
    (torch.float32, 1e-6, 2.4e-7),
    (torch.bfloat16, 1e-5, 1e-3),
    (torch.float16, 1e-6, 2e-4),
]
_TOLS = {dtype: (atol, rtol) for dtype, atol, rtol in _DTYPES}
_TEST_LAUNCH = (64, 8, 4)
_REAL_LAUNCH = kfm._DEFAULT_LAUNCH


def _poisoned_empty(shape, dtype, device):
    return torch.full(shape, math.nan, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _poison_and_small_launch(monkeypatch):
    # _empty is bound in every kernel module (the op files import it from _common, whose
    # _dense_like calls its own); _DEFAULT_LAUNCH is read by each op's public function.
    for module in (kcommon, kfm, kfmm):
        monkeypatch.setattr(module, "_empty", _poisoned_empty)
    for module in (kfm, kfmm):
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
    """flash-attention's rule, err <= 2 x torch_err + atol, plus rtol * |ref|max.

    The last term is a rounding allowance of about 2 ulp of the output dtype at the result's
    magnitude (rtol = 2 eps for fp32): the final rounding to the output dtype alone costs up to half
    an ulp, and the kernel sums in another order than torch (per-program partials, then stage 2),
    so where torch happens to land within a fraction of an ulp of the float64 value, 2 x its error
    leaves no room for an equally valid order that lands an ulp away.
    """
    err = (got.double() - ref).abs().max().item()
    torch_err = (torch_got.double() - ref).abs().max().item()
    bound = 2 * torch_err + atol + rtol * ref.abs().max().item()
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch {torch_err:.3g})"


def _check_against_references(xs, ys, weights, atol, rtol):
    g = torch.tensor(0.7)
    tensor_weights = isinstance(weights, torch.Tensor)
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


@pytest.mark.parametrize("tensor_weights", [False, True])
@pytest.mark.parametrize("dtype, atol, rtol", _DTYPES)
def test_matches_float64_reference(dtype, atol, rtol, tensor_weights):
    xs, ys = _pairs(dtype)
    weights = torch.tensor(_WEIGHTS) if tensor_weights else _WEIGHTS
    _check_against_references(xs, ys, weights, atol, rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference_at_production_launch(dtype, monkeypatch):
    # The launch the GPU runs (BLOCK 4096): 1, 20 and 1 programs for these pairs, so each pair's
    # summation order is the production one.
    for module in (kfm, kfmm):
        monkeypatch.setattr(module, "_DEFAULT_LAUNCH", _REAL_LAUNCH)
    torch.manual_seed(0)
    shapes = [(3000,), (41, 37, 53), (3, 5, 7)]
    xs = [torch.randn(shape, dtype=dtype) for shape in shapes]
    ys = [torch.randn(shape, dtype=dtype) for shape in shapes]
    _check_against_references(xs, ys, [0.5, 1.5, 2.0], *_TOLS[dtype])
    _check_against_references(xs, ys, torch.tensor([0.5, 1.5, 2.0]), *_TOLS[dtype])


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


@pytest.mark.parametrize(
    "dtype, needs_grad",
    [(torch.float32, "both"), (torch.float32, "inputs"), (torch.bfloat16, "inputs")],
)
def test_torch_compile_fullgraph(dtype, needs_grad):
    # "inputs" is the self-perceptual case (the real branch's features are detached). Weights as
    # numbers and as a list of tensors (stacked in the graph into the weight-tensor path). The
    # small pairs only (contiguous, channels_last, sliced, broadcast): the interpreter is slow.
    keep = [0, 3, 4, 5]
    xs, ys = ([t[i] for i in keep] for t in _pairs(dtype))
    numbers = [_WEIGHTS[i] for i in keep]
    w = torch.tensor(numbers)

    def step(xs, ys, w):
        return feature_mse_multi(xs, ys, numbers) + feature_mse_multi(xs, ys, list(w.unbind()))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        xl = [x.detach().requires_grad_() for x in xs]
        yl = [y.detach().requires_grad_(needs_grad == "both") for y in ys]
        wrt = xl + (yl if needs_grad == "both" else [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the broadcast pair warns, as mse_loss does
            out = fn(xl, yl, w)
        results.append([out, *torch.autograd.grad(out, wrt, torch.tensor(1.5, dtype=dtype))])
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_weights_as_numbers_tensor_or_list_of_tensors():
    xs, ys = _pairs(torch.float32)
    w = torch.tensor(_WEIGHTS)
    leaves = [v.clone().requires_grad_() for v in w]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the broadcast pair warns, as mse_loss does
        expected = feature_mse_multi_ref([x.double() for x in xs], [y.double() for y in ys], w)
        outs = [
            feature_mse_multi(xs, ys, _WEIGHTS),
            feature_mse_multi(xs, ys, tuple(_WEIGHTS)),
            feature_mse_multi(xs, ys, w),
            feature_mse_multi(xs, ys, leaves),  # stacked on the device, never read with float()
            feature_mse_multi(xs, ys, [leaves[0], *_WEIGHTS[1:]]),  # numbers become fills
        ]
        losses = [feature_mse_ref(x.double(), y.double()) for x, y in zip(xs, ys, strict=True)]
    for out in outs:
        torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=2.4e-7)
    grads = torch.autograd.grad(outs[3], leaves, torch.tensor(0.7))
    for grad, loss in zip(grads, losses, strict=True):  # dL/dw_i = loss_i * g
        torch.testing.assert_close(grad.double(), loss * 0.7, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="shape"):
        feature_mse_multi(xs[:1], ys[:1], [torch.ones(2)])  # one value per weight


@pytest.mark.parametrize("weights", ["numbers", "tensor", "list of tensors"])
@pytest.mark.parametrize("needs_grad", ["inputs", "both"])
def test_no_host_sync(needs_grad, weights):
    for dtype in (torch.float32, torch.bfloat16):  # fp32 buffers are scaled, bf16 recomputed
        torch.manual_seed(0)
        xs = [torch.randn(3, 5, 7, dtype=dtype, requires_grad=True), torch.randn(30, dtype=dtype)]
        ys = [torch.randn(3, 5, 7, dtype=dtype), torch.randn(30, dtype=dtype)]
        xs[1].requires_grad_()
        if needs_grad == "both":
            ys = [y.requires_grad_() for y in ys]
        w = torch.tensor([0.5, 2.0], requires_grad=True)
        w_arg = {"numbers": [0.5, 2.0], "tensor": w, "list of tensors": list(w.unbind())}[weights]
        wrt = xs + (ys if needs_grad == "both" else [])
        g = torch.tensor(0.7, dtype=dtype)
        with no_host_reads():
            out = feature_mse_multi(xs, ys, w_arg, backend="triton")
            first = torch.autograd.grad(out, wrt, g, retain_graph=True)  # the fused buffers
            second = torch.autograd.grad(out, wrt, torch.ones_like(g))  # from the pairs
        ref_xs = [x.detach().double().requires_grad_() for x in xs]
        ref_ys = [y.detach().double().requires_grad_() for y in ys]
        ref = feature_mse_multi_ref(ref_xs, ref_ys, [0.5, 2.0])
        ref_wrt = ref_xs + (ref_ys if needs_grad == "both" else [])
        ref_first = torch.autograd.grad(ref, ref_wrt, g.double(), retain_graph=True)
        ref_second = torch.autograd.grad(ref, ref_wrt, torch.tensor(1.0, dtype=torch.float64))
        torch.testing.assert_close(out, ref.to(out.dtype))
        for a, r in zip(first + second, ref_first + ref_second, strict=True):
            torch.testing.assert_close(a, r.to(dtype))  # torch's default tolerance for dtype


def test_the_host_read_check_fires(monkeypatch):
    # Negative control: a deliberate read in the grouped forward launcher is caught through the
    # custom op; so is the float() that list-of-tensor weights went through before they were
    # stacked.
    xs, ys = [torch.randn(3, 5, 7)], [torch.randn(3, 5, 7)]
    fwd = kfmm.feature_mse_multi_fwd

    def fwd_that_reads(xs, *args):
        xs[0].sum().item()
        return fwd(xs, *args)

    monkeypatch.setattr(kfmm, "feature_mse_multi_fwd", fwd_that_reads)
    with pytest.raises(HostRead, match="item"), no_host_reads():
        feature_mse_multi(xs, ys, [1.0], backend="triton")
    with pytest.raises(HostRead, match="__float__"), no_host_reads():
        [float(w) for w in [torch.tensor(0.5)]]


def test_forward_is_one_grouped_launch(monkeypatch):
    # Every pair in one launch of the grouped kernel, then one stage-2 launch; backward with
    # g != 1 is one launch too (scale for fp32 buffers, recompute for bf16).
    launches = []

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append((self.kernel.__name__, grid))
            return self.kernel[grid]

    kernels = [
        (module, name)
        for module in (kfm, kfmm)
        for name in dir(module)
        if name.startswith("_feature_mse") and name.endswith("_kernel")
    ]
    for module, name in kernels:
        monkeypatch.setattr(module, name, Counted(getattr(module, name)))
    for dtype, bwd in ((torch.float32, "scale"), (torch.bfloat16, "bwd")):
        xs, ys = _pairs(dtype)
        xs = [x.detach().requires_grad_() for x in xs]
        launches.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the broadcast pair warns, as mse_loss does
            out = feature_mse_multi(xs, ys, _WEIGHTS)
        programs = kfmm.launch_rule([x.numel() for x in xs], _TEST_LAUNCH)[2][-1]
        assert launches == [
            ("_feature_mse_multi_fwd_kernel", (programs,)),
            ("_feature_mse_multi_finalize_kernel", (1,)),
        ]
        launches.clear()
        torch.autograd.grad(out, xs, torch.tensor(0.7, dtype=dtype))
        assert launches == [(f"_feature_mse_multi_{bwd}_kernel", (programs,))]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, atol, rtol", _DTYPES)
def test_gpu_matches_float64_reference(dtype, atol, rtol, monkeypatch):
    for module in (kfm, kfmm):
        monkeypatch.setattr(module, "_DEFAULT_LAUNCH", _REAL_LAUNCH)
    xs, ys = _pairs(dtype)
    xs, ys = [x.cuda() for x in xs], [y.cuda() for y in ys]
    g = torch.tensor(0.7, device="cuda")
    got = _run(feature_mse_multi, xs, ys, _WEIGHTS, g)
    torch_got = _run(feature_mse_multi_ref, xs, ys, _WEIGHTS, g)
    ref = _run(feature_mse_multi_ref, xs, ys, _WEIGHTS, g.double(), cast=torch.float64)
    _assert_rule("loss", got[0], torch_got[0], ref[0], atol, rtol)
    for a, b, c in zip(got[1] + got[2], torch_got[1] + torch_got[2], ref[1] + ref[2], strict=True):
        _assert_rule("grad", a, b, c, atol, rtol)
