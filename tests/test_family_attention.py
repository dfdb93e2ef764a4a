"""The attention of a diffusers family (fastsp.family_attention) on the tiny random models of
tests/family_tiny.py:

- the decision is fastsp.attention's rule (here with xformers' availability monkeypatched, since
  this machine has no GPU): SDPA on CPU and where xformers' extension does not load, with the
  reason; xformers where it runs; a forced xformers that cannot run refused in one line;
- the choice reaches the module: diffusers' xformers processors (SD, SDXL, SD3, PixArt) or the
  attention dispatcher's xformers backend (Flux) on every attention module (Sana's processors
  have no xformers path and keep SDPA), the process's active backend
  untouched, and with a float64 stand-in for xformers' kernel the swapped processors compute the
  family's output; a CPU run keeps its processors and its output to the bit;
- on a GPU with xformers' extension (marked cuda): xformers' forward and backward agree with
  SDPA's on each family within the low-precision rule of tests/test_attention.py.
"""

import pytest
import torch
import torch.nn.functional as F
from test_families import _config, _inputs, _wrapped

from fastsp import attention as attention_lib
from fastsp import family_attention
from fastsp.errors import ConfigError
from fastsp.family_config import DiffusersConfig

FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart")  # with an xformers path in diffusers
CPU = torch.device("cpu")
_XFORMERS = {"sd": "XFormersAttnProcessor", "sdxl": "XFormersAttnProcessor",
             "sd3": "XFormersJointAttnProcessor", "flux": "FluxAttnProcessor",
             "pixart": "XFormersAttnProcessor"}  # fmt: skip
_NO_EXTENSION = "xformers 0.0.35's C++/CUDA extension does not load (built for another torch)"


def _xformers_available(monkeypatch, available: bool) -> None:
    """fastsp.attention's verdict on xformers for any input, as on a GPU with (or without) its
    extension."""
    reasons = [] if available else [_NO_EXTENSION]
    monkeypatch.setattr(attention_lib, "_xformers_reasons", lambda q, k, v: list(reasons))


def _processors(model) -> list[tuple[str, object]]:
    return [(type(p).__name__, getattr(p, "_attention_backend", None))
            for p in model.denoiser.attn_processors.values()]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cpu_run_keeps_diffusers_processors_and_its_output(family):
    model = _wrapped(family)
    x, t, cond = _inputs(family)
    before, processors = model(x, t, **cond), _processors(model)
    line = family_attention.use_attention([model], "auto", CPU, torch.float64)
    assert _processors(model) == processors
    assert "(sdpa: inputs are on cpu, xformers needs CUDA tensors;" in line
    assert f"for {len(processors)} of {len(processors)} attention modules" in line
    assert torch.equal(model(x, t, **cond), before)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_the_decision_is_fastsps_rule(family, monkeypatch):
    denoiser = _wrapped(family).denoiser
    _xformers_available(monkeypatch, False)
    assert family_attention.decide_attention(denoiser, "auto", CPU, torch.bfloat16) == (
        "sdpa",
        _NO_EXTENSION,
    )
    with pytest.raises(ConfigError, match=r"--attention-backend xformers cannot run .*does not"):
        family_attention.decide_attention(denoiser, "xformers", CPU, torch.bfloat16)
    _xformers_available(monkeypatch, True)
    for backend in ("auto", "xformers"):
        kernel, why = family_attention.decide_attention(denoiser, backend, CPU, torch.bfloat16)
        assert kernel == "xformers" and "fastsp.attention's rule" in why
    assert family_attention.decide_attention(denoiser, "sdpa", CPU, torch.bfloat16) == (
        "sdpa",
        "--attention-backend sdpa",
    )
    kernel, why = family_attention.decide_attention(denoiser, "auto", CPU, torch.bfloat16, True)
    assert (kernel, why) == (
        "sdpa",
        "--compile: diffusers' xformers processors are not compile-safe",
    )
    with pytest.raises(ConfigError, match="invalid value 'math' for attention_backend"):
        DiffusersConfig(**{**_config(family).__dict__, "attention_backend": "math"})


