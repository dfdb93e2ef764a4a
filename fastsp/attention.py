"""The one attention function every attention layer of fastsp calls.

    out = softmax(q k^T / sqrt(D)) v        q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H, D]

No mask, no dropout: the UNet's self- and cross-attention need neither. The layout is xformers'
BMHK (batch, sequence, heads, head dim), which a `Linear` output reaches with a free `view`; the
SDPA path transposes to torch's [B, H, L, D] with free views too.

Backends:
- ``xformers``: ``xformers.ops.memory_efficient_attention``, and only where it runs xformers' own
  kernels: its C++/CUDA extension must load (a wheel built for another torch or Python does not,
  and its dispatcher then falls back to the flash and cutlass kernels bundled in PyTorch, named
  ``...-pt``, which SDPA runs without the detour), and the operator its dispatcher picks for the
  inputs must be one of its own (not a ``-pt`` one). Otherwise it is refused with that reason.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, which dispatches to flash,
  memory-efficient or math kernels itself; the CPU path and the fallback of ``auto``.
- ``math``: explicit softmax in fp32 (fp64 for fp64 inputs); the reference the tests compare with.
- ``auto``: xformers when the inputs are CUDA tensors and xformers can run them, else SDPA.

xformers is imported lazily, once; an import failure is recorded and reported as a reason, never
raised. Whether xformers supports given inputs is asked of xformers' own dispatcher (the same
``not_supported_reasons`` checks that ``memory_efficient_attention`` runs), cached per input
signature so that an eager step pays the check once per shape. On CPU tensors ``auto`` never
touches xformers.

Choosing and running are separate, for torch.compile. `choose_kernel` (eager only: xformers' Python
dispatcher, a dict cache, try/except, none of which dynamo can trace; xformers#765, pytorch#149010)
names the kernel, "xformers", "sdpa" or "math"; `run_kernel` runs a named kernel and branches on
that string only. A caller that compiles decides first, outside compiled code, and passes
``kernel=`` (fastsp.unet.decide_attention does this for a model before torch.compile). Without a
decided kernel, compiled code runs SDPA for ``auto`` (on CUDA it dispatches to the same flash and
memory-efficient kernels xformers wraps) and the xformers op for a forced ``xformers``.

The xformers kernel runs through fastsp's own torch custom ops (``fastsp::xformers_attention``,
``..._train`` and ``..._backward``), which call xformers' public forward and backward functions.
To dynamo and AOTAutograd a custom op is one opaque node with a fake (shape) implementation and a
registered backward, so a compiled graph holds it without a break; xformers' dispatcher runs when
the op runs. xformers' own registered ops (``xformers_flash::flash_fwd``) are not called directly:
their signature (varlen, cu_seqlens) changes between xformers versions.
"""

from __future__ import annotations

import math
import platform
import sys

import torch
import torch.nn.functional as F

from fastsp.config_fields import ATTENTION_BACKENDS

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Cache of xformers' verdicts, keyed by the input signature (see _xformers_key).
_XFORMERS_CACHE: dict[tuple, list[str]] = {}
_XFORMERS_CACHE_MAX = 4096
# Lazily imported `xformers.ops` module, or the reason it could not be imported.
_xops = None
_xops_error: str | None = None


class AttentionBackendError(RuntimeError):
    """A forced attention backend cannot run the given inputs; the message lists every reason."""


def _check_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}"
        )


