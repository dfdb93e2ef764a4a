"""fastsp.attention: backends agree with a float64 hand computation and with each other."""

import math

import pytest
import torch

from fastsp.attention import (
    ATTENTION_BACKENDS,
    AttentionBackendError,
    attention,
    not_supported_reasons,
)

# (B, Lq, Lk, H, D): odd sizes, cross-attention shapes (Lq != Lk), a single key.
_SHAPES = [(2, 17, 17, 3, 16), (3, 37, 77, 2, 40), (1, 64, 5, 4, 64), (2, 9, 1, 1, 8)]
# (dtype, atol, rtol) against the float64 hand computation.
_DTYPES = [(torch.float32, 2e-5, 1e-5), (torch.float64, 1e-12, 1e-12)]


def _inputs(shape, dtype, device="cpu", seed=0):
    b, lq, lk, h, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, lk, h, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, lk, h, d, generator=g, dtype=torch.float64)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def _hand_reference(q, k, v):
    """softmax(q k^T / sqrt(D)) v with explicit loops over batch and head, in float64."""
    q, k, v = (x.double().cpu() for x in (q, k, v))
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            scores = q[b, :, h] @ k[b, :, h].T / math.sqrt(q.shape[-1])  # [Lq, Lk]
            scores = scores - scores.max(dim=-1, keepdim=True).values
            p = scores.exp()
            out[b, :, h] = (p / p.sum(dim=-1, keepdim=True)) @ v[b, :, h]
    return out


@pytest.mark.parametrize("shape", _SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", _DTYPES)
@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_backend_matches_hand_computation(backend, shape, dtype, atol, rtol):
    q, k, v = _inputs(shape, dtype)
    out = attention(q, k, v, backend=backend)
    b, lq, _, h, d = shape
    assert out.shape == (b, lq, h, d)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), _hand_reference(q, k, v), atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", _SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", _DTYPES)
def test_math_and_sdpa_agree_with_gradients(shape, dtype, atol, rtol):
    q, k, v = _inputs(shape, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype) * 0.5 + 0.25
    results = {}
    for backend in ("math", "sdpa"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = attention(*leaves, backend=backend)
        out.backward(grad_out)
        results[backend] = (out.detach(), *(x.grad for x in leaves))
    for a, b in zip(results["math"], results["sdpa"], strict=True):
        torch.testing.assert_close(a, b, atol=4 * atol, rtol=4 * rtol)


def test_math_accumulates_in_fp32_for_low_precision():
    q, k, v = _inputs((2, 33, 21, 2, 32), torch.bfloat16, seed=3)
    ref = _hand_reference(q, k, v)
    out_math = attention(q, k, v, backend="math")
    out_sdpa = attention(q, k, v, backend="sdpa")
    assert out_math.dtype == torch.bfloat16
    err_math = (out_math.double() - ref).abs().max().item()
    err_sdpa = (out_sdpa.double() - ref).abs().max().item()
    # flash-attention's rule: at most 2x PyTorch's own error in the same dtype, plus a small atol.
    assert err_math <= 2 * err_sdpa + 1e-3


def test_forced_xformers_on_cpu_lists_every_reason():
    q, k, v = _inputs((2, 16, 16, 2, 32), torch.float32)
    reasons = not_supported_reasons("xformers", q, k, v)
    assert len(reasons) >= 1
    assert "cuda" in reasons[0].lower()
    with pytest.raises(AttentionBackendError) as excinfo:
        attention(q, k, v, backend="xformers")
    message = str(excinfo.value)
    for reason in reasons:
        assert reason.splitlines()[0] in message
    assert "xformers" in message


def test_runnable_backends_report_no_reasons():
    q, k, v = _inputs((2, 16, 8, 2, 32), torch.float32)
    for backend in ("auto", "sdpa", "math"):
        assert not_supported_reasons(backend, q, k, v) == []


def test_unknown_backend_and_bad_inputs_raise_value_error():
    q, k, v = _inputs((2, 16, 8, 2, 32), torch.float32)
    with pytest.raises(ValueError, match="flash"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="auto"):
        not_supported_reasons("flash", q, k, v)
    with pytest.raises(ValueError, match="batch, heads and head dim"):
        attention(q, k[..., :16], v[..., :16], backend="sdpa")
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k[0], v[0])
    assert ATTENTION_BACKENDS == ("auto", "xformers", "sdpa", "math")


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_compiles_fullgraph(backend):
    torch._dynamo.reset()
    q, k, v = _inputs((2, 19, 23, 2, 16), torch.float32, seed=4)
    compiled = torch.compile(
        lambda q, k, v: attention(q, k, v, backend=backend), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled(q, k, v), attention(q, k, v, backend="math"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(2, 1024, 1024, 5, 64), (2, 4096, 77, 10, 64), (3, 37, 41, 2, 40)]
)
def test_xformers_matches_sdpa_on_cuda(shape, dtype):
    q, k, v = _inputs(shape, dtype, device="cuda", seed=5)
    assert not_supported_reasons("xformers", q, k, v) == []
    ref = _hand_reference(q, k, v).cuda()
    out_xf = attention(q, k, v, backend="xformers")
    out_sdpa = attention(q, k, v, backend="sdpa")
    out_auto = attention(q, k, v, backend="auto")
    err_xf = (out_xf.double() - ref).abs().max().item()
    err_sdpa = (out_sdpa.double() - ref).abs().max().item()
    assert err_xf <= 2 * err_sdpa + 1e-3
    torch.testing.assert_close(out_auto, out_xf, atol=0, rtol=0)
    # Backward through xformers agrees with SDPA's.
    grad_out = torch.randn_like(out_xf)
    grads = {}
    for backend, compute in (("xformers", dtype), ("sdpa", dtype), ("math", torch.float32)):
        leaves = [x.detach().to(compute).requires_grad_(True) for x in (q, k, v)]
        attention(*leaves, backend=backend).backward(grad_out.to(compute))
        grads[backend] = [x.grad.double() for x in leaves]
    for g_xf, g_sdpa, g_ref in zip(grads["xformers"], grads["sdpa"], grads["math"], strict=True):
        assert (g_xf - g_ref).abs().max() <= 2 * (g_sdpa - g_ref).abs().max() + 1e-2
