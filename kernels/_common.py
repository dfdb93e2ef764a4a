"""Layout and launch helpers shared by the feature-MSE ops (``feature_mse``, ``feature_mse_multi``).

One definition of each, imported by both op files, which never import each other:
- ``INTERPRETED``: whether Triton runs these kernels in its interpreter (CPU tensors allowed).
- The supported dtypes and the fixed launch constants: BLOCK 4096 elements per tile, at most 4096
  programs (partial sums) per reduction, stage 2 summing 1024 partials a step; ``_launch_options``
  maps a BLOCK to its warps and fixes the compiler's options. The reasons for these numbers are in
  kernels/feature_mse.py.
- fp fusion is off, chosen explicitly (Triton 3.9 defaults it on and warns that 3.10 flips the
  default): these kernels are memory-bound, so contracting ``acc += d * d`` into an FMA saves
  nothing measurable, and without it the GPU rounds the product and the sum separately, as torch's
  own mse_loss and Triton's interpreter (the CPU tests) do. The bits no longer depend on the
  Triton version's default.
- Host layout rules: ``plan_layout`` merges dimensions as TensorIterator does, ``_is_flat`` says
  when the result is one flat run of memory shared by every operand.
- Allocation: ``_empty`` (every output of both ops is allocated through it; tests replace it to
  poison outputs) and ``_dense_like``.
- Device helpers called from the kernels: ``_cast_rtne`` (the one rounding to the output dtype),
  ``_chunk_start`` (a program's first element, in int64), ``_full_tiles`` with ``_load_f32`` and
  ``_store_cast`` (tiles wholly inside N are read and written without a mask: a mask on ``idx < N``
  with N not a multiple of 16 forbids vector loads, and a predicated load is scheduled behind the
  arithmetic of the one before it, halving the bytes in flight; only a chunk's last tile is
  masked), ``_scale_tiles`` (the in-place scale of fused gradient buffers).
- ``_tracing``: whether a backward runs under torch.compile's tracing, where saved tensors may not
  be rewritten in place.
"""

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

# Triton decides at decoration time whether kernels run in its interpreter (CPU tensors allowed).
try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton before triton.knobs (3.4)
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_BLOCK = 4096  # elements per tile
_MAX_PROGRAMS = 4096  # partial sums per reduction
_FINAL_BLOCK = 1024  # partials summed per step of stage 2
_DEFAULT_LAUNCH = (_BLOCK, _MAX_PROGRAMS, _FINAL_BLOCK)


# ---------------------------------------------------------------------------- launch rules
def _num_warps(block: int) -> int:
    return 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1


def _launch_options(block: int, max_registers: int | None = None) -> dict:
    # Every launch's compiler options: warps by BLOCK, fp fusion off (see the module docstring),
    # and a register cap where a kernel sets one (feature_mse's fused forward: see its docstring).
    return {"num_warps": _num_warps(block), "enable_fp_fusion": False, "maxnreg": max_registers}


def plan_layout(shape: Sequence[int], *strides: Sequence[int], order: list[int] | None = None):
    """Merge ``shape`` under every operand's ``strides`` into as few dimensions as possible.

    Returns (order, sizes, merged strides per operand). ``order`` lists the original dimensions
    outermost first; by default the memory order of the operands (largest stride first), and the
    kernels traverse elements, and lay out their outputs, in it. ``sizes`` and each merged stride
    list run outermost first, with size-1 dimensions dropped.
    """
    if order is None:
        order = sorted(range(len(shape)), key=lambda d: (-max(s[d] for s in strides), d))
    sizes: list[int] = []
    merged: list[list[int]] = [[] for _ in strides]
    for d in order:
        if shape[d] == 1:
            continue
        if sizes and all(m[-1] == s[d] * shape[d] for m, s in zip(merged, strides, strict=True)):
            sizes[-1] *= shape[d]
            for m, s in zip(merged, strides, strict=True):
                m[-1] = s[d]
        else:
            sizes.append(shape[d])
            for m, s in zip(merged, strides, strict=True):
                m.append(s[d])
    return order, sizes, merged


