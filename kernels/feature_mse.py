"""Fused feature-space MSE: ``mse_loss(input, target, reduction)`` in Triton, one pass over memory.

Math (d = x - y over the N elements of the broadcast shape, accumulation in fp32):
    none: out_i = d_i^2        mean: out = sum_i d_i^2 / N        sum: out = sum_i d_i^2
    dL/dx_i = 2 d_i * s * g_i,  dL/dy_i = -dL/dx_i,  with s = 1/N (mean) or 1 (sum, none) and g the
    incoming gradient (a 0-d tensor for mean and sum, elementwise for none).

Kernels (one op, four kernels):
- ``_feature_mse_fwd_kernel``: stage 1. Program p owns a fixed, contiguous run of ``tiles``
  tiles of BLOCK elements and writes one fp32 partial sum. For mean and sum, when input and/or
  target require grad, it also writes the gradient for g == 1, 2 d s (in the dtype of the tensor
  it belongs to), in the same pass: the fused path. For ``none`` it writes d^2 instead.
- ``_feature_mse_finalize_kernel``: stage 2, one program sums the partials in index order. The
  partition depends only on N and the launch constants, and there are no atomics, so the result
  is bit-identical run after run (on the same device and Triton version).
- ``_feature_mse_bwd_kernel``: the backward from x and y: for ``none`` (the elementwise g is
  unknown at forward time), for a second backward through a retained graph (the fused buffers
  were consumed by the first) and, with SKIP_IF_ONE, as the fused backward of bf16/fp16 buffers.
- ``_feature_mse_scale_kernel``: the fused backward of fp32 buffers: scales them by g in place.
Both fused backwards load g on the device and return at once when g == 1 (the buffers already
hold the answer and are handed out as the gradients); otherwise bf16/fp16 gradients are
recomputed from x and y, rounding once as torch does (scaling a rounded buffer would round twice
and could miss flash-attention's 2x-of-torch error rule), and fp32 buffers are scaled. No host
sync anywhere (no ``.item()``, no ``torch.equal``): the op can be captured in a CUDA graph.

Bytes moved, forward + backward, N elements of e bytes, only the input requiring grad:
    eager mse_loss   about 7 N e (ATen writes (x-y)^2 and mean re-reads it: 4; backward: 3)
    unfused kernels  5 N e (forward reads x, y: 2; backward reads x, y, writes dx: 3)
    fused, g == 1    3 N e (forward reads x, y, writes dx; backward loads one scalar)
    fused, g != 1    5 N e for fp32 (backward rescales dx), 6 N e for bf16/fp16 (recomputes dx)
The floor is 3 N e, so with ``loss.backward()`` (or any loss whose weight is folded in as 1) the
fused path moves the minimum. The costs: the gradient buffer (N e bytes) is allocated at forward
time and lives until backward, it is written even if backward never runs, and x and y are saved
for backward (by reference, as torch's own MseLossBackward saves them). The buffer holds the
gradient's dtype, not fp32: fp32 would double the bytes written for bf16 and need a cast pass.
Under torch.compile the traced backward cannot mutate a saved tensor (functionalisation would copy
it), so it writes fresh gradients, even for g == 1: 2 N e (fp32 scale) or 3 N e (bf16/fp16
recompute) more than the eager fused path.

Layout. The op sees tensors of one shape (callers broadcast first). Host code orders the dimensions
by memory (largest stride first), drops size-1 dimensions and merges dimensions that are contiguous
in every operand, as TensorIterator does. An operand dense in that order (contiguous, channels_last
beside channels_last) is indexed as flat memory (X_ACCESS 2, ...): vector loads. Any other (sliced
views, stride-0 broadcast, the NCHW side of a channels_last pair) is gathered through up to 4 sizes
and its strides, without copies and without per-element 64-bit division (kernels/_strided.py).
Layouts those cannot index (over 4 merged dimensions) are first copied into one dense layout (2 N e
more bytes per copied operand). Outputs (``none`` and gradients) follow the pair's memory order
(dimensions by the larger stride of x and y): a channels_last input, a channels_last gradient.
64-bit offsets: ``_chunk_start`` turns ``tl.program_id(0)`` into int64 before multiplying, and
Triton types sizes and strides above int32 as int64: over 2^31 elements index correctly.

Launch rule, fixed rather than autotuned (this is memory-bound, one tile is a pure stream):
BLOCK = 4096 elements (16 per thread at 8 warps: two 128-bit loads per bf16 operand, enough bytes
in flight for HBM at low register counts) and at most 4096 programs: up to 16.7 M elements each
program owns one tile; above that each owns ``cdiv(tiles, 4096)`` consecutive tiles, which keeps
the partials (and stage 2) small. Not yet measured on a GPU (benchmarks/feature_mse_gpu.py reports
the fraction of copy bandwidth); ``python -m fastsp.kernels.compile_check`` checks registers,
spills and load widths of every specialisation for sm_80 and sm_90a. Tests override the constants
(``launch=``). They and the helpers shared with feature_mse_multi live in kernels/_common.py.
"""

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from fastsp.kernels._common import (
    _BLOCK,
    _DEFAULT_LAUNCH,
    _FINAL_BLOCK,
    _MAX_PROGRAMS,
    SUPPORTED_DTYPES,
    _cast_rtne,
    _chunk_start,
    _dense_like,
    _empty,
    _full_tiles,
    _launch_options,
    _scale_tiles,
    _tracing,
    plan_layout,
)
from fastsp.kernels._feature_mse_tiles import _bwd_tile, _fwd_tile
from fastsp.kernels._strided import empty_in_order, prepare, strides_args
from torch import Tensor

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
# The fused forward's register cap where ptxas needs it. Left to itself it fits the forward of a
# bf16 pair with one tile per program (up to 16.7 M elements) in 32 registers (100% occupancy) by
# loading the second half of a thread's tile only after the first is consumed: 32 B in flight.
# At 40 (75%) all four 128-bit loads are issued first: 64 B per thread, 96 KB per SM against 64.
# Elsewhere (fp16, fp32, mixed, several tiles, gathers, N % 16 != 0) ptxas already keeps 64 B or
# more in flight, and a cap of 40 would spill (python -m fastsp.kernels.compile_check shows both).
_FWD_REGISTERS = 40
_FWD_CEILING = 96  # above any count the forward uses (<= 80)


