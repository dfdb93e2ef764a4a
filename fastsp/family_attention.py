"""The attention a diffusers denoiser runs (`--model diffusers`): xformers where fastsp's rule says
it runs (fastsp.attention.choose_kernel: CUDA inputs, xformers' own C++/CUDA extension loads and
its dispatcher has one of its own operators for the module's heads) AND diffusers has an xformers
path for the module's attention processor; diffusers' own SDPA processors otherwise. The choice
is made once, before the step is built, and backends.json names it with the reason. Under
--compile `auto` keeps SDPA: diffusers' xformers processors call xformers' Python dispatcher,
which dynamo cannot trace (xformers#765; fastsp's own layers wrap the kernel in custom ops).

diffusers' xformers path per processor (0.42), the pairs
`Attention.set_use_memory_efficient_attention_xformers` makes, and the attention dispatcher:

    processor (families)                  xformers
    AttnProcessor2_0 (sd, sdxl, pixart)   XFormersAttnProcessor
    JointAttnProcessor2_0 (sd3)           XFormersJointAttnProcessor
    FluxAttnProcessor (flux), any         the dispatcher's "xformers" backend
      processor of the dispatcher           (`ModelMixin.set_attention_backend`)
    anything else (sana's linear self-    none: it keeps its own processor (SDPA)
      and its cross-attention)

The pairs are swapped with `set_attn_processor` rather than through
`enable_xformers_memory_efficient_attention`, which runs a CUDA probe (no fake-CUDA dry run) and
turns every processor it does not know into XFormersAttnProcessor (softmax attention where the
module's processor computes something else, e.g. a linear attention). `set_attention_backend`
also makes its backend the process's active one; it is called inside diffusers'
`attention_backend` context, which puts the previous one back (the processors keep theirs).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from fastsp.attention import AttentionBackendError, choose_kernel, not_supported_reasons
from fastsp.errors import ConfigError
from fastsp.families import DiffusersDenoiser

# A training step's q, k, v at a short length: what xformers supports depends on head size,
# dtype, alignment and the backward, not the length (as fastsp.unet.Attention.probe).
_PROBE_LEN = 16


def xformers_processors() -> dict[type, type]:
    """{diffusers' SDPA processor: its xformers processor} (the module docstring's pairs)."""
    from diffusers.models import attention_processor as ap

    return {
        ap.AttnProcessor2_0: ap.XFormersAttnProcessor,
        ap.JointAttnProcessor2_0: ap.XFormersJointAttnProcessor,
    }


def _xformers_path(processor) -> str | None:
    """How diffusers runs `processor`'s attention through xformers: "processor", "dispatcher" or
    None (no path)."""
    if type(processor) in xformers_processors():
        return "processor"
    return "dispatcher" if hasattr(processor, "_attention_backend") else None


def _attention_modules(denoiser: nn.Module) -> dict[str, tuple[nn.Module, object]]:
    """{processor name: (attention module, its processor)} in diffusers' `attn_processors`
    order."""
    suffix = ".processor"
    return {
        name: (denoiser.get_submodule(name[: -len(suffix)]), processor)
        for name, processor in denoiser.attn_processors.items()
    }


def _probe(module: nn.Module, device: torch.device, dtype: torch.dtype):
    """q, k, v [1, L, heads, head dim] of `module` in a training step (needing gradients)."""
    heads = module.heads
    shape = (1, _PROBE_LEN, heads, module.inner_dim // heads)
    with torch.enable_grad():
        return tuple(
            torch.empty(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
        )


def decide_attention(
    denoiser: nn.Module,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    compiled: bool = False,
) -> tuple[str, str]:
    """("xformers" or "sdpa", why) for a training step of `denoiser` (diffusers' module) in
    `dtype` on `device` under `--attention-backend backend` ("auto", "xformers" or "sdpa");
    `compiled`: the networks go through torch.compile. A forced xformers that cannot run raises
    ConfigError listing every reason."""
    if backend == "sdpa":
        return "sdpa", "--attention-backend sdpa"
    if backend == "auto" and compiled:
        # diffusers' xformers processors call xformers' Python dispatcher, which dynamo cannot
        # trace (xformers#765); fastsp's own layers wrap it in custom ops, diffusers' do not
        return "sdpa", "--compile: diffusers' xformers processors are not compile-safe"
    modules = _attention_modules(denoiser).values()
    pathless = sorted({type(p).__name__ for _, p in modules if _xformers_path(p) is None})
    partial = f"diffusers has no xformers path for {', '.join(pathless)}" if pathless else ""
    shapes = {(m.heads, m.inner_dim // m.heads): m for m, p in modules if _xformers_path(p)}
    refusals = []
    for module in shapes.values():
        probe = _probe(module, device, dtype)
        try:
            if choose_kernel(backend, *probe) != "xformers":  # auto's fallback: say why
                refusals.append(not_supported_reasons("xformers", *probe)[0])
        except AttentionBackendError as e:  # a forced xformers that cannot run these heads
            refusals.append(" ".join(line.strip() for line in str(e).splitlines()))
    if backend == "xformers" and (refusals or partial):
        raise ConfigError(
            f"--attention-backend xformers cannot run the {type(denoiser).__name__}'s attention: "
            f"{'; '.join(refusals + [partial] * bool(partial))}; pass --attention-backend auto "
            "(xformers where it runs, else SDPA) or sdpa"
        )
    if refusals or not shapes:
        return "sdpa", refusals[0] if refusals else partial or "the module has no attention"
    version = getattr(sys.modules.get("xformers"), "__version__", "")
    ran = f"version {version} runs these heads here (fastsp.attention's rule)"
    return "xformers", f"{ran}; {partial}" if partial else ran


def set_xformers(denoiser: nn.Module) -> None:
    """Swap `denoiser`'s attention processors for diffusers' xformers ones (module docstring);
    processors without an xformers path keep theirs."""
    from diffusers import attention_backend

    pairs = xformers_processors()
    processors = denoiser.attn_processors
    if any(_xformers_path(p) == "dispatcher" for p in processors.values()):
        with attention_backend("xformers"):  # puts the process's active backend back
            denoiser.set_attention_backend("xformers")
    denoiser.set_attn_processor(
        {name: pairs[type(p)]() if type(p) in pairs else p for name, p in processors.items()}
    )


def describe(denoiser: nn.Module) -> str:
    """The processors `denoiser` runs and the attention each calls, e.g. "XFormersAttnProcessor
    (xformers) for 12 of 12 attention modules"."""
    counts: dict[str, int] = {}
    for _, processor in _attention_modules(denoiser).values():
        name = type(processor).__name__
        backend = getattr(processor, "_attention_backend", None)
        if backend is not None:
            kernel = f"dispatcher: {getattr(backend, 'value', backend)}"
        elif hasattr(processor, "_attention_backend"):
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            active = _AttentionBackendRegistry.get_active_backend()[0]
            kernel = f"dispatcher: {getattr(active, 'value', active)}"
        else:
            known = "torch SDPA" if type(processor) in xformers_processors() else "its own"
            kernel = "xformers" if name.startswith("XFormers") else known
        counts[f"{name} ({kernel})"] = counts.get(f"{name} ({kernel})", 0) + 1
    total = sum(counts.values())
    return ", ".join(f"{name} for {n} of {total} attention modules" for name, n in counts.items())


def use_attention(
    networks, backend: str, device: torch.device, dtype: torch.dtype, compiled: bool = False
) -> str:
    """Give every diffusers denoiser in `networks` (the online, EMA and frozen networks, wrapped
    or not) the attention `decide_attention` chooses; returns backends.json's attention line."""
    denoisers = {
        id(m): m.denoiser for n in networks for m in n.modules() if isinstance(m, DiffusersDenoiser)
    }
    first = next(iter(denoisers.values()))
    kernel, why = decide_attention(first, backend, device, dtype, compiled)
    if kernel == "xformers":
        for denoiser in denoisers.values():
            set_xformers(denoiser)
    return f"{describe(first)} ({kernel}: {why}; decided once for {dtype} on {device.type})"