def _is_flat(sizes: list[int], merged: list[list[int]]) -> bool:
    return not sizes or (len(sizes) == 1 and all(m[0] == 1 for m in merged))


def _empty(shape, dtype, device) -> Tensor:
    """Every output of both ops is allocated here (tests replace it to poison outputs)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _dense_like(t: Tensor) -> Tensor:
    # Same strides as the dense tensor t (empty_like would too; _empty lets tests poison it).
    return _empty(t.shape, t.dtype, t.device).as_strided(t.shape, t.stride())


# ---------------------------------------------------------------------------- device helpers
@triton.jit
def _cast_rtne(v, DTYPE: tl.constexpr):
    # fp32 -> DTYPE rounding to nearest even. bf16 is rounded on the fp32 bits and its top half
    # bitcast: the same result as the GPU's cvt.rn.bf16.f32 (PTX ISA, cvt), while Triton's
    # interpreter truncates fp32 -> bf16 (and flushes denormals), which would make CPU tests up to
    # 1 ulp worse than the GPU. NaN is mapped first: the addition carries NVIDIA's canonical NaN
    # 0x7FFFFFFF into the sign bit (0x8000, bf16 -0.0), which would hide a NaN from the
    # non-finite-step guard; 0x7FC0 is the quiet NaN torch's own conversion returns for every NaN
    # (c10/util/BFloat16.h, round_to_nearest_even). +-inf and the largest finite values (which
    # round to inf) need no special case. fp16 uses the conversion itself: cvt.rn.f16.f32 on the
    # GPU and numpy's astype in the interpreter both round to nearest even and keep NaNs.
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        half = tl.where(v != v, 0x7FC0, rounded).to(tl.uint16)
        return half.to(tl.bfloat16, bitcast=True)
    return v.to(DTYPE)


@triton.jit
def _chunk_start(pid, tiles, BLOCK: tl.constexpr):
    # First element owned by program `pid`; int64 so that tensors above 2^31 elements index right.
    return pid.to(tl.int64) * tiles * BLOCK


@triton.jit
def _full_tiles(start, N, tiles, BLOCK: tl.constexpr):
    # How many of the `tiles` tiles from `start` lie wholly below N (read without a mask).
    return tl.minimum(tl.maximum((N - start) // BLOCK, 0), tiles).to(tl.int32)


@triton.jit
def _load_f32(ptr, mask, MASKED: tl.constexpr):
    if MASKED:
        v = tl.load(ptr, mask=mask, other=0.0)
    else:
        v = tl.load(ptr)
    return v.to(tl.float32)


@triton.jit
def _store_cast(ptr, v, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, _cast_rtne(v, ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr, _cast_rtne(v, ptr.dtype.element_ty))


@triton.jit
def _scale_tile(src_ptr, dst_ptr, g, start, N, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    idx = start + tl.arange(0, BLOCK)
    mask = idx < N
    _store_cast(dst_ptr + idx, _load_f32(src_ptr + idx, mask, MASKED) * g, mask, MASKED)


@triton.jit
def _scale_tiles(src_ptr, dst_ptr, g, start, N, tiles, BLOCK: tl.constexpr):
    # dst = src * g over `tiles` tiles from `start`: the fused backward of fp32 gradient buffers.
    full = _full_tiles(start, N, tiles, BLOCK)
    for _ in range(full):
        _scale_tile(src_ptr, dst_ptr, g, start, N, BLOCK, False)
        start += BLOCK
    for _ in range(full, tiles):
        _scale_tile(src_ptr, dst_ptr, g, start, N, BLOCK, True)
        start += BLOCK


# ---------------------------------------------------------------------------- autograd
def _tracing(t: Tensor) -> bool:
    # Under torch.compile (or a tensor subclass such as FakeTensor) a backward may not rewrite a
    # saved tensor in place: functionalisation would copy it.
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor
