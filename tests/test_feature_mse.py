"""fastsp.feature_mse against float64 references; on CPU the Triton kernels run in the interpreter.

Every test runs with outputs poisoned (all allocations of the op filled with NaN) and with tiny
launch constants (BLOCK 64, at most 8 programs, stage 2 summing 4 partials a step), so that small
tensors still cover many tiles per program, many programs and a multi-step stage 2. The
float64 tests marked ``at_production_launch`` (and test_bit_identical_runs) also run the GPU's
constants, whose summation order the tiny ones do not reproduce.
"""

import math
import warnings

import fastsp.kernels._common as kcommon
import fastsp.kernels._strided as kstrided
import fastsp.kernels.feature_mse as kfm
import fastsp.kernels.feature_mse_multi as kfmm
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from host_reads import HostRead, no_host_reads

from fastsp import feature_loss
from fastsp.feature_loss import (
    FeatureMSELoss,
    TritonUnavailableError,
    feature_mse,
    feature_mse_backend,
    feature_mse_ref,
    triton_unsupported_reasons,
)

_SHAPES = [(3, 5, 7), (41, 401), (3000,)]
# (dtype, atol, rtol) for _assert_rule. fp32: rtol 2.4e-7 = 2 ulp (eps 1.19e-7). The bf16 (eps
# 7.8e-3) and fp16 (eps 9.8e-4) rtols are below one ulp of their dtype, tighter than 2 ulp: there
# torch's own error, which includes its final rounding, already gives the 2 x torch term the room.
_DTYPES = [
    (torch.float32, 1e-6, 2.4e-7),
    (torch.bfloat16, 1e-5, 1e-3),
    (torch.float16, 1e-6, 2e-4),
]
_TOLS = {dtype: (atol, rtol) for dtype, atol, rtol in _DTYPES}
_REDUCTIONS = ["none", "mean", "sum"]
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


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _run(fn, x, y, reduction, grad_out):
    """(loss, grad input, grad target) of fn on fresh leaves of x and y."""
    x, y = _leaf(x), _leaf(y)
    out = fn(x, y, reduction)
    gx, gy = torch.autograd.grad(out, (x, y), grad_out.to(out.dtype))
    return out, gx, gy