def _input_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Problems with the inputs that no backend can run (layout, shape, dtype, device)."""
    reasons = []
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        reasons.append(
            f"q, k, v must be 4-D [B, L, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
        return reasons
    if k.shape != v.shape:
        reasons.append(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        reasons.append(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head dim"
        )
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.dtype not in _FLOAT_DTYPES:
        reasons.append(f"dtype {q.dtype} is not a floating dtype in {_FLOAT_DTYPES}")
    if not (q.device == k.device == v.device):
        reasons.append(f"devices differ: q {q.device}, k {k.device}, v {v.device}")
    return reasons


def _extension_error() -> str | None:
    """Why xformers' own C++/CUDA extension did not load, from what xformers recorded at import
    (xformers._cpp_lib); None if it loaded."""
    xformers = sys.modules["xformers"]
    error = getattr(sys.modules.get("xformers._cpp_lib"), "_cpp_library_load_exception", None)
    if error is None and getattr(xformers, "_has_cpp_library", False):
        return None
    version = getattr(xformers, "__version__", "unknown version")
    info = getattr(error, "build_info", None)
    built = (
        f"built for torch {info.torch_version} and Python {info.python_version}, this torch is "
        f"{torch.__version__} and Python {platform.python_version()}"
        if info is not None
        else f"{type(error).__name__ if error else 'not built'}"
    )
    return (
        f"xformers {version}'s C++/CUDA extension does not load ({built}): its dispatcher would "
        "run PyTorch's own kernels, which SDPA runs directly; install an xformers built for "
        "this torch (README, attention)"
    )


def _import_xformers():
    """`xformers.ops` when its own extension loads, or None with the reason in `_xops_error`."""
    global _xops, _xops_error
    if _xops is None and _xops_error is None:
        try:
            import xformers.ops as xops

            # Touch what we use so that a broken install fails here, not at call time.
            _ = (xops.memory_efficient_attention, xops.fmha.Inputs)
            _xops_error = _extension_error()
            _xops = xops if _xops_error is None else None
        except Exception as e:  # any import failure is a reason, not a crash
            _xops_error = f"xformers cannot be imported: {type(e).__name__}: {e}"
    return _xops


def _pytorch_kernel(op) -> bool:
    # xformers names the operators that call PyTorch's bundled kernels "...-pt"
    # (fa2F@2.5.7-pt, cutlassF-pt): SDPA runs those same kernels.
    return op.NAME.endswith("-pt")


def _xformers_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, needs_grad: bool) -> tuple:
    # xformers' checks look at device (capability), dtype, shapes, strides (alignment), whether a
    # backward is needed and the deterministic-algorithms flag; nothing else of the inputs.
    return (
        q.device,
        q.dtype,
        tuple(q.shape),
        tuple(k.shape),
        q.stride(),
        k.stride(),
        v.stride(),
        needs_grad,
        torch.are_deterministic_algorithms_enabled(),
    )


def _ask_xformers(xops, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, needs_grad: bool):
    """xformers' own reasons against running (q, k, v); empty if its dispatcher finds an op.

    Uses the dispatcher that `memory_efficient_attention(..., op=None)` uses
    (`fmha._dispatch_fw(inp, needs_gradient)`, and `fmha._dispatch_bw(inp, varlen_lse_packed)` when
    a backward is needed). These are private names; if they are missing or change signature we
    fall back to the public op pairs (flash, cutlass) and their `not_supported_reasons`.
    """
    fmha = xops.fmha
    inp = fmha.Inputs(query=q, key=k, value=v)
    try:
        inp.validate_inputs()
    except ValueError as e:
        return [f"xformers: {e}"]
    dispatch_fw = getattr(fmha, "_dispatch_fw", None)
    dispatch_bw = getattr(fmha, "_dispatch_bw", None)
    if dispatch_fw is not None and dispatch_bw is not None:
        try:
            ops = [dispatch_fw(inp, needs_grad)] + ([dispatch_bw(inp, None)] if needs_grad else [])
            return [
                f"xformers dispatches {op.NAME}, PyTorch's own kernel: SDPA runs it directly"
                for op in ops
                if _pytorch_kernel(op)
            ]
        except NotImplementedError as e:
            return [f"xformers: {e}"]
        except (TypeError, AttributeError):
            pass  # the private dispatcher changed: use the public op pairs below
    pairs = [
        getattr(fmha, name, None)
        for name in (
            "MemoryEfficientAttentionFlashAttentionOp",
            "MemoryEfficientAttentionCutlassOp",
        )
    ]
    reasons = []
    for pair in pairs:
        if pair is None:
            continue
        ops = pair if needs_grad else pair[:1]
        pair_reasons = [f"{op.NAME}: {r}" for op in ops for r in op.not_supported_reasons(inp)]
        pair_reasons += [f"{op.NAME} is PyTorch's own kernel" for op in ops if _pytorch_kernel(op)]
        if not pair_reasons:
            return []
        reasons.extend(pair_reasons)
    return [f"xformers: {r}" for r in reasons] or ["xformers: no attention operator found"]


def _xformers_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Every reason xformers cannot run (q, k, v); empty if it can. Eager only (see the module
    docstring). CPU inputs are refused without importing xformers."""
    if q.device.type != "cuda":
        return [f"inputs are on {q.device.type}, xformers needs CUDA tensors"]
    reasons = []
    xops = _import_xformers()
    if xops is None:
        reasons.append(_xops_error)
        return reasons
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    key = _xformers_key(q, k, v, needs_grad)
    cached = _XFORMERS_CACHE.get(key)
    if cached is None:
        try:
            cached = _ask_xformers(xops, q, k, v, needs_grad)
        except Exception as e:  # a broken xformers is a reason, not a crash
            cached = [f"xformers support check failed: {type(e).__name__}: {e}"]
        if len(_XFORMERS_CACHE) >= _XFORMERS_CACHE_MAX:
            _XFORMERS_CACHE.clear()
        _XFORMERS_CACHE[key] = cached
    reasons.extend(r for r in cached if r not in reasons)
    return reasons