def _fwd_register_cap(x: Tensor, y: Tensor, accesses: list[int], n: int, tiles: int):
    if tiles > 1:  # the loop over tiles: a ceiling, since without one ptxas spilled (fp32, sm_80)
        return _FWD_CEILING
    bf16_pair = x.dtype == y.dtype == torch.bfloat16
    return _FWD_REGISTERS if bf16_pair and accesses == [2, 2] and n % 16 == 0 else None


# ---------------------------------------------------------------------------- launch rules
def launch_rule(numel: int, launch: Sequence[int] = ()) -> tuple[int, int, int, int]:
    """(BLOCK, tiles per program, programs, stage-2 BLOCK) for ``numel`` elements.

    ``launch`` = (block, max_programs, final_block) overrides the constants (tests use tiny ones).
    """
    block, max_programs, final_block = launch or (_BLOCK, _MAX_PROGRAMS, _FINAL_BLOCK)
    num_tiles = max(triton.cdiv(numel, block), 1)
    tiles = triton.cdiv(num_tiles, max_programs)
    return block, tiles, triton.cdiv(num_tiles, tiles), final_block


def _output_order(x: Tensor, y: Tensor) -> list[int]:
    """Traversal and output order: dimensions by the larger stride of x and y, outermost first."""
    return plan_layout(x.shape, x.stride(), y.stride())[0]


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _feature_mse_fwd_kernel(
    x_ptr,  # [N] fp32/bf16/fp16, strided as x_strides unless X_ACCESS == 2
    y_ptr,  # [N] fp32/bf16/fp16, strided as y_strides unless Y_ACCESS == 2
    out_ptr,  # [N] promoted dtype, traversal order: d^2 (REDUCE == 0 only)
    partial_ptr,  # [programs] fp32: sum of d^2 per program (REDUCE != 0 only)
    gx_ptr,  # [N] dtype of x, traversal order: 2 d s (WRITE_GX only)
    gy_ptr,  # [N] dtype of y, traversal order: -2 d s (WRITE_GY only)
    N,
    tiles,
    grad_scale,  # fp32: 2 s
    layout,  # 9 ints: sizes s1..s3 and their divisors (kernels/_strided.py)
    x_strides,  # 4 ints, outermost first
    y_strides,  # 4 ints
    REDUCE: tl.constexpr,
    X_ACCESS: tl.constexpr,  # how x is indexed: 2 flat, 1 gathered in 16-element runs, 0 gathered
    Y_ACCESS: tl.constexpr,
    WRITE_GX: tl.constexpr,
    WRITE_GY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    start = _chunk_start(pid, tiles, BLOCK)
    full = _full_tiles(start, N, tiles, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # Per lane, the same elements in the same order as one masked loop: bit-identical sums.
    for _ in range(full):
        acc = _fwd_tile(x_ptr, y_ptr, out_ptr, gx_ptr, gy_ptr, acc, start, N, grad_scale, layout,
                        x_strides, y_strides, REDUCE, X_ACCESS, Y_ACCESS, WRITE_GX, WRITE_GY, BLOCK,
                        False)  # fmt: skip
        start += BLOCK
    for _ in range(full, tiles):
        acc = _fwd_tile(x_ptr, y_ptr, out_ptr, gx_ptr, gy_ptr, acc, start, N, grad_scale, layout,
                        x_strides, y_strides, REDUCE, X_ACCESS, Y_ACCESS, WRITE_GX, WRITE_GY, BLOCK,
                        True)  # fmt: skip
        start += BLOCK
    if REDUCE:
        tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _feature_mse_finalize_kernel(
    partial_ptr,  # [num_partials] fp32
    out_ptr,  # [] promoted dtype
    num_partials,
    scale,  # fp32: 1/N (mean) or 1 (sum)
    BLOCK: tl.constexpr,
):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < num_partials, other=0.0)
    tl.store(out_ptr, _cast_rtne(tl.sum(acc, axis=0) * scale, out_ptr.dtype.element_ty))


@triton.jit
def _feature_mse_bwd_kernel(
    x_ptr,  # [N] fp32/bf16/fp16, strided unless X_ACCESS == 2
    y_ptr,  # [N] fp32/bf16/fp16, strided unless Y_ACCESS == 2
    g_ptr,  # [] (G_SCALAR) or [N] strided unless G_ACCESS == 2: grad of the output, promoted dtype
    gx_ptr,  # [N] dtype of x, traversal order (WRITE_GX only)
    gy_ptr,  # [N] dtype of y, traversal order (WRITE_GY only)
    N,
    tiles,
    grad_scale,  # fp32: 2 s
    layout,  # 9 ints: sizes s1..s3 and their divisors (kernels/_strided.py)
    x_strides,  # 4 ints, outermost first
    y_strides,  # 4 ints
    g_strides,  # 4 ints (unused when G_SCALAR)
    G_SCALAR: tl.constexpr,
    X_ACCESS: tl.constexpr,  # how x is indexed: 2 flat, 1 gathered in 16-element runs, 0 gathered
    Y_ACCESS: tl.constexpr,
    G_ACCESS: tl.constexpr,
    WRITE_GX: tl.constexpr,
    WRITE_GY: tl.constexpr,
    SKIP_IF_ONE: tl.constexpr,  # gx/gy already hold the g == 1 gradient (fused forward)
    BLOCK: tl.constexpr,
):
    start = _chunk_start(tl.program_id(0), tiles, BLOCK)
    g_scalar = 1.0
    if G_SCALAR:
        g_scalar = tl.load(g_ptr).to(tl.float32)
    run_tiles = tiles
    if SKIP_IF_ONE:
        # Decided on the device, not by a host sync: with g == 1 the fused buffers are the answer.
        run_tiles = tl.where(g_scalar != 1.0, tiles, 0)
    full = _full_tiles(start, N, run_tiles, BLOCK)
    for _ in range(full):
        _bwd_tile(x_ptr, y_ptr, g_ptr, gx_ptr, gy_ptr, g_scalar, start, N, grad_scale, layout,
                  x_strides, y_strides, g_strides, G_SCALAR, X_ACCESS, Y_ACCESS, G_ACCESS, WRITE_GX,
                  WRITE_GY, BLOCK, False)  # fmt: skip
        start += BLOCK
    for _ in range(full, run_tiles):
        _bwd_tile(x_ptr, y_ptr, g_ptr, gx_ptr, gy_ptr, g_scalar, start, N, grad_scale, layout,
                  x_strides, y_strides, g_strides, G_SCALAR, X_ACCESS, Y_ACCESS, G_ACCESS, WRITE_GX,
                  WRITE_GY, BLOCK, True)  # fmt: skip
        start += BLOCK


@triton.jit
def _feature_mse_scale_kernel(
    gx_ptr,  # [N] dense, dtype of x: the fused gradient 2 d s (SCALE_GX only)
    gy_ptr,  # [N] dense, dtype of y: -2 d s (SCALE_GY only)
    out_gx_ptr,  # [N] like gx_ptr; gx_ptr itself when IN_PLACE
    out_gy_ptr,  # [N] like gy_ptr; gy_ptr itself when IN_PLACE
    g_ptr,  # [] grad of the loss
    N,
    tiles,
    SCALE_GX: tl.constexpr,
    SCALE_GY: tl.constexpr,
    IN_PLACE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start = _chunk_start(tl.program_id(0), tiles, BLOCK)
    g = tl.load(g_ptr).to(tl.float32)
    run_tiles = tiles
    if IN_PLACE:
        # Decided on the device, not by a host sync: g == 1 leaves the buffers as they are.
        run_tiles = tl.where(g != 1.0, tiles, 0)
    if SCALE_GX:
        _scale_tiles(gx_ptr, out_gx_ptr, g, start, N, run_tiles, BLOCK)
    if SCALE_GY:
        _scale_tiles(gy_ptr, out_gy_ptr, g, start, N, run_tiles, BLOCK)


# ---------------------------------------------------------------------------- host launchers
def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(
            f"feature_mse kernels need one shape (broadcast first): {x.shape}, {y.shape}"
        )
    if x.device != y.device:
        raise ValueError(f"input on {x.device} but target on {y.device}")
    for name, t in (("input", x), ("target", y)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not one of {SUPPORTED_DTYPES}")


def _fwd_outputs(x, y, reduction, write_gx, write_gy):
    order = _output_order(x, y)
    out_dtype = torch.promote_types(x.dtype, y.dtype)
    if reduction == REDUCTIONS["none"]:
        out = empty_in_order(x.shape, order, out_dtype, x.device)
    else:
        out = _empty((), out_dtype, x.device)
    gx = empty_in_order(x.shape, order, x.dtype, x.device) if write_gx else x.new_empty(0)
    gy = empty_in_order(x.shape, order, y.dtype, x.device) if write_gy else y.new_empty(0)
    return out, gx, gy


def feature_mse_fwd(
    x: Tensor,
    y: Tensor,
    reduction: int,
    write_gx: bool,
    write_gy: bool,
    launch: Sequence[int] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss of ``x`` [*] against ``y`` [*] and, for mean/sum, the fused gradients (or empty)."""
    _check_pair(x, y)
    reduce = reduction != REDUCTIONS["none"]
    write_gx, write_gy = write_gx and reduce, write_gy and reduce
    order = _output_order(x, y)
    out, gx, gy = _fwd_outputs(x, y, reduction, write_gx, write_gy)
    n = x.numel()
    if n == 0:
        if reduce:  # torch: the mean of nothing is nan, the sum is 0
            out.fill_(math.nan if reduction == REDUCTIONS["mean"] else 0.0)
        return out, gx, gy
    block, tiles, programs, final_block = launch_rule(n, launch)
    (x, y), layout, (xs, ys), (x_access, y_access) = prepare(order, block, x, y)
    scale = 1.0 / n if reduction == REDUCTIONS["mean"] else 1.0
    partials = _empty((programs,), torch.float32, x.device) if reduce else out
    _feature_mse_fwd_kernel[(programs,)](
        x,
        y,
        out,
        partials,
        gx if write_gx else x,
        gy if write_gy else y,
        n,
        tiles,
        2.0 * scale,
        layout,
        xs,
        ys,
        REDUCE=reduce,
        X_ACCESS=x_access,
        Y_ACCESS=y_access,
        WRITE_GX=write_gx,
        WRITE_GY=write_gy,
        BLOCK=block,
        **_launch_options(block, _fwd_register_cap(x, y, [x_access, y_access], n, tiles)),
    )
    if reduce:
        _feature_mse_finalize_kernel[(1,)](
            partials, out, programs, scale, BLOCK=final_block, **_launch_options(final_block)
        )
    return out, gx, gy


def feature_mse_bwd(
    x: Tensor,
    y: Tensor,
    grad_out: Tensor,
    reduction: int,
    need_gx: bool,
    need_gy: bool,
    launch: Sequence[int] = (),
    into: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Unfused gradients for ``x`` and ``y`` (empty where not needed), recomputing d.

    ``into``: the fused buffers of the forward, rewritten in place only if grad_out != 1.
    """
    _check_pair(x, y)
    order = _output_order(x, y)
    if into is not None:
        gx, gy = into
    else:
        gx = empty_in_order(x.shape, order, x.dtype, x.device) if need_gx else x.new_empty(0)
        gy = empty_in_order(x.shape, order, y.dtype, x.device) if need_gy else y.new_empty(0)
    n = x.numel()
    if n == 0 or not (need_gx or need_gy):
        return gx, gy
    g_scalar = reduction != REDUCTIONS["none"]
    block, tiles, programs, _ = launch_rule(n, launch)
    if g_scalar:
        (x, y), layout, (xs, ys), (x_access, y_access) = prepare(order, block, x, y)
        gs, g_access = strides_args([]), 2
    else:
        prepared = prepare(order, block, x, y, grad_out)
        (x, y, grad_out), layout, (xs, ys, gs), (x_access, y_access, g_access) = prepared
    scale = 1.0 / n if reduction == REDUCTIONS["mean"] else 1.0
    _feature_mse_bwd_kernel[(programs,)](
        x,
        y,
        grad_out,
        gx if need_gx else x,
        gy if need_gy else y,
        n,
        tiles,
        2.0 * scale,
        layout,
        xs,
        ys,
        gs,
        G_SCALAR=g_scalar,
        X_ACCESS=x_access,
        Y_ACCESS=y_access,
        G_ACCESS=g_access,
        WRITE_GX=need_gx,
        WRITE_GY=need_gy,
        SKIP_IF_ONE=into is not None,
        BLOCK=block,
        **_launch_options(block),
    )
    return gx, gy


def feature_mse_scale(
    gx: Tensor, gy: Tensor, grad_out: Tensor, in_place: bool, launch: Sequence[int] = ()
) -> tuple[Tensor, Tensor]:
    """``gx * grad_out`` and ``gy * grad_out`` for the dense fused buffers (empty ones skipped).

    In place the buffers are left untouched when grad_out == 1, decided on the device.
    """
    scale_gx, scale_gy = gx.numel() > 0, gy.numel() > 0
    if in_place:
        out_gx, out_gy = gx, gy
    else:
        # Fresh outputs even for an empty (not needed) buffer: a torch.library op may not return
        # one of its inputs (torch.compile of a loss where only the input requires grad).
        out_gx, out_gy = _dense_like(gx), _dense_like(gy)
    n = max(gx.numel(), gy.numel())
    if n == 0:
        return out_gx, out_gy
    block, tiles, programs, _ = launch_rule(n, launch)
    _feature_mse_scale_kernel[(programs,)](
        gx if scale_gx else gy,
        gy if scale_gy else gx,
        out_gx if scale_gx else out_gy,
        out_gy if scale_gy else out_gx,
        grad_out,
        n,
        tiles,
        SCALE_GX=scale_gx,
        SCALE_GY=scale_gy,
        IN_PLACE=in_place,
        BLOCK=block,
        **_launch_options(block),
    )
    return out_gx, out_gy


# ---------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("fastsp::feature_mse_fwd", mutates_args=())
def _fwd_op(
    input: Tensor,
    target: Tensor,
    reduction: int,
    write_grad_input: bool,
    write_grad_target: bool,
    launch: list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    return feature_mse_fwd(input, target, reduction, write_grad_input, write_grad_target, launch)


@_fwd_op.register_fake
def _(input, target, reduction, write_grad_input, write_grad_target, launch):
    reduce = reduction != REDUCTIONS["none"]
    return _fwd_outputs(
        input, target, reduction, write_grad_input and reduce, write_grad_target and reduce
    )


@torch.library.custom_op("fastsp::feature_mse_bwd", mutates_args=())
def _bwd_op(
    input: Tensor,
    target: Tensor,
    grad_out: Tensor,
    reduction: int,
    need_grad_input: bool,
    need_grad_target: bool,
    launch: list[int],
) -> tuple[Tensor, Tensor]:
    return feature_mse_bwd(
        input, target, grad_out, reduction, need_grad_input, need_grad_target, launch
    )


@_bwd_op.register_fake
def _(input, target, grad_out, reduction, need_grad_input, need_grad_target, launch):
    order = _output_order(input, target)
    gx = empty_in_order(input.shape, order, input.dtype, input.device)
    gy = empty_in_order(input.shape, order, target.dtype, input.device)
    return gx if need_grad_input else input.new_empty(
        0
    ), gy if need_grad_target else target.new_empty(0)


@torch.library.custom_op("fastsp::feature_mse_scale", mutates_args=())
def _scale_op(
    grad_input: Tensor, grad_target: Tensor, grad_out: Tensor, launch: list[int]
) -> tuple[Tensor, Tensor]:
    return feature_mse_scale(grad_input, grad_target, grad_out, False, launch)


@_scale_op.register_fake
def _(grad_input, grad_target, grad_out, launch):
    return torch.empty_like(grad_input), torch.empty_like(grad_target)


# ---------------------------------------------------------------------------- autograd
# The torch.library registration below is this op's autograd.Function: torch.compile traces it
# (fullgraph) where a plain autograd.Function around a Triton launch would not be capturable.
def _fwd_setup_context(ctx, inputs, output):
    x, y, reduction, write_gx, write_gy, launch = inputs
    _, gx, gy = output
    ctx.save_for_backward(x, y, gx, gy)
    ctx.reduction, ctx.launch = reduction, launch
    ctx.fused = reduction != REDUCTIONS["none"] and (write_gx or write_gy)
    ctx.fused_consumed = False


def _fwd_backward(ctx, grad_out, _grad_gx, _grad_gy):
    if torch.is_grad_enabled():  # create_graph=True: these gradients have no formula of their own
        raise RuntimeError("feature_mse (triton) has no double backward; use backend='torch'")
    x, y, gx, gy = ctx.saved_tensors
    need_gx, need_gy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if ctx.fused and not ctx.fused_consumed:
        # bf16/fp16 buffers are recomputed from x and y when g != 1 (one rounding, as torch);
        # fp32 ones are scaled (the second rounding is below fp32 noise).
        recompute = any(t.dtype != torch.float32 for t in (gx, gy) if t.numel())
        if _tracing(grad_out):
            if recompute:
                gx, gy = _bwd_op(x, y, grad_out, ctx.reduction, need_gx, need_gy, ctx.launch)
            else:
                gx, gy = _scale_op(gx, gy, grad_out, ctx.launch)
        else:
            # Eager: rewrite the saved buffers in place (only if g != 1, decided on the device)
            # and hand them out; a second backward through a retained graph finds them consumed
            # and recomputes from x and y.
            ctx.fused_consumed = True
            if recompute:
                feature_mse_bwd(
                    x, y, grad_out, ctx.reduction, need_gx, need_gy, ctx.launch, (gx, gy)
                )
            else:
                feature_mse_scale(gx, gy, grad_out, True, ctx.launch)
    else:
        gx, gy = _bwd_op(x, y, grad_out, ctx.reduction, need_gx, need_gy, ctx.launch)
    return gx if need_gx else None, gy if need_gy else None, None, None, None, None


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ---------------------------------------------------------------------------- public function
def feature_mse(
    input: Tensor, target: Tensor, reduction: str = "mean", *, launch: Sequence[int] = ()
) -> Tensor:
    """Triton ``mse_loss`` of ``input`` [*] and ``target`` [*] (same shape), differentiable.

    Fuses the gradient into the forward when reduction is mean or sum and a tensor requires grad.
    Callers broadcast first and pick the backend (fastsp.feature_loss.feature_mse does both).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    grad = torch.is_grad_enabled()
    out, _, _ = _fwd_op(
        input,
        target,
        REDUCTIONS[reduction],
        grad and input.requires_grad,
        grad and target.requires_grad,
        list(launch or _DEFAULT_LAUNCH),  # never []: torch.library reads [] as a tensor list
    )
    return out


# The plain-torch reference, importable without triton: fastsp.feature_loss.feature_mse_ref.