def _grad_out(shape, reduction, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if reduction == "none":
        return torch.randn(shape, generator=gen)
    return torch.tensor(0.7)


def _assert_rule(name, got, torch_got, ref, atol, rtol):
    """flash-attention's rule, err <= 2 x torch_err + atol, plus rtol * |ref|max (see below).

    The last term is a rounding allowance of about 2 ulp of the output dtype at the result's
    magnitude (rtol = 2 eps for fp32): the final rounding to the output dtype alone costs up to half
    an ulp, and the kernel sums in another order than torch (per-program partials, then stage 2),
    so where torch happens to land within a fraction of an ulp of the float64 value, 2 x its error
    leaves no room for an equally valid order that lands an ulp away (an fp32 sum of 3000 elements
    at the production launch: 1.2 ulp off, 7 x torch's error).
    """
    err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
    torch_err = (torch_got.double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    bound = 2 * torch_err + atol + rtol * scale
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch {torch_err:.3g})"


def _check_against_references(x, y, reduction, grad_out=None):
    """Loss and both gradients against float64, each within _assert_rule for its own dtype."""
    grad_out = (
        _grad_out(torch.broadcast_shapes(x.shape, y.shape), reduction)
        if grad_out is None
        else grad_out
    )
    got = _run(feature_mse, x, y, reduction, grad_out)
    torch_got = _run(feature_mse_ref, x, y, reduction, grad_out)
    ref = _run(feature_mse_ref, x.double(), y.double(), reduction, grad_out.double())
    for name, a, b, c in zip(
        ("loss", "grad input", "grad target"), got, torch_got, ref, strict=True
    ):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert not a.isnan().any() or reduction == "mean" and x.numel() == 0, f"{name} has NaN"
        _assert_rule(name, a, b, c, *_TOLS[a.dtype])
    return got


@pytest.mark.parametrize("reduction", _REDUCTIONS)
@pytest.mark.parametrize("dtype", [dtype for dtype, _, _ in _DTYPES])
@pytest.mark.parametrize("shape", _SHAPES)
def test_matches_float64_reference(shape, dtype, reduction):
    x, y = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    _check_against_references(x, y, reduction)


@pytest.mark.parametrize("shape", [(3000,), (41, 37, 53)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference_at_production_launch(dtype, shape, monkeypatch):
    # The launch the GPU runs (BLOCK 4096, up to 4096 programs): 1 and 20 programs, one partial
    # sum per program, so the summation order is the production one.
    monkeypatch.setattr(kfm, "_DEFAULT_LAUNCH", _REAL_LAUNCH)
    torch.manual_seed(0)
    x, y = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    for reduction in _REDUCTIONS:
        _check_against_references(x, y, reduction)


@pytest.mark.parametrize("reduction", _REDUCTIONS)
def test_mixed_dtypes_promote_like_torch(reduction):
    x, y = torch.randn(41, 37, dtype=torch.bfloat16), torch.randn(41, 37)
    out, gx, gy = _check_against_references(x, y, reduction)
    assert (out.dtype, gx.dtype, gy.dtype) == (torch.float32, torch.bfloat16, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_only_one_side_requires_grad(reduction):
    x, y = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    for needs in ((True, False), (False, True)):
        xl, yl = x.clone().requires_grad_(needs[0]), y.clone().requires_grad_(needs[1])
        xr, yr = x.double().requires_grad_(needs[0]), y.double().requires_grad_(needs[1])
        (g,) = torch.autograd.grad(feature_mse(xl, yl, reduction), [xl if needs[0] else yl])
        (r,) = torch.autograd.grad(
            F.mse_loss(xr, yr, reduction=reduction), [xr if needs[0] else yr]
        )
        torch.testing.assert_close(g.double(), r, atol=1e-7, rtol=1e-5)
    with torch.no_grad():
        out = feature_mse(x.requires_grad_(), y, reduction)
    assert not out.requires_grad


@pytest.mark.parametrize("dtype, atol, rtol", _DTYPES)
def test_fused_and_unfused_backward_agree(dtype, atol, rtol):
    # The first backward scales the buffers written by the forward (skipped on the device when
    # the grad is 1); a second one through the retained graph recomputes from x and y.
    x, y = _leaf(torch.randn(41, 67, dtype=dtype)), _leaf(torch.randn(41, 67, dtype=dtype))
    xd, yd = _leaf(x.double()), _leaf(y.double())
    for g in (1.0, 0.7, -3.0):
        grad = torch.tensor(g, dtype=dtype)
        out = feature_mse(x, y)
        fused = torch.autograd.grad(out, (x, y), grad, retain_graph=True)
        unfused = torch.autograd.grad(out, (x, y), grad)
        torch_got = torch.autograd.grad(F.mse_loss(x, y), (x, y), grad)
        ref = torch.autograd.grad(F.mse_loss(xd, yd), (xd, yd), torch.tensor(g))
        for a, b, t, r in zip(fused, unfused, torch_got, ref, strict=True):
            _assert_rule("fused", a, t, r, atol, rtol)
            _assert_rule("unfused", b, t, r, atol, rtol)
            if g == 1.0:  # a single rounding on either path: bit-identical
                assert torch.equal(a, b)


def test_backward_twice_accumulates_like_torch():
    x, y = torch.randn(3000), torch.randn(3000)
    grads = []
    for fn in (feature_mse, feature_mse_ref):
        xl = _leaf(x)
        out = fn(xl, y, "sum")
        out.backward(torch.tensor(0.5), retain_graph=True)
        out.backward(torch.tensor(2.0))
        grads.append(xl.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def _channels_last(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("reduction", _REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "case", ["channels_last", "channels_last_vs_contiguous", "sliced", "transposed", "rank6"]
)
def test_non_contiguous(case, dtype, reduction):
    def randn(*shape):
        return torch.randn(shape, dtype=dtype)

    if case == "channels_last":
        x, y = _channels_last(2, 6, 5, 3, dtype=dtype), _channels_last(2, 6, 5, 3, dtype=dtype)
    elif case == "channels_last_vs_contiguous":
        x, y = _channels_last(2, 6, 5, 3, dtype=dtype), randn(2, 6, 5, 3)
    elif case == "sliced":
        x, y = randn(9, 40, 11)[1:8, ::3, 2:9], randn(7, 14, 8)[:, :, 1:]
    elif case == "transposed":
        x, y = randn(33, 41).t(), randn(41, 33)
    else:  # six dimensions that cannot merge: copied to contiguous first
        x, y = randn(2, 3, 2, 3, 2, 3).permute(5, 3, 1, 0, 2, 4), randn(3, 3, 3, 2, 2, 2)
    out, gx, _ = _check_against_references(x, y, reduction)
    if case == "channels_last":  # dense pair with equal strides: outputs keep the layout
        assert gx.is_contiguous(memory_format=torch.channels_last)
        if reduction == "none":
            assert out.stride() == F.mse_loss(x, y, reduction="none").stride()


@pytest.mark.parametrize("reduction", _REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_broadcasting_matches_mse_loss(dtype, reduction):
    gen = torch.Generator().manual_seed(0)  # its own draw, whatever ran before on this worker
    x = torch.randn(4, 6, 5, 3, generator=gen).to(dtype)
    y = torch.randn(1, 6, 1, 1, generator=gen).to(dtype)
    with pytest.warns(UserWarning, match="Using a target size"):
        _check_against_references(x, y, reduction)


def test_expanded_grad_output_for_none():
    # The grad of .mean() reaches the op as a stride-0 tensor: read in place, never materialised.
    x, y = _leaf(torch.randn(3, 5, 7)), torch.randn(3, 5, 7)
    (gx,) = torch.autograd.grad(feature_mse(x, y, "none").mean(), x)
    xd = _leaf(x.double())
    (ref,) = torch.autograd.grad(F.mse_loss(xd, y.double(), reduction="none").mean(), xd)
    torch.testing.assert_close(gx.double(), ref, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("shape", [(0,), (2, 0, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", _REDUCTIONS)
def test_empty(shape, dtype, reduction):
    x, y = _leaf(torch.randn(shape, dtype=dtype)), _leaf(torch.randn(shape, dtype=dtype))
    out, ref = feature_mse(x, y, reduction), F.mse_loss(x, y, reduction=reduction)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, equal_nan=True, atol=0, rtol=0)
    gx, gy = torch.autograd.grad(out, (x, y), torch.ones_like(out))
    assert (gx.shape, gx.dtype, gy.shape, gy.dtype) == (x.shape, dtype, y.shape, dtype)


@pytest.mark.parametrize("launch", [_TEST_LAUNCH, _REAL_LAUNCH])
@pytest.mark.parametrize("reduction", _REDUCTIONS)
def test_bit_identical_runs(launch, reduction, monkeypatch):
    monkeypatch.setattr(kfm, "_DEFAULT_LAUNCH", launch)
    x, y = torch.randn(41, 67, dtype=torch.bfloat16), torch.randn(41, 67, dtype=torch.bfloat16)
    g = _grad_out(x.shape, reduction)
    runs = [_run(feature_mse, x, y, reduction, g) for _ in range(3)]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))


def test_launch_rule():
    assert kfm.launch_rule(32 * 1280 * 8 * 8) == (4096, 1, 640, 1024)
    assert kfm.launch_rule(2**26) == (4096, 4, 4096, 1024)
    block, tiles, programs, _ = kfm.launch_rule(10**9)
    assert programs <= 4096 and (programs - 1) * tiles * block < 10**9 <= programs * tiles * block
    assert kfm.launch_rule(0) == (4096, 1, 1, 1024)


@triton.jit
def _offsets_probe_kernel(out_ptr, pid, tiles, layout, BLOCK: tl.constexpr):
    start = kcommon._chunk_start(pid, tiles, BLOCK)
    local = tl.arange(0, BLOCK)
    tl.store(out_ptr + local, start + local)
    coords = kstrided._coordinates(start, local, layout)
    tl.store(out_ptr + BLOCK + local, kstrided._offsets(coords, (1, 1, 1, 1), False))


# (s1, s2, s3): small sizes carry often; a size near the int32 limit of the divisors
@pytest.mark.parametrize("sizes", [(7, 5, 3), (1, 65537, 2**31 - 5000), (1000003, 1, 12345)])
def test_offsets_are_64_bit(sizes):
    # The kernels' offset helpers, fed an int32 program id whose first element lies past 2^32:
    # the coordinates (per-tile int64 split, per-element int32 carries through the divisors of
    # kernels/_strided.py) against Python's integer division.
    # (A real tensor above 2^31 elements runs in test_more_than_2_31_elements_on_gpu.)
    pid, tiles, block = 2**20 + 3, 5, 1024
    assert not kstrided.needs_copy([2, *sizes], block)
    out = torch.zeros(2 * block, dtype=torch.int64)
    _offsets_probe_kernel[(1,)](out, pid, tiles, kstrided.layout_args([2, *sizes]), BLOCK=block)
    start = pid * tiles * block
    assert start > 2**32
    expected = torch.arange(start, start + block, dtype=torch.int64)
    assert torch.equal(out[:block], expected)
    s1, s2, s3 = sizes
    i3, r = expected % s3, expected // s3
    i2, r = r % s2, r // s2
    assert torch.equal(out[block:], r // s1 + r % s1 + i2 + i3)


# (shape, memory order of x's dimensions, x's last dimension cut from one 16 longer); y is
# contiguous. Then the accesses of x and y (kernels/_strided.py: 2 flat, 1 runs, 0 gathered).
_GATHERS = [
    ((2, 32, 4, 48), (0, 2, 3, 1), None, (0, 1)),
    ((3, 16, 5, 32), (0, 1, 2, 3), 16, (1, 2)),
    ((2, 16, 3, 24), (0, 2, 3, 1), None, (0, 0)),
    ((4, 5, 32), (0, 1, 2), 16, (1, 2)),
    ((4, 5, 24), (0, 1, 2), 16, (0, 2)),
]


def _traversal_offsets(t, order):
    # Each element's memory offset, in the kernels' traversal order, from torch's own strides.
    memory = torch.as_strided(torch.arange(t.storage_offset() + t.numel() * 4), t.shape, t.stride())
    return memory.permute(order).reshape(-1) - t.storage_offset()


@pytest.mark.parametrize("shape, memory_order, cut, expected", _GATHERS)
def test_gathered_runs_hint_holds(shape, memory_order, cut, expected):
    # Where the host tells the compiler that a gathered operand comes in aligned runs of 16
    # contiguous elements (access 1: the GPU then loads it 128-bit; the interpreter ignores the
    # hint), every aligned group of 16 traversal indices must map to 16 consecutive offsets
    # starting at a multiple of 16. Checked on every element.
    full = [shape[d] for d in memory_order]
    if cut is not None:
        full[-1] += 16
    inverse = sorted(range(len(memory_order)), key=memory_order.__getitem__)
    x = torch.empty(full).permute(inverse)
    if cut is not None:
        x = x[..., 16:]
    y = torch.empty(x.shape)
    order = kfm._output_order(x, y)
    _, _, _, accesses = kstrided.prepare(order, 4096, x, y)
    assert tuple(accesses) == expected
    for t, access in zip((x, y), accesses, strict=True):
        memory = _traversal_offsets(t, order)
        if access == 2:
            assert torch.equal(memory, torch.arange(t.numel()))
        if access == 1:
            runs = memory.view(-1, 16)
            assert (runs[:, 0] % 16 == 0).all()
            assert torch.equal(runs - runs[:, :1], torch.arange(16).expand_as(runs))


def test_errors_match_torch():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError) as ours, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feature_mse(x, torch.randn(3, 5))
    with pytest.raises(RuntimeError) as theirs, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.mse_loss(x, torch.randn(3, 5))
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="foo is not a valid value for reduction"):
        feature_mse(x, x, "foo")
    with pytest.raises(ValueError, match="foo is not a valid value for reduction"):
        FeatureMSELoss("foo")
    with pytest.raises(ValueError, match="backend must be one of"):
        feature_mse(x, x, backend="cuda")


@pytest.mark.parametrize("reduction", _REDUCTIONS)
def test_double_backward_raises(reduction):
    x = torch.randn(3, 5, 7, requires_grad=True)
    out = feature_mse(x, torch.randn(3, 5, 7), reduction).sum()
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out, x, create_graph=True)


def test_forced_triton_lists_every_reason():
    x = torch.randn(3, 4, dtype=torch.float64, device="meta")
    y = torch.randn(3, 4, dtype=torch.float16)
    with pytest.raises(TritonUnavailableError) as err:
        feature_mse(x, y, backend="triton")
    reasons = err.value.reasons
    assert len(reasons) == 3, reasons
    assert any("different devices" in r for r in reasons)
    assert any("meta" in r and "neither CUDA nor CPU" in r for r in reasons)
    assert any("float64" in r for r in reasons)
    assert all(r in str(err.value) for r in reasons)
    assert triton_unsupported_reasons(torch.randn(2), torch.randn(2)) == []


def test_dispatch():
    x, y = torch.randn(3, 5, 7, requires_grad=True), torch.randn(3, 5, 7)
    assert "fastsp" in type(feature_mse(x, y).grad_fn).__name__  # auto: interpreter on CPU
    assert "fastsp" in type(feature_mse(x, y, backend="triton").grad_fn).__name__
    assert type(feature_mse(x, y, backend="torch").grad_fn).__name__ == "MseLossBackward0"
    xd = x.double()  # no float64 kernels: auto falls back to torch
    assert type(feature_mse(xd, y.double()).grad_fn).__name__ == "MseLossBackward0"
    torch.testing.assert_close(feature_mse(x, y, backend="torch"), F.mse_loss(x, y), rtol=0, atol=0)


def test_cpu_without_the_interpreter_is_a_reason(monkeypatch):
    # kcommon.INTERPRETED is what Triton decided at import; without the interpreter CPU tensors
    # cannot run: forced triton says so, auto falls back to the reference.
    monkeypatch.setattr(kcommon, "INTERPRETED", False)
    x, y = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    assert triton_unsupported_reasons(x, y) == [
        "the Triton kernels run on CUDA, or on CPU only under TRITON_INTERPRET=1 set "
        "before triton is imported"
    ]
    with pytest.raises(TritonUnavailableError, match="TRITON_INTERPRET=1"):
        feature_mse(x, y, backend="triton")
    out = feature_mse(x, y)
    assert type(out.grad_fn).__name__ == "MseLossBackward0"
    torch.testing.assert_close(out, F.mse_loss(x, y), atol=0, rtol=0)


def test_backend_report():
    # Under the interpreter (these tests' setup) the kernels run for CPU tensors, and for CUDA
    # ones, named without touching any device (there is none on a CPU machine).
    assert kcommon.INTERPRETED
    assert feature_mse_backend(torch.device("cpu")) == "triton (interpreter)"
    assert feature_mse_backend("cuda") == "triton (interpreter)"
    assert feature_mse_backend("cpu", backend="triton") == "triton (interpreter)"
    assert feature_mse_backend("cpu", backend="torch") == "torch F.mse_loss (backend='torch')"
    meta = torch.empty(2, device="meta")
    assert feature_mse_backend("meta") == (
        f"torch F.mse_loss ({'; '.join(triton_unsupported_reasons(meta))})"
    )
    with pytest.raises(ValueError, match="backend must be one of"):
        feature_mse_backend("cpu", backend="cuda")
    with no_host_reads():
        feature_mse_backend("cpu")


def test_backend_report_without_the_interpreter(monkeypatch):
    # The report gives the reasons triton_unsupported_reasons gives for tensors on that device;
    # forced triton raises as feature_mse would.
    monkeypatch.setattr(kcommon, "INTERPRETED", False)
    (reason,) = triton_unsupported_reasons(torch.randn(2))
    assert feature_mse_backend("cpu") == f"torch F.mse_loss ({reason})"
    assert feature_mse_backend("cuda") == "triton (fused kernels)"
    with pytest.raises(TritonUnavailableError, match="TRITON_INTERPRET=1"):
        feature_mse_backend("cpu", backend="triton")


def test_import_failure_is_listed_with_every_other_reason(monkeypatch):
    monkeypatch.setattr(feature_loss, "_IMPORT_ERROR", "triton kernels cannot be imported (test)")
    monkeypatch.setattr(feature_loss, "_k", None)
    monkeypatch.setattr(feature_loss, "_km", None)
    x = torch.randn(3, 4, dtype=torch.float64, device="meta")
    y = torch.randn(3, 4, dtype=torch.float16)
    with pytest.raises(TritonUnavailableError) as err:
        feature_mse(x, y, backend="triton")
    reasons = err.value.reasons
    assert len(reasons) == 5, reasons
    assert reasons[0] == "triton kernels cannot be imported (test)"
    for part in ("different devices", "TRITON_INTERPRET=1", "neither CUDA nor CPU", "float64"):
        assert sum(part in r for r in reasons) == 1, (part, reasons)
    xl = torch.randn(3, 4, requires_grad=True)  # auto runs the reference
    assert type(feature_mse(xl, y.float()).grad_fn).__name__ == "MseLossBackward0"


@pytest.mark.parametrize("needs_grad", ["input", "both"])
@pytest.mark.parametrize("reduction", _REDUCTIONS)
def test_no_host_sync(reduction, needs_grad):
    for dtype in (torch.float32, torch.bfloat16):  # fp32 buffers are scaled, bf16 recomputed
        x = _leaf(torch.randn(3, 5, 7, dtype=dtype))
        y = torch.randn(3, 5, 7, dtype=dtype)
        y = _leaf(y) if needs_grad == "both" else y
        wrt = [t for t in (x, y) if t.requires_grad]
        g = _grad_out(x.shape, reduction).to(dtype)
        with no_host_reads():
            out = feature_mse(x, y, reduction, backend="triton")
            # mean/sum: the fused buffers (scaled or recomputed); then, through the retained
            # graph, the backward from x and y
            first = torch.autograd.grad(out, wrt, g, retain_graph=True)
            second = torch.autograd.grad(out, wrt, torch.ones_like(g))
        xd, yd = _leaf(x.double()), _leaf(y.double())
        ref = F.mse_loss(xd, yd, reduction=reduction)
        ref_first = torch.autograd.grad(ref, [xd, yd][: len(wrt)], g.double(), retain_graph=True)
        ref_second = torch.autograd.grad(ref, [xd, yd][: len(wrt)], torch.ones_like(g).double())
        _assert_rule("loss", out, F.mse_loss(x, y, reduction=reduction), ref, *_TOLS[dtype])
        for a, r in zip(first + second, ref_first + ref_second, strict=True):
            torch.testing.assert_close(a, r.to(dtype))  # torch's default tolerance for dtype


def test_the_host_read_check_fires(monkeypatch):
    # Negative control: a deliberate read in the op's forward, then in its backward, is caught
    # through the custom op and the autograd engine.
    x, y = _leaf(torch.randn(3, 5, 7)), torch.randn(3, 5, 7)
    fwd, scale = kfm.feature_mse_fwd, kfm.feature_mse_scale

    def fwd_that_reads(x, *args):
        float(x.sum())
        return fwd(x, *args)

    def scale_that_reads(gx, gy, grad_out, *args):
        grad_out.item()
        return scale(gx, gy, grad_out, *args)

    monkeypatch.setattr(kfm, "feature_mse_fwd", fwd_that_reads)
    with pytest.raises(HostRead, match="__float__"), no_host_reads():
        feature_mse(x, y, backend="triton")
    monkeypatch.setattr(kfm, "feature_mse_fwd", fwd)
    monkeypatch.setattr(kfm, "feature_mse_scale", scale_that_reads)
    out = feature_mse(x, y, backend="triton")
    with pytest.raises(HostRead, match="item"), no_host_reads():
        torch.autograd.grad(out, x, torch.tensor(0.7))
    with pytest.raises(HostRead, match="__bool__"), no_host_reads():
        if x.sum() > 0:  # a data-dependent Python branch
            pass


@pytest.mark.parametrize("reduction", _REDUCTIONS)
def test_module(reduction):
    module, ref = FeatureMSELoss(reduction), torch.nn.MSELoss(reduction=reduction)
    assert repr(module) == f"FeatureMSELoss(reduction='{reduction}')"
    x, y = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    torch.testing.assert_close(module(x, y), ref(x, y), atol=1e-6, rtol=1e-5)


def _compile_step(x, y, module):
    return feature_mse(x, y) * 0.5 + feature_mse(x, y, "none").sum() * 0.1 + module(x, y)


def _eager_and_compiled(compiled, x, y, needs_grad, runs=2):
    """(loss, grads...) of _compile_step eagerly, then of ``compiled`` ``runs`` times."""
    module = FeatureMSELoss("sum")
    results = []
    for fn in (_compile_step, *[compiled] * runs):
        xl = _leaf(x) if needs_grad in ("both", "input") else x.clone()
        yl = _leaf(y) if needs_grad in ("both", "target") else y.clone()
        out = fn(xl, yl, module)
        wrt = [t for t in (xl, yl) if t.requires_grad]
        results.append((out, *torch.autograd.grad(out, wrt, torch.tensor(1.5, dtype=x.dtype))))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs_grad", ["both", "input", "target"])
def test_torch_compile_fullgraph(needs_grad, dtype):
    # "input" is the self-perceptual loss's case (features of the real branch carry no grad):
    # the fused backward's unused buffer must not be returned as an output (an alias of an
    # input, which torch.library refuses under compile). The traced backward takes another
    # branch per dtype: fp32 buffers are scaled by a fresh-output op, bf16 ones recomputed.
    x, y = torch.randn(2, 6, 5, 3, dtype=dtype), torch.randn(2, 6, 5, 3, dtype=dtype)
    compiled = torch.compile(_compile_step, fullgraph=True, backend="aot_eager")
    results = _eager_and_compiled(compiled, x, y, needs_grad)
    for got in results[1:]:
        for a, b in zip(results[0], got, strict=True):
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.slow
def test_torch_compile_inductor():
    # The one inductor case (a C++ build on CPU): the ops must lower, forward and backward, with
    # inductor generating the code around them. Built in this process, without a precompiled
    # header: for the suite's one inductor compile, a pool of compile workers (each importing
    # torch) and a 300 MB header build cost more than they save.
    x, y = torch.randn(2, 6, 5, 3), torch.randn(2, 6, 5, 3)
    compiled = torch.compile(_compile_step, fullgraph=True, backend="inductor")
    from torch._inductor import config as inductor_config

    with inductor_config.patch(compile_threads=1, cpp_cache_precompile_headers=False):
        results = _eager_and_compiled(compiled, x, y, "both", runs=1)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", _REDUCTIONS)
@pytest.mark.parametrize("dtype, atol, rtol", _DTYPES)
def test_gpu_matches_float64_reference(dtype, atol, rtol, reduction, monkeypatch):
    monkeypatch.setattr(kfm, "_DEFAULT_LAUNCH", _REAL_LAUNCH)
    for shape in [(32, 1280, 8, 8), (41, 401, 1271), (3000,)]:
        x = torch.randn(shape, dtype=dtype, device="cuda")
        y = torch.randn(shape, dtype=dtype, device="cuda")
        g = _grad_out(shape, reduction).cuda()
        got = _run(feature_mse, x, y, reduction, g)
        torch_got = _run(feature_mse_ref, x, y, reduction, g)
        ref = _run(feature_mse_ref, x.double(), y.double(), reduction, g.double())
        for a, b, c in zip(got, torch_got, ref, strict=True):
            _assert_rule(f"{shape}", a, b, c, atol, rtol)


@pytest.mark.cuda
def test_gpu_cuda_graph_capture(monkeypatch):
    monkeypatch.setattr(kfm, "_DEFAULT_LAUNCH", _REAL_LAUNCH)
    x = torch.randn(32, 1280, 8, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(32, 1280, 8, 8, device="cuda", dtype=torch.bfloat16)
    g = torch.tensor(0.5, device="cuda", dtype=torch.bfloat16)

    def step():
        loss = feature_mse(x, y)
        return loss, torch.autograd.grad(loss, x, g)[0]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, gx = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    g.fill_(2.0)
    graph.replay()
    ref_loss, ref_gx = step()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.slow
def test_more_than_2_31_elements_on_gpu(monkeypatch):
    monkeypatch.setattr(kfm, "_DEFAULT_LAUNCH", _REAL_LAUNCH)
    n = 2**31 + 4097  # 4 GiB per bf16 tensor; the last tiles lie past int32 offsets
    x = torch.zeros(n, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    y = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        x[-5:] = 2.0
        y[:3] = 1.0
    loss = feature_mse(x, y, "sum")
    assert loss.item() == 5 * 4.0 + 3 * 1.0
    (gx,) = torch.autograd.grad(loss, x)
    assert gx[-5:].eq(4.0).all() and gx[:3].eq(-2.0).all() and gx[3:-5].abs().sum().item() == 0
