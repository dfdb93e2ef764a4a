"""torch.compile(fullgraph=True) of a UNet whose attention runs the xformers kernel, on the CPU.

xformers runs CUDA tensors only, so its availability check is mocked and xformers' public functions
are replaced by a CPU stand-in that computes attention the way xformers' operators do (forward
with a padded log-sum-exp, backward from out and log-sum-exp). Everything of fastsp is real: the
choice made once by `decide_attention`, the `fastsp::xformers_attention*` custom ops with their
fakes and registered backward, and the dispatch inside the model. Compiled forward and backward
equal eager, and eager with the xformers kernel equals SDPA.
"""

import dataclasses
import math

import pytest
import torch

from fastsp import attention as attention_lib
from fastsp.model_config import UNET_PRESETS
from fastsp.unet import Attention, UNet, decide_attention

B, RES, CONTEXT = 2, 8, (5, 12)


def _padded(n: int) -> int:  # xformers' cutlass pads the log-sum-exp's length to a multiple of 32
    return 32 * math.ceil(n / 32)


class StandInXformers:
    """xformers.ops' three attention functions, on any device; counts calls on real tensors."""

    def __init__(self):
        self.calls = {"forward": 0, "forward_requires_grad": 0, "backward": 0}

    def _count(self, name, q):
        if not isinstance(q, torch._subclasses.FakeTensor):
            self.calls[name] += 1

    @staticmethod
    def _scores(q, k):
        return torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])

    def memory_efficient_attention(self, q, k, v):
        self._count("forward", q)
        return torch.einsum("bhqk,bkhd->bqhd", self._scores(q, k).softmax(-1), v)

    def memory_efficient_attention_forward_requires_grad(self, q, k, v):
        self._count("forward_requires_grad", q)
        scores = self._scores(q, k)
        lse = scores.logsumexp(-1)  # [B, H, Lq]
        padded = torch.full((*lse.shape[:2], _padded(lse.shape[2])), math.inf, dtype=lse.dtype)
        padded[:, :, : lse.shape[2]] = lse
        out = torch.einsum("bhqk,bkhd->bqhd", (scores - lse[..., None]).exp(), v)
        return out, padded

    def memory_efficient_attention_backward(self, grad, out, lse, q, k, v):
        """dq, dk, dv from out and the log-sum-exp alone (flash-attention's backward)."""
        self._count("backward", q)
        lse = lse[:, :, : q.shape[1]]
        p = (self._scores(q, k) - lse[..., None]).exp()  # [B, H, Lq, Lk]
        dv = torch.einsum("bhqk,bqhd->bkhd", p, grad)
        dp = torch.einsum("bqhd,bkhd->bhqk", grad, v)
        delta = (grad * out).sum(-1).transpose(1, 2)  # [B, H, Lq]
        ds = p * (dp - delta[..., None]) / math.sqrt(q.shape[-1])
        dq = torch.einsum("bhqk,bkhd->bqhd", ds, k)
        dk = torch.einsum("bhqk,bqhd->bkhd", ds, q)
        return dq, dk, dv


@pytest.fixture
def xformers_available(monkeypatch):
    """The availability check says yes; xformers' functions are the CPU stand-in."""
    stand_in = StandInXformers()
    checks = []

    def reasons(q, k, v):
        checks.append(torch.compiler.is_compiling())
        return []

    monkeypatch.setattr(attention_lib, "_xformers_reasons", reasons)
    monkeypatch.setattr(attention_lib, "_import_xformers", lambda: stand_in)
    stand_in.checks = checks
    return stand_in


def _unet(seed=0) -> UNet:
    # Self- and cross-attention (a [5, 12] context) at level 1 and in the mid block.
    config = dataclasses.replace(UNET_PRESETS["tiny"], num_classes=0, context_dim=CONTEXT[1])
    torch.manual_seed(seed)
    model = UNet(config).double()
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised layer: every gradient is non-trivial
            p.normal_(0, 0.1)
    return model


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, RES, RES, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (B,), generator=g)
    context = torch.randn(B, *CONTEXT, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, 1, RES, RES, generator=g, dtype=torch.float64) * 0.5 + 0.25
    return x, t, context, grad_out