def not_supported_reasons(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> list[str]:
    """Every reason `backend` cannot run `attention(q, k, v)`; an empty list means it can.

    ``auto`` can run whatever ``sdpa`` can (it falls back to it). Raises ValueError for an
    unknown backend name.
    """
    _check_backend(backend)
    reasons = _input_reasons(q, k, v)
    if backend == "xformers" and q.ndim == 4 and k.ndim == 4 and v.ndim == 4:
        reasons.extend(_xformers_reasons(q, k, v))
    return reasons


def _format_reasons(reasons: list[str]) -> str:
    return "\n".join("  - " + r.replace("\n", "\n    ") for r in reasons)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * (1.0 / math.sqrt(q.shape[-1]))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, vf).to(q.dtype)


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


# ---- the xformers kernel as torch custom ops (see the module docstring) -----------------------
def _loaded_xformers():
    xops = _import_xformers()
    if xops is None:
        raise AttentionBackendError(f"the xformers kernel was chosen, but {_xops_error}")
    return xops


@torch.library.custom_op("fastsp::xformers_attention", mutates_args=())
def _xformers_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Forward only (no log-sum-exp kept): inference and the perceptual pass's no-grad branch."""
    return _loaded_xformers().memory_efficient_attention(q, k, v).contiguous()


@_xformers_attention_op.register_fake
def _(q, k, v):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


