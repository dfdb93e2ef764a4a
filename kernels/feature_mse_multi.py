"""Grouped feature-space MSE: ``sum_i w_i * mean((x_i - y_i)^2)`` over T pairs in one launch.

Math: loss_i = sum_j d_ij^2 / N_i, d_i = x_i - y_i, out = sum_i w_i loss_i (fp32 accumulation),
dL/dx_i = 2 w_i / N_i * d_i * g, dL/dy_i = -dL/dx_i, dL/dw_i = loss_i * g.
One launch covers every pair: program p finds its pair i from ``starts`` (prefix sums of
per-pair program counts, a tuple of ints; the loop over pairs is unrolled at compile time) and
owns ``tiles`` consecutive tiles of that pair, so each partial belongs to one pair; stage 2 (one
program) sums each pair's partials in index order, stores the per-pair losses (saved for dL/dw)
and the weighted total.
No atomics: bit-identical run after run. Pointers travel as Triton tuples: no pointer table in
device memory (its upload would not be capturable in a CUDA graph), for one compilation per
distinct T, dtypes and size-divisibility flags, all fixed in a training run.

The fused path, bytes moved and the no-sync backward are those of ``feature_mse``: with grad
enabled the forward writes 2 w_i / N_i * d_i for every input (and -that for every target), and
backward rewrites those buffers only when g != 1, decided on the device. Weights given as numbers
are fp32 launch arguments; a weight tensor is read on the device (no ``.item()``); a list of
weight tensors is refused here (a host sync per weight): ``fastsp.feature_mse_multi`` stacks it.

Layout: a pair dense with equal strides (contiguous, channels_last with channels_last) is read as
flat memory; any other pair is made contiguous first (2 N_i e more bytes per copied tensor; the
single-pair ``feature_mse`` gathers strided tensors without copies). Launch constants and the
unmasked full tiles are those of ``feature_mse`` (kernels/_common.py).
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
    _is_flat,
    _launch_options,
    _load_f32,
    _scale_tiles,
    _store_cast,
    _tracing,
    plan_layout,
)
from torch import Tensor

# Above any count used (<= 80, compile_check); without a ceiling ptxas spilled (fp16, sm_90a).
_MULTI_REGISTERS = 96


# ---------------------------------------------------------------------------- launch rules
def launch_rule(numels: Sequence[int], launch: Sequence[int] = ()):
    """(BLOCK, tiles per program, starts: T+1 program offsets, stage-2 BLOCK) for T pairs."""
    block, max_programs, final_block = launch or (_BLOCK, _MAX_PROGRAMS, _FINAL_BLOCK)
    total_tiles = max(sum(triton.cdiv(n, block) for n in numels), 1)
    tiles = triton.cdiv(total_tiles, max_programs)
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + triton.cdiv(triton.cdiv(n, block), tiles))
    return block, tiles, starts, final_block


def is_flat_pair(x: Tensor, y: Tensor) -> bool:
    """True when x and y can be read as the same flat run of memory (dense, equal strides)."""
    _, sizes, merged = plan_layout(x.shape, x.stride(), y.stride())
    return _is_flat(sizes, merged)


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _multi_tile(x_ptr, y_ptr, gx_ptr, gy_ptr, acc, start, n, grad_scale, g, REDUCE: tl.constexpr,
                WRITE_GX: tl.constexpr, WRITE_GY: tl.constexpr, BLOCK: tl.constexpr,
                MASKED: tl.constexpr):  # fmt: skip
    # One tile: the forward (REDUCE) adds d^2 to acc and writes the g == 1 gradients; else times g.
    idx = start + tl.arange(0, BLOCK)
    mask = idx < n
    d = _load_f32(x_ptr + idx, mask, MASKED) - _load_f32(y_ptr + idx, mask, MASKED)
    if REDUCE:
        acc += d * d
        grad = d * grad_scale
    else:
        grad = d * grad_scale * g
    if WRITE_GX:
        _store_cast(gx_ptr + idx, grad, mask, MASKED)
    if WRITE_GY:
        _store_cast(gy_ptr + idx, -grad, mask, MASKED)
    return acc


@triton.jit
def _multi_tiles(x_ptr, y_ptr, gx_ptr, gy_ptr, start, n, tiles, grad_scale, g,
                 REDUCE: tl.constexpr, WRITE_GX: tl.constexpr, WRITE_GY: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    # `tiles` tiles from `start`: unmasked while wholly below n, then masked (kernels/_common.py).
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    full = _full_tiles(start, n, tiles, BLOCK)
    for _ in range(full):
        acc = _multi_tile(x_ptr, y_ptr, gx_ptr, gy_ptr, acc, start, n, grad_scale, g, REDUCE,
                          WRITE_GX, WRITE_GY, BLOCK, False)  # fmt: skip
        start += BLOCK
    for _ in range(full, tiles):
        acc = _multi_tile(x_ptr, y_ptr, gx_ptr, gy_ptr, acc, start, n, grad_scale, g, REDUCE,
                          WRITE_GX, WRITE_GY, BLOCK, True)  # fmt: skip
        start += BLOCK
    return acc


@triton.jit
def _feature_mse_multi_fwd_kernel(
    xs,  # T pointers, [N_i] fp32/bf16/fp16, dense
    ys,  # T pointers, [N_i] fp32/bf16/fp16, same strides as xs[i]
    gxs,  # T pointers, [N_i] dtype of xs[i]: 2 w_i / N_i * d_i (WRITE_GX only)
    gys,  # T pointers, [N_i] dtype of ys[i]: -2 w_i / N_i * d_i (WRITE_GY only)
    partial_ptr,  # [programs] fp32: sum of d^2 per program
    w_ptr,  # [T] float weights (W_FROM_PTR only)
    weights,  # T fp32 weights (not W_FROM_PTR)
    inv_ns,  # T fp32: 1 / N_i
    ns,  # T ints: N_i
    starts,  # T + 1 ints: first program of each pair
    tiles,
    T: tl.constexpr,
    W_FROM_PTR: tl.constexpr,
    WRITE_GX: tl.constexpr,
    WRITE_GY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    for i in tl.static_range(T):
        if (pid >= starts[i]) & (pid < starts[i + 1]):
            if W_FROM_PTR:
                w = tl.load(w_ptr + i).to(tl.float32)
            else:
                w = weights[i]
            start = _chunk_start(pid - starts[i], tiles, BLOCK)
            grad_scale = 2.0 * w * inv_ns[i]
            acc = _multi_tiles(xs[i], ys[i], gxs[i], gys[i], start, ns[i], tiles, grad_scale,
                               1.0, True, WRITE_GX, WRITE_GY, BLOCK)  # fmt: skip
            tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _feature_mse_multi_finalize_kernel(
    partial_ptr,  # [programs] fp32
    losses_ptr,  # [T] fp32: per-pair mean squared error
    out_ptr,  # [] promoted dtype: sum_i w_i loss_i
    w_ptr,  # [T] float weights (W_FROM_PTR only)
    weights,  # T fp32 weights (not W_FROM_PTR)
    inv_ns,  # T fp32: 1 / N_i (nan for an empty pair, as torch's mean of nothing)
    starts,  # T + 1 ints
    T: tl.constexpr,
    W_FROM_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    total = 0.0
    for i in tl.static_range(T):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(starts[i], starts[i + 1], BLOCK):
            offs = s + tl.arange(0, BLOCK)
            acc += tl.load(partial_ptr + offs, mask=offs < starts[i + 1], other=0.0)
        loss = tl.sum(acc, axis=0) * inv_ns[i]
        tl.store(losses_ptr + i, loss)
        if W_FROM_PTR:
            w = tl.load(w_ptr + i).to(tl.float32)
        else:
            w = weights[i]
        total += w * loss
    tl.store(out_ptr, _cast_rtne(total, out_ptr.dtype.element_ty))


@triton.jit
def _feature_mse_multi_bwd_kernel(
    xs,  # T pointers, [N_i] fp32/bf16/fp16, dense
    ys,  # T pointers, [N_i], same strides as xs[i]
    gxs,  # T pointers, [N_i] dtype of xs[i] (WRITE_GX only)
    gys,  # T pointers, [N_i] dtype of ys[i] (WRITE_GY only)
    g_ptr,  # [] grad of the loss
    w_ptr,  # [T] float weights (W_FROM_PTR only)
    weights,  # T fp32 (not W_FROM_PTR)
    inv_ns,  # T fp32
    ns,  # T ints
    starts,  # T + 1 ints
    tiles,
    T: tl.constexpr,
    W_FROM_PTR: tl.constexpr,
    WRITE_GX: tl.constexpr,
    WRITE_GY: tl.constexpr,
    SKIP_IF_ONE: tl.constexpr,  # gxs/gys already hold the g == 1 gradients (fused forward)
    BLOCK: tl.constexpr,
):
    g = tl.load(g_ptr).to(tl.float32)
    run_tiles = tiles
    if SKIP_IF_ONE:
        # Decided on the device, not by a host sync: with g == 1 the fused buffers are the answer.
        run_tiles = tl.where(g != 1.0, tiles, 0)
    pid = tl.program_id(0)
    for i in tl.static_range(T):
        if (pid >= starts[i]) & (pid < starts[i + 1]):
            if W_FROM_PTR:
                w = tl.load(w_ptr + i).to(tl.float32)
            else:
                w = weights[i]
            start = _chunk_start(pid - starts[i], tiles, BLOCK)
            _multi_tiles(xs[i], ys[i], gxs[i], gys[i], start, ns[i], run_tiles,
                         2.0 * w * inv_ns[i], g, False, WRITE_GX, WRITE_GY, BLOCK)  # fmt: skip


@triton.jit
def _feature_mse_multi_scale_kernel(
    gxs,  # T pointers, [N_i] dense: fused input gradients (SCALE_GX only)
    gys,  # T pointers, [N_i] dense: fused target gradients (SCALE_GY only)
    out_gxs,  # T pointers like gxs; gxs itself when IN_PLACE
    out_gys,  # T pointers like gys; gys itself when IN_PLACE
    g_ptr,  # [] grad of the loss
    ns,  # T ints
    starts,  # T + 1 ints
    tiles,
    T: tl.constexpr,
    SCALE_GX: tl.constexpr,
    SCALE_GY: tl.constexpr,
    IN_PLACE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.load(g_ptr).to(tl.float32)
    run_tiles = tiles
    if IN_PLACE:
        # Decided on the device, not by a host sync: g == 1 leaves the buffers as they are.
        run_tiles = tl.where(g != 1.0, tiles, 0)
    for i in tl.static_range(T):
        if (pid >= starts[i]) & (pid < starts[i + 1]):
            start = _chunk_start(pid - starts[i], tiles, BLOCK)
            if SCALE_GX:
                _scale_tiles(gxs[i], out_gxs[i], g, start, ns[i], run_tiles, BLOCK)
            if SCALE_GY:
                _scale_tiles(gys[i], out_gys[i], g, start, ns[i], run_tiles, BLOCK)


# ---------------------------------------------------------------------------- host launchers
def _check(xs: Sequence[Tensor], ys: Sequence[Tensor], weights: Tensor | None) -> None:
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"need one target per input and at least one pair: {len(xs)}, {len(ys)}")
    device = xs[0].device
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if x.shape != y.shape or not is_flat_pair(x, y):
            raise ValueError(f"pair {i} must share one dense layout (callers make it contiguous)")
        for t in (x, y):
            if t.dtype not in SUPPORTED_DTYPES or t.device != device:
                raise TypeError(f"pair {i}: {t.dtype} on {t.device} not supported here")
    if weights is not None and (weights.shape != (len(xs),) or weights.device != device):
        raise ValueError(f"weights must be a [{len(xs)}] tensor on {device}")


def _out_dtype(xs, ys, weights):
    dtype = xs[0].dtype
    for t in [*xs, *ys, *([weights] if weights is not None else [])]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _args(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    # Empty tensors get a 1-element stand-in: no program reads them, but a null pointer may not
    # pass the launcher's pointer check.
    return tuple(t if t.numel() else _empty((1,), t.dtype, t.device) for t in tensors)


def _weight_args(weights: Tensor | None, weight_values: Sequence[float], like: Tensor):
    if weights is None:
        return like, tuple(float(w) for w in weight_values), False
    return weights, tuple(0.0 for _ in range(weights.numel())), True


def feature_mse_multi_fwd(
    xs: Sequence[Tensor],
    ys: Sequence[Tensor],
    weights: Tensor | None,
    weight_values: Sequence[float],
    write_gx: bool,
    write_gy: bool,
    launch: Sequence[int] = (),
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """(weighted total, per-pair losses [T] fp32, fused input grads, fused target grads)."""
    _check(xs, ys, weights)
    out = _empty((), _out_dtype(xs, ys, weights), xs[0].device)
    losses = _empty((len(xs),), torch.float32, xs[0].device)
    gxs = [_dense_like(x) for x in xs] if write_gx else []
    gys = [_dense_like(y) for y in ys] if write_gy else []
    numels = [x.numel() for x in xs]
    block, tiles, starts, final_block = launch_rule(numels, launch)
    inv_ns = tuple(1.0 / n if n else math.nan for n in numels)
    w_ptr, w_values, w_from_ptr = _weight_args(weights, weight_values, losses)
    partials = _empty((max(starts[-1], 1),), torch.float32, out.device)
    if starts[-1]:
        _feature_mse_multi_fwd_kernel[(starts[-1],)](
            _args(xs),
            _args(ys),
            _args(gxs) if write_gx else _args(xs),
            _args(gys) if write_gy else _args(ys),
            partials,
            w_ptr,
            w_values,
            inv_ns,
            tuple(numels),
            tuple(starts),
            tiles,
            T=len(xs),
            W_FROM_PTR=w_from_ptr,
            WRITE_GX=write_gx,
            WRITE_GY=write_gy,
            BLOCK=block,
            **_launch_options(block, _MULTI_REGISTERS),
        )
    _feature_mse_multi_finalize_kernel[(1,)](
        partials,
        losses,
        out,
        w_ptr,
        w_values,
        inv_ns,
        tuple(starts),
        T=len(xs),
        W_FROM_PTR=w_from_ptr,
        BLOCK=final_block,
        **_launch_options(final_block),
    )
    return out, losses, gxs, gys


def feature_mse_multi_bwd(
    xs: Sequence[Tensor],
    ys: Sequence[Tensor],
    grad_out: Tensor,
    weights: Tensor | None,
    weight_values: Sequence[float],
    need_gx: bool,
    need_gy: bool,
    launch: Sequence[int] = (),
    into: tuple[list[Tensor], list[Tensor]] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Unfused gradients of every input and target (empty lists where not needed).

    ``into``: the fused buffers of the forward, rewritten in place only if grad_out != 1.
    """
    if into is not None:
        gxs, gys = into
    else:
        gxs = [_dense_like(x) for x in xs] if need_gx else []
        gys = [_dense_like(y) for y in ys] if need_gy else []
    numels = [x.numel() for x in xs]
    block, tiles, starts, _ = launch_rule(numels, launch)
    if not (need_gx or need_gy) or not starts[-1]:
        return gxs, gys
    w_ptr, w_values, w_from_ptr = _weight_args(weights, weight_values, grad_out)
    _feature_mse_multi_bwd_kernel[(starts[-1],)](
        _args(xs),
        _args(ys),
        _args(gxs) if need_gx else _args(xs),
        _args(gys) if need_gy else _args(ys),
        grad_out,
        w_ptr,
        w_values,
        tuple(1.0 / n if n else 0.0 for n in numels),
        tuple(numels),
        tuple(starts),
        tiles,
        T=len(xs),
        W_FROM_PTR=w_from_ptr,
        WRITE_GX=need_gx,
        WRITE_GY=need_gy,
        SKIP_IF_ONE=into is not None,
        BLOCK=block,
        **_launch_options(block, _MULTI_REGISTERS),
    )
    return gxs, gys


def feature_mse_multi_scale(
    gxs: Sequence[Tensor],
    gys: Sequence[Tensor],
    grad_out: Tensor,
    in_place: bool,
    launch: Sequence[int] = (),
) -> tuple[list[Tensor], list[Tensor]]:
    """Every fused buffer times ``grad_out``; in place, untouched when grad_out == 1."""
    if in_place:
        out_gxs, out_gys = list(gxs), list(gys)
    else:
        out_gxs, out_gys = [_dense_like(g) for g in gxs], [_dense_like(g) for g in gys]
    ref = gxs or gys
    if not ref:
        return out_gxs, out_gys
    numels = [g.numel() for g in ref]
    block, tiles, starts, _ = launch_rule(numels, launch)
    if not starts[-1]:
        return out_gxs, out_gys
    _feature_mse_multi_scale_kernel[(starts[-1],)](
        _args(gxs or gys),
        _args(gys or gxs),
        _args(out_gxs or out_gys),
        _args(out_gys or out_gxs),
        grad_out,
        tuple(numels),
        tuple(starts),
        tiles,
        T=len(ref),
        SCALE_GX=bool(gxs),
        SCALE_GY=bool(gys),
        IN_PLACE=in_place,
        BLOCK=block,
        **_launch_options(block),
    )
    return out_gxs, out_gys


