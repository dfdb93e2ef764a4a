"""The per-tile bodies of feature_mse's forward and backward kernels (kernels/feature_mse.py).

Each reads one tile of BLOCK elements from ``start``: unmasked (MASKED False) when the tile lies
wholly below N, which keeps loads 128-bit for any N (kernels/_common.py). An operand is indexed by
its ACCESS: 2, dense in the traversal order (offset = index: vector loads); 1, gathered through
its strides in aligned runs of 16 contiguous elements (``_offsets`` says so to the compiler:
vector loads); 0, gathered element by element (kernels/_strided.py).
"""

import triton
import triton.language as tl
from fastsp.kernels._common import _load_f32, _store_cast
from fastsp.kernels._strided import _coordinates, _offsets


@triton.jit
def _fwd_tile(x_ptr, y_ptr, out_ptr, gx_ptr, gy_ptr, acc, start, N, grad_scale, layout,
              x_strides, y_strides, REDUCE: tl.constexpr, X_ACCESS: tl.constexpr,
              Y_ACCESS: tl.constexpr, WRITE_GX: tl.constexpr, WRITE_GY: tl.constexpr,
              BLOCK: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    local = tl.arange(0, BLOCK)
    idx = start + local
    mask = idx < N
    x_off = idx
    y_off = idx
    if X_ACCESS != 2 or Y_ACCESS != 2:
        coords = _coordinates(start, local, layout)
        if X_ACCESS != 2:
            x_off = _offsets(coords, x_strides, X_ACCESS == 1)
        if Y_ACCESS != 2:
            y_off = _offsets(coords, y_strides, Y_ACCESS == 1)
    d = _load_f32(x_ptr + x_off, mask, MASKED) - _load_f32(y_ptr + y_off, mask, MASKED)
    if REDUCE:
        acc += d * d
    else:
        _store_cast(out_ptr + idx, d * d, mask, MASKED)
    if WRITE_GX:
        _store_cast(gx_ptr + idx, d * grad_scale, mask, MASKED)
    if WRITE_GY:
        _store_cast(gy_ptr + idx, -d * grad_scale, mask, MASKED)
    return acc


@triton.jit
def _bwd_tile(x_ptr, y_ptr, g_ptr, gx_ptr, gy_ptr, g_scalar, start, N, grad_scale, layout,
              x_strides, y_strides, g_strides, G_SCALAR: tl.constexpr, X_ACCESS: tl.constexpr,
              Y_ACCESS: tl.constexpr, G_ACCESS: tl.constexpr, WRITE_GX: tl.constexpr,
              WRITE_GY: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    local = tl.arange(0, BLOCK)
    idx = start + local
    mask = idx < N
    x_off = idx
    y_off = idx
    g_off = idx
    if X_ACCESS != 2 or Y_ACCESS != 2 or G_ACCESS != 2:
        coords = _coordinates(start, local, layout)
        if X_ACCESS != 2:
            x_off = _offsets(coords, x_strides, X_ACCESS == 1)
        if Y_ACCESS != 2:
            y_off = _offsets(coords, y_strides, Y_ACCESS == 1)
        if G_ACCESS != 2:
            g_off = _offsets(coords, g_strides, G_ACCESS == 1)
    d = _load_f32(x_ptr + x_off, mask, MASKED) - _load_f32(y_ptr + y_off, mask, MASKED)
    if G_SCALAR:
        g = g_scalar
    else:
        g = _load_f32(g_ptr + g_off, mask, MASKED)
    grad = d * grad_scale * g
    if WRITE_GX:
        _store_cast(gx_ptr + idx, grad, mask, MASKED)
    if WRITE_GY:
        _store_cast(gy_ptr + idx, -grad, mask, MASKED)