def test_sanas_processors_have_no_xformers_path_and_keep_sdpa(monkeypatch):
    # Sana's linear self-attention (no softmax) and its cross-attention have no xformers twin in
    # diffusers: auto keeps them, and says why, even where xformers runs; a forced xformers is
    # refused in one line.
    model = _wrapped("sana")
    processors = _processors(model)
    _xformers_available(monkeypatch, True)
    line = family_attention.use_attention([model], "auto", CPU, torch.float32)
    pathless = "SanaAttnProcessor2_0, SanaLinearAttnProcessor2_0"
    assert f"(sdpa: diffusers has no xformers path for {pathless};" in line
    assert _processors(model) == processors
    with pytest.raises(ConfigError, match=f"no xformers path for {pathless}; pass"):
        family_attention.use_attention([model], "xformers", CPU, torch.float32)


def _reference_kernel(calls):
    """xformers.ops.memory_efficient_attention's signature, computed by torch SDPA in the inputs'
    dtype: [B, M, H, K] or [B*H, M, K] inputs, no bias, no dropout."""

    def kernel(query, key, value, attn_bias=None, p=0.0, scale=None, op=None):
        assert attn_bias is None and p == 0.0
        calls.append(query.shape)
        q, k, v = (x.unsqueeze(2) if x.ndim == 3 else x for x in (query, key, value))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
        ).transpose(1, 2)
        return out.squeeze(2) if query.ndim == 3 else out

    return kernel


@pytest.mark.parametrize("family", FAMILIES)
def test_xformers_reaches_every_attention_module_and_computes_the_family_output(
    family, monkeypatch
):
    xops = pytest.importorskip("xformers.ops")
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry.get_active_backend()[0]
    model, online_copy = _wrapped(family), _wrapped(family)
    x, t, cond = _inputs(family)
    expected = model(x, t, **cond)
    calls = []
    monkeypatch.setattr(xops, "memory_efficient_attention", _reference_kernel(calls))
    _xformers_available(monkeypatch, True)
    line = family_attention.use_attention([model, online_copy], "auto", CPU, torch.float64)
    count = len(model.denoiser.attn_processors)
    for network in (model, online_copy):
        names = {name for name, _ in _processors(network)}
        assert names == {_XFORMERS[family]}
        if family == "flux":  # the dispatcher's backend, on each of its processors
            assert {backend.value for _, backend in _processors(network)} == {"xformers"}
    assert f"for {count} of {count} attention modules (xformers:" in line
    assert _AttentionBackendRegistry.get_active_backend()[0] == active  # put back
    out = model(x, t, **cond)
    assert len(calls) == count  # one xformers call per attention module
    assert torch.allclose(out, expected, rtol=0, atol=1e-12 * expected.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_xformers_matches_sdpa_on_each_family_on_cuda(family):
    # bf16 autocast on the GPU: the xformers model's output and input gradient are no further
    # from the float64 CPU reference than twice the SDPA model's error, plus a small atol.
    if attention_lib._import_xformers() is None:
        pytest.skip(f"xformers cannot run here: {attention_lib._xops_error}")
    cuda = torch.device("cuda")
    reference = _wrapped(family)
    x, t, cond = _inputs(family)
    x.requires_grad_(True)
    ref_out = reference(x, t, **cond)
    ref_out.backward(torch.ones_like(ref_out))
    results = {}
    for backend in ("sdpa", "xformers"):
        model = _wrapped(family, dtype=torch.float32).to(cuda)
        line = family_attention.use_attention([model], backend, cuda, torch.bfloat16)
        assert f"({backend}:" in line
        xc = x.detach().float().to(cuda).requires_grad_(True)
        cond_c = {k: v.float().to(cuda) for k, v in cond.items()}
        with torch.autocast("cuda", torch.bfloat16):
            out = model(xc, t.to(cuda), **cond_c)
        out.float().backward(torch.ones_like(out, dtype=torch.float32))
        results[backend] = (out.double().cpu(), xc.grad.double().cpu())
    for i, ref in enumerate((ref_out.detach(), x.grad)):
        err_xf = (results["xformers"][i] - ref).abs().max().item()
        err_sdpa = (results["sdpa"][i] - ref).abs().max().item()
        assert err_xf <= 2 * err_sdpa + 1e-2 * ref.abs().max().item(), (i, err_xf, err_sdpa)
