"""Strided indexing of the feature-MSE kernels without per-element 64-bit division.

A strided operand is read through up to 4 merged dimensions (sizes s0..s3, outermost first, see
``plan_layout``). Turning a traversal index into (i0, i1, i2, i3) is a chain of divisions by s3,
s2 and s1; done per element on int64 indices it compiles to a call of the 64-bit division
routine per element and dimension (20-26 calls per kernel, 72-112 registers). Instead:

- a tile's first index ``start`` is split into coordinates once per tile (scalar int64 division);
- an element of the tile is ``start + local`` with local < BLOCK, so its coordinates follow by
  carrying ``local`` through the dimensions in int32, dividing by each size with a multiply-high,
  an add and a shift: the divisor's (magic, shift) pair is computed once per launch on the host
  (Granlund and Montgomery, "Division by invariant integers using multiplication", 1994; the
  same construction as PyTorch's IntDivider, exact for 0 <= n < 2^31);
- the coordinates are shared by every operand, and each operand's offset is their dot product
  with its strides, in int64.

The carries stay below 2^31 when every divided size is below 2^31 - BLOCK - 1: ``needs_copy``
says when a layout breaks that, and ``prepare`` (the host side: merged layout, each operand's
access, the launch's divisors) then copies the operands into one dense layout.
"""

from collections.abc import Sequence

import triton
import triton.language as tl
from fastsp.kernels._common import _empty, plan_layout
from torch import Tensor

MAX_RANK = 4  # merged dimensions the strided kernels take
_INT32_LIMIT = 2**31


def divisor(d: int) -> tuple[int, int]:
    """(magic, shift) with n // d == (umulhi(n, magic) + n) >> shift for 0 <= n < 2^31."""
    shift = (d - 1).bit_length()
    return ((1 << 32) * ((1 << shift) - d)) // d + 1, shift


def needs_copy(sizes: list[int], block: int) -> bool:
    """Whether merged ``sizes`` (outermost first) are too many, or too large to divide in int32."""
    return len(sizes) > MAX_RANK or any(s >= _INT32_LIMIT - block - 1 for s in sizes[1:])


def layout_args(sizes: list[int]) -> tuple[int, ...]:
    """(s1, s2, s3, magic1..3, shift1..3) for sizes padded to 4 dimensions, outermost first."""
    padded = [1] * (MAX_RANK - len(sizes)) + list(sizes)
    pairs = [divisor(s) for s in padded[1:]]
    return (*padded[1:], *(m for m, _ in pairs), *(h for _, h in pairs))


def strides_args(strides: list[int]) -> tuple[int, ...]:
    """Merged strides padded to 4 dimensions, outermost first."""
    return (0,) * (MAX_RANK - len(strides)) + tuple(strides)


def access(sizes: list[int], strides: list[int], block: int) -> int:
    """How the kernels index an operand of merged ``sizes`` and ``strides`` (outermost first):
    2 when its memory offset is the traversal index (dense in that order); 1 when it is gathered
    in aligned runs of 16 contiguous elements (unit innermost stride, innermost size and every
    other stride multiples of 16, tiles starting at multiples of 16); 0 element by element."""
    expected = 1
    for size, stride in zip(reversed(sizes), reversed(strides), strict=True):
        if stride != expected:
            break
        expected *= size
    else:
        return 2
    aligned = block % 16 == 0 and sizes[-1] % 16 == 0 and all(s % 16 == 0 for s in strides[:-1])
    return 1 if strides[-1] == 1 and aligned else 0


def empty_in_order(shape: Sequence[int], order: list[int], dtype, device) -> Tensor:
    """An uninitialised tensor of ``shape`` whose memory runs in dimension order ``order``."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return _empty([shape[d] for d in order], dtype, device).permute(inverse)


def prepare(order: list[int], block: int, *tensors: Tensor):
    """(operands, layout args, strides args per operand, ``access`` per operand) in ``order``.

    Operands whose merged layout the strided kernels cannot index (kernels/_strided.py) are
    copied into ``order`` first.
    """
    _, sizes, merged = plan_layout(tensors[0].shape, *(t.stride() for t in tensors), order=order)
    if needs_copy(sizes, block):
        tensors = tuple(empty_in_order(t.shape, order, t.dtype, t.device).copy_(t) for t in tensors)
        _, sizes, merged = plan_layout(
            tensors[0].shape, *(t.stride() for t in tensors), order=order
        )
    accesses = [access(sizes, m, block) for m in merged]
    return tensors, layout_args(sizes), [strides_args(m) for m in merged], accesses


@triton.jit
def _udiv(n, magic, shift):
    # n // d for 0 <= n < 2^31, with (magic, shift) = divisor(d): multiply-high, add, shift.
    n = n.to(tl.uint32)
    return ((tl.umulhi(n, tl.cast(magic, tl.uint32)) + n) >> shift).to(tl.int32)


@triton.jit
def _coordinates(start, local, layout):
    # Row-major coordinates (i0 int64, i1..i3 int32) of index start + local over (s0, s1, s2, s3).
    rest = start // layout[2]
    a3 = (start - rest * layout[2]).to(tl.int32)
    a1 = rest // layout[1]
    a2 = (rest - a1 * layout[1]).to(tl.int32)
    a0 = a1 // layout[0]
    a1 = (a1 - a0 * layout[0]).to(tl.int32)
    t = a3 + local
    carry = _udiv(t, layout[5], layout[8])
    i3 = t - carry * layout[2]
    t = a2 + carry
    carry = _udiv(t, layout[4], layout[7])
    i2 = t - carry * layout[1]
    t = a1 + carry
    carry = _udiv(t, layout[3], layout[6])
    i1 = t - carry * layout[0]
    return a0 + carry, i1, i2, i3


@triton.jit
def _offsets(coords, strides, RUNS: tl.constexpr):
    # The element offsets of coordinates under one operand's strides, in int64. RUNS (host:
    # ``access``): aligned runs of 16 lanes share i0..i2 and have consecutive i3 at a multiple
    # of 16, which the divisors hide from Triton's contiguity analysis; said here, loads vectorise.
    i0, i1, i2, i3 = coords
    offsets = (
        i0 * strides[0]
        + i1.to(tl.int64) * strides[1]
        + i2.to(tl.int64) * strides[2]
        + i3.to(tl.int64) * strides[3]
    )
    if RUNS:
        offsets = tl.max_contiguous(tl.multiple_of(offsets, 16), 16)
    return offsets
