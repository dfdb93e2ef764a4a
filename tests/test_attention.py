"""fastsp.attention: backends agree with a float64 hand computation and with each other."""

import math

import pytest
import torch

import fastsp.attention as attention_lib
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


def _extension_loads() -> bool:
    import xformers  # noqa: F401 (xformers records its extension's load at import)

    return attention_lib._extension_error() is None


def test_unloadable_xformers_extension_means_sdpa_with_the_reason(monkeypatch):
    # The installed xformers wheel is built for another torch: its C++/CUDA extension does not
    # load, so neither auto nor a forced xformers may use it, and the first lines say why.
    if _extension_loads():
        pytest.skip("xformers' extension loads here")
    monkeypatch.setattr(attention_lib, "_xops", None)
    monkeypatch.setattr(attention_lib, "_xops_error", None)
    assert attention_lib._import_xformers() is None
    reason = attention_lib._xops_error
    assert "C++/CUDA extension does not load" in reason and torch.__version__ in reason
    cuda = torch.device("cuda")
    assert attention_lib.describe_backend("auto", cuda) == f"sdpa ({reason})"
    assert reason in attention_lib.describe_backend("xformers", cuda)


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fmha_operator_from_the_registry(capability, dtype):
    # The operator xformers' dispatcher picks, found on meta tensors (nothing runs): the first
    # of its CUDA order whose own checks pass; bf16 before an A100 finds none.
    fmha = pytest.importorskip("xformers.ops.fmha")
    q = torch.empty(2, 64, 5, 64, device="meta", dtype=dtype, requires_grad=True)
    k = torch.empty(2, 77, 5, 64, device="meta", dtype=dtype)
    found = attention_lib.fmha_operators(q, k, k, True, capability)
    inp = fmha.Inputs(query=q, key=k, value=k)
    for direction, names in attention_lib._CUDA_ORDER.items():
        ops = [getattr(getattr(fmha, n.split(".")[0]), n.split(".")[1]) for n in names]
        supported = [op for op in ops if not attention_lib._fmha_reasons(op, inp, capability)]
        assert found[direction] == supported[0].NAME
    if dtype == torch.float32:  # flash kernels take fp16/bf16 only: cutlass it is
        assert found["forward"] == fmha.cutlass.FwOp.NAME
    own = not any(found[d].endswith("-pt") for d in ("forward", "backward"))
    assert found["own_kernels"] == ("yes" if own else "no")
    if dtype == torch.bfloat16:  # bf16 needs an A100 or later
        assert "unavailable" in attention_lib.fmha_operators(q, k, k, True, (7, 5))
    wide = torch.empty(2, 64, 5, 512, device="meta", dtype=dtype)  # beyond flash's 256
    found = attention_lib.fmha_operators(wide, wide, wide, False, capability)
    assert found["forward"] == fmha.cutlass.FwOp.NAME and "> 256" in found["passed_over"]


def test_backends_json_records_the_fmha_operators_of_the_model():
    # What assembly writes to backends.json (attention_fmha) for a CUDA run: per distinct layer
    # shape, the registry's answer for an H100 where this machine has no GPU.
    pytest.importorskip("xformers.ops.fmha")
    import dataclasses

    from fastsp.model_config import UNET_PRESETS
    from fastsp.unet import Attention, UNet, record_fmha

    model = UNet(dataclasses.replace(UNET_PRESETS["tiny"], num_classes=0, context_dim=12))
    record = record_fmha([model], torch.device("cuda"), torch.bfloat16)
    assert record.startswith("sm_90 (an H100; no GPU here): ")
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        q, k, v = layer.probe(torch.device("meta"), torch.bfloat16)
        found = attention_lib.fmha_operators(q, k, v, True, (9, 0))
        assert f"forward {found['forward']}, backward {found['backward']}" in record
    assert record.count("|") == len({(lay.heads, lay.is_cross) for lay in layers}) - 1