def _forward_backward(model, fn):
    x, t, context, grad_out = _inputs()
    out = fn(x, t, context=context)
    grads = torch.autograd.grad(out, list(model.parameters()), grad_out)
    return out.detach(), grads


def _recording_aot_eager(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    return backend


def _targets(graphs) -> list:
    return [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.slow
def test_unet_compiles_fullgraph_with_the_xformers_kernel(xformers_available):
    torch._dynamo.reset()
    model = _unet()
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    # Self- and cross-attention in the transformers of level 1 (one down, two up) and the mid block.
    assert len(layers) == 8
    assert decide_attention([model], torch.device("cpu"), torch.float64) == (
        "xformers for 8 of 8 layers (chosen once before torch.compile, torch.float64 on cpu)"
    )
    assert all(layer.kernel == "xformers" for layer in layers)
    checks_before = len(xformers_available.checks)

    eager = _forward_backward(model, model)
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=_recording_aot_eager(graphs))
    calls_before = dict(xformers_available.calls)
    result = _forward_backward(model, compiled)

    # One graph, holding fastsp's xformers op at every attention layer and no SDPA.
    targets = _targets(graphs)
    assert len(graphs) == 1
    xformers_op = torch.ops.fastsp.xformers_attention_train
    assert targets.count(xformers_op) == 8
    assert torch.nn.functional.scaled_dot_product_attention not in targets
    # The compiled step ran the (stand-in) xformers functions, forward and backward, and never
    # its support check: that was asked once per layer before compiling.
    calls = {name: n - calls_before[name] for name, n in xformers_available.calls.items()}
    assert calls == {"forward": 0, "forward_requires_grad": 8, "backward": 8}
    assert len(xformers_available.checks) == checks_before == 8
    assert not any(xformers_available.checks)  # none while compiling
    for a, b in zip((eager[0], *eager[1]), (result[0], *result[1]), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_the_xformers_kernel_equals_sdpa(xformers_available):
    # The eager forward and backward through the custom ops equal torch's SDPA path in float64.
    model = _unet()
    results = {}
    for kernel in ("xformers", "sdpa"):
        for layer in model.modules():
            if isinstance(layer, Attention):
                layer.kernel = kernel
        results[kernel] = _forward_backward(model, model)
    xf, sdpa = results["xformers"], results["sdpa"]
    for a, b in zip((xf[0], *xf[1]), (sdpa[0], *sdpa[1]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Under no_grad the forward-only op runs (no log-sum-exp kept).
    with torch.no_grad():
        x, t, context, _ = _inputs()
        for layer in model.modules():
            if isinstance(layer, Attention):
                layer.kernel = "xformers"
        before = xformers_available.calls["forward"]
        torch.testing.assert_close(model(x, t, context=context), sdpa[0], rtol=1e-10, atol=1e-12)
        assert xformers_available.calls["forward"] - before == 8


@pytest.mark.slow
def test_compiled_auto_without_a_choice_runs_sdpa_and_checks_nothing(xformers_available):
    # A caller that compiles without choosing first (kernel None): auto is SDPA inside compiled
    # code, and dynamo traces no xformers check.
    torch._dynamo.reset()
    model = _unet()
    eager_sdpa = []
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.kernel = "sdpa"
    eager_sdpa = _forward_backward(model, model)
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.kernel = None
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=_recording_aot_eager(graphs))
    result = _forward_backward(model, compiled)
    targets = _targets(graphs)
    assert targets.count(torch.nn.functional.scaled_dot_product_attention) == 8
    assert torch.ops.fastsp.xformers_attention_train not in targets
    assert xformers_available.checks == []
    for a, b in zip((eager_sdpa[0], *eager_sdpa[1]), (result[0], *result[1]), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_a_forced_xformers_that_cannot_run_fails_at_the_choice():
    # On the CPU, without mocks: the choice made before compiling raises with xformers' reasons.
    config = dataclasses.replace(UNET_PRESETS["tiny"], attention_backend="xformers")
    with pytest.raises(attention_lib.AttentionBackendError, match="xformers needs CUDA"):
        decide_attention([UNet(config)], torch.device("cpu"), torch.float32)
    auto = decide_attention([UNet(UNET_PRESETS["tiny"])], torch.device("cpu"), torch.float32)
    assert auto.startswith("sdpa for 4 of 4 layers; xformers: inputs are on cpu")