def _xformers_train(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Lq, H, Dv], logsumexp) for the backward; the logsumexp's shape is xformers' own."""
    out, lse = _loaded_xformers().memory_efficient_attention_forward_requires_grad(q, k, v)
    return out.contiguous(), lse.contiguous()


_xformers_train_op = torch.library.custom_op(
    "fastsp::xformers_attention_train", _xformers_train, mutates_args=()
)
# The fake runs the same code on fake tensors: xformers' own fake and meta kernels then give the
# logsumexp's exact shape (padded by some operators), which no formula here could promise.
_xformers_train_op.register_fake(_xformers_train)


@torch.library.custom_op("fastsp::xformers_attention_backward", mutates_args=())
def _xformers_backward_op(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _loaded_xformers().memory_efficient_attention_backward(
        grad.contiguous(), out, lse, q, k, v
    )
    grads = [g.contiguous() for g in (dq, dk, dv)]
    # flash's backward can return dq, dk, dv as views of one buffer; a custom op's outputs must
    # not alias one another.
    if len({g.untyped_storage().data_ptr() for g in grads}) < 3:
        grads = [g.clone() for g in grads]
    return tuple(grads)


@_xformers_backward_op.register_fake
def _(grad, q, k, v, out, lse):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def _setup_train(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _backward_train(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return torch.ops.fastsp.xformers_attention_backward(grad_out, q, k, v, out, lse)


_xformers_train_op.register_autograd(_backward_train, setup_context=_setup_train)


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return torch.ops.fastsp.xformers_attention_train(q, k, v)[0]
    return torch.ops.fastsp.xformers_attention(q, k, v)


# ---- choosing and running a kernel ---------------------------------------------------------
KERNELS = ("xformers", "sdpa", "math")


def choose_kernel(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The kernel `attention(q, k, v, backend)` runs: one of KERNELS. Eager only (it asks
    xformers' dispatcher); a forced ``xformers`` that cannot run raises AttentionBackendError
    listing every reason."""
    _check_backend(backend)
    if backend == "auto":
        return "sdpa" if _xformers_reasons(q, k, v) else "xformers"
    reasons = _xformers_reasons(q, k, v) if backend == "xformers" else []
    if reasons:
        raise AttentionBackendError(
            f"attention backend {backend!r} cannot run q {tuple(q.shape)} {q.dtype} on "
            f"{q.device}, k {tuple(k.shape)}, v {tuple(v.shape)}:\n" + _format_reasons(reasons)
        )
    return backend