# ---------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("fastsp::feature_mse_multi_fwd", mutates_args=())
def _fwd_op(
    inputs: list[Tensor],
    targets: list[Tensor],
    weights: Tensor | None,
    weight_values: list[float],
    write_grad_inputs: bool,
    write_grad_targets: bool,
    launch: list[int],
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    return feature_mse_multi_fwd(
        inputs, targets, weights, weight_values, write_grad_inputs, write_grad_targets, launch
    )


@_fwd_op.register_fake
def _(inputs, targets, weights, weight_values, write_grad_inputs, write_grad_targets, launch):
    device = inputs[0].device
    out = torch.empty((), dtype=_out_dtype(inputs, targets, weights), device=device)
    losses = torch.empty((len(inputs),), dtype=torch.float32, device=device)
    gxs = [torch.empty_like(x) for x in inputs] if write_grad_inputs else []
    gys = [torch.empty_like(y) for y in targets] if write_grad_targets else []
    return out, losses, gxs, gys


@torch.library.custom_op("fastsp::feature_mse_multi_bwd", mutates_args=())
def _bwd_op(
    inputs: list[Tensor],
    targets: list[Tensor],
    grad_out: Tensor,
    weights: Tensor | None,
    weight_values: list[float],
    need_grad_inputs: bool,
    need_grad_targets: bool,
    launch: list[int],
) -> tuple[list[Tensor], list[Tensor]]:
    return feature_mse_multi_bwd(
        inputs,
        targets,
        grad_out,
        weights,
        weight_values,
        need_grad_inputs,
        need_grad_targets,
        launch,
    )


@_bwd_op.register_fake
def _(
    inputs, targets, grad_out, weights, weight_values, need_grad_inputs, need_grad_targets, launch
):
    gxs = [torch.empty_like(x) for x in inputs] if need_grad_inputs else []
    gys = [torch.empty_like(y) for y in targets] if need_grad_targets else []
    return gxs, gys


@torch.library.custom_op("fastsp::feature_mse_multi_scale", mutates_args=())
def _scale_op(
    grad_inputs: list[Tensor], grad_targets: list[Tensor], grad_out: Tensor, launch: list[int]
) -> tuple[list[Tensor], list[Tensor]]:
    return feature_mse_multi_scale(grad_inputs, grad_targets, grad_out, False, launch)


@_scale_op.register_fake
def _(grad_inputs, grad_targets, grad_out, launch):
    return [torch.empty_like(g) for g in grad_inputs], [torch.empty_like(g) for g in grad_targets]


# ---------------------------------------------------------------------------- autograd
# The torch.library registration is this op's autograd.Function (see kernels/feature_mse.py).
def _fwd_setup_context(ctx, inputs, output):
    xs, ys, weights, weight_values, write_gx, write_gy, launch = inputs
    _, losses, gxs, gys = output
    ctx.num = len(xs)
    ctx.num_gx, ctx.num_gy = len(gxs), len(gys)
    ctx.weight_values, ctx.launch = weight_values, launch
    ctx.has_weights = weights is not None
    ctx.save_for_backward(*xs, *ys, *gxs, *gys, losses, *([weights] if ctx.has_weights else []))
    ctx.fused_consumed = False


def _fwd_backward(ctx, grad_out, _grad_losses, _grad_gxs, _grad_gys):
    if torch.is_grad_enabled():  # create_graph=True: these gradients have no formula of their own
        raise RuntimeError(
            "feature_mse_multi (triton backend) has no double backward; use backend='torch'"
        )
    saved = list(ctx.saved_tensors)
    n = ctx.num
    xs, ys = saved[:n], saved[n : 2 * n]
    rest = saved[2 * n :]
    gxs, gys = rest[: ctx.num_gx], rest[ctx.num_gx : ctx.num_gx + ctx.num_gy]
    losses = rest[ctx.num_gx + ctx.num_gy]
    weights = rest[-1] if ctx.has_weights else None
    # needs_input_grad holds one bool per tensor of a list argument.
    needs_x, needs_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_x, need_y = any(needs_x), any(needs_y)
    fused_x, fused_y = bool(gxs), bool(gys)
    args = (xs, ys, grad_out, weights, ctx.weight_values, fused_x, fused_y, ctx.launch)
    if (fused_x or fused_y) and not ctx.fused_consumed:
        # As feature_mse: bf16/fp16 buffers are recomputed when g != 1, fp32 ones scaled.
        recompute = any(t.dtype != torch.float32 for t in (*gxs, *gys))
        if _tracing(grad_out):
            if recompute:
                gxs, gys = _bwd_op(*args)
            else:
                gxs, gys = _scale_op(gxs, gys, grad_out, ctx.launch)
        else:
            ctx.fused_consumed = True
            if recompute:
                feature_mse_multi_bwd(*args, into=(gxs, gys))
            else:
                feature_mse_multi_scale(gxs, gys, grad_out, True, ctx.launch)
    elif need_x or need_y:
        gxs, gys = _bwd_op(xs, ys, grad_out, weights, ctx.weight_values, need_x, need_y, ctx.launch)
    grad_w = None
    if weights is not None and ctx.needs_input_grad[2]:
        grad_w = (losses * grad_out.float()).to(weights.dtype)
    grad_xs = (
        [g if need else None for g, need in zip(gxs, needs_x, strict=True)]
        if need_x
        else [None] * n
    )
    grad_ys = (
        [g if need else None for g, need in zip(gys, needs_y, strict=True)]
        if need_y
        else [None] * n
    )
    return grad_xs, grad_ys, grad_w, None, None, None, None


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ---------------------------------------------------------------------------- public function
def feature_mse_multi(
    inputs: Sequence[Tensor],
    targets: Sequence[Tensor],
    weights: Sequence[float] | Tensor,
    *,
    launch: Sequence[int] = (),
) -> Tensor:
    """``sum_i weights[i] * mse_loss(inputs[i], targets[i])`` for same-shape pairs, one launch.

    ``weights``: numbers, or one [T] tensor (fastsp.feature_mse_multi stacks a list of weight
    tensors into one on the device before it calls this). Pairs that are not dense with equal
    strides are made contiguous (differentiably) first.
    """
    if not isinstance(weights, Tensor) and any(isinstance(w, Tensor) for w in weights):
        raise TypeError(
            "weights must be numbers or one 1-D tensor, not a list of tensors (reading each "
            "would sync with the host): pass torch.stack(weights), or call fastsp.feature_mse_multi"
        )
    if not len(inputs) == len(targets) == len(weights):
        raise ValueError(f"{len(inputs)} inputs, {len(targets)} targets, {len(weights)} weights")
    xs, ys = [], []
    for x, y in zip(inputs, targets, strict=True):
        if x.shape != y.shape:
            raise ValueError(f"pairs must have one shape (broadcast first): {x.shape}, {y.shape}")
        if not is_flat_pair(x, y):
            x, y = x.contiguous(), y.contiguous()
        xs.append(x)
        ys.append(y)
    w_tensor = weights if isinstance(weights, Tensor) else None
    # Lists passed to the op are never empty: torch.library reads [] as an empty tensor list.
    w_values = [0.0] * len(xs) if w_tensor is not None else [float(w) for w in weights]
    grad = torch.is_grad_enabled()
    out, _, _, _ = _fwd_op(
        xs,
        ys,
        w_tensor,
        w_values,
        grad and any(x.requires_grad for x in xs),
        grad and any(y.requires_grad for y in ys),
        list(launch or _DEFAULT_LAUNCH),
    )
    return out


# The plain-torch reference, importable without triton: fastsp.feature_loss.feature_mse_multi_ref.