def run_kernel(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Run a kernel chosen by `choose_kernel` on BMHK inputs; compile-safe (it branches on the
    kernel's name only)."""
    if kernel == "xformers":
        return _xformers_attention(q, k, v)
    if kernel == "sdpa":
        return _sdpa_attention(q, k, v)
    if kernel == "math":
        return _math_attention(q, k, v)
    raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    *,
    kernel: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention in BMHK layout: softmax(q k^T / sqrt(D)) v.

    Args:
        q: [B, Lq, H, D] queries.
        k: [B, Lk, H, D] keys.
        v: [B, Lk, H, D] values (same dtype and device as q).
        backend: one of ``ATTENTION_BACKENDS``. ``auto`` uses xformers for CUDA inputs it
            supports, else torch SDPA; a forced backend that cannot run raises
            ``AttentionBackendError`` listing every reason. Malformed inputs (shapes, dtypes,
            devices that disagree) raise ValueError, as does an unknown backend name.
        kernel: a kernel already chosen for these inputs by `choose_kernel` (what compiled code
            passes, see the module docstring); None: chosen here, per call (under torch.compile:
            SDPA for ``auto``, the xformers op for ``xformers``).

    Returns:
        [B, Lq, H, D] in q's dtype (it may be a non-contiguous view).

    Equivalent PyTorch code::

        scale = 1.0 / q.shape[-1] ** 0.5
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
        attn = (q * scale) @ k.transpose(-2, -1)                           # [B, H, Lq, Lk]
        attn = attn.softmax(dim=-1)
        return (attn @ v).transpose(1, 2)                                  # [B, Lq, H, D]
    """
    _check_backend(backend)
    reasons = _input_reasons(q, k, v)
    if reasons:
        raise ValueError("attention inputs are invalid:\n" + _format_reasons(reasons))
    if kernel is None:
        if torch.compiler.is_compiling():
            kernel = "sdpa" if backend == "auto" else backend
        else:
            kernel = choose_kernel(backend, q, k, v)
    return run_kernel(kernel, q, k, v)


def describe_backend(backend: str, device: torch.device) -> str:
    """What `attention(..., backend=backend)` runs on `device`, for a run's first lines.

    Per-input support is xformers' to decide at call time, so for ``auto`` on CUDA this names
    xformers and its SDPA fallback; everywhere else the choice is fixed by device and backend.
    """
    _check_backend(backend)
    if backend in ("sdpa", "math"):
        return backend
    if device.type != "cuda":
        if backend == "xformers":
            return "xformers (it has no operator for CPU tensors: every call will fail)"
        return "sdpa (xformers runs CUDA tensors only)"
    if _import_xformers() is None:
        if backend == "xformers":
            return f"xformers ({_xops_error}: every call will fail)"
        return f"sdpa ({_xops_error})"
    version = getattr(sys.modules.get("xformers"), "__version__", "unknown version")
    if backend == "xformers":
        return f"xformers {version}"
    return f"xformers {version} (sdpa for inputs it does not support)"


# xformers' CUDA dispatch order (xformers/ops/fmha/dispatch.py: `_dispatch_fw_priority_list` and
# `_dispatch_bw` for inputs without an attention bias, dropout or split-KV): a CPU build of torch
# has no `torch.version.cuda`, so its own dispatcher would list ROCm's operators instead.
_CUDA_ORDER = {"forward": ("flash3.FwOp", "flash.FwOp", "cutlass.FwOp"),
               "backward": ("flash3.BwOp", "flash.BwOp", "cutlass.BwOp")}  # fmt: skip


def fmha_operators(q, k, v, needs_grad: bool, capability: tuple[int, int]) -> dict[str, str]:
    """The xformers fmha operators its dispatcher picks for (q, k, v) on a GPU of `capability`,
    found in its operator registry without running anything (q, k, v may be meta tensors).

    Each operator's own `not_supported_reasons` decides, in xformers' CUDA order, with the
    device checks (the inputs are not on that GPU) replaced by its capability bounds. Returns
    {"forward": NAME, "backward": NAME (when needs_grad), "own_kernels": "yes"/"no",
    "passed_over": why the operators before them were not picked}, or {"unavailable": reason}.
    NAMEs ending in "-pt" are PyTorch's bundled kernels. Availability is the installed builds'
    (a CPU torch has no flash kernel to bundle, so its answer can differ from a CUDA torch's).
    """
    try:
        import xformers.ops.fmha as fmha
    except Exception as e:  # an import failure is an answer, not a crash
        return {"unavailable": f"xformers cannot be imported: {type(e).__name__}: {e}"}
    inp = fmha.Inputs(query=q, key=k, value=v)
    chosen: dict[str, str] = {}
    passed_over = []
    for direction, names in _CUDA_ORDER.items():
        if direction == "backward" and not needs_grad:
            continue
        for name in names:
            module, cls = name.split(".")
            op = getattr(getattr(fmha, module), cls)
            reasons = _fmha_reasons(op, inp, capability)
            if not reasons:
                chosen[direction] = op.NAME
                break
            passed_over.append(f"{op.NAME}: {reasons[0]}")
        else:
            return {"unavailable": f"no xformers {direction} operator supports these inputs"}
    own = not any(n.endswith("-pt") for n in chosen.values())
    return {**chosen, "own_kernels": "yes" if own else "no", "passed_over": "; ".join(passed_over)}


def _fmha_reasons(op, inp, capability: tuple[int, int]) -> list[str]:
    device_checks = ("device=", "bf16 is only supported on A100+")
    reasons = [r for r in op.not_supported_reasons(inp) if not r.startswith(device_checks)]
    if capability < op.CUDA_MINIMUM_COMPUTE_CAPABILITY:
        reasons.append(f"needs capability >= {op.CUDA_MINIMUM_COMPUTE_CAPABILITY}")
    maximum = getattr(op, "CUDA_MAXIMUM_COMPUTE_CAPABILITY", None)
    if maximum is not None and capability > maximum:
        reasons.append(f"needs capability <= {maximum}")
    if inp.query.dtype == torch.bfloat16 and capability < (8, 0):
        reasons.append("bf16 needs capability >= (8, 0)")
    return reasons
