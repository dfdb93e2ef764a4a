"""A predicted step time from the ops a dry run dispatches: one roofline per op, at datasheet peaks.

    time(op) = max(FLOPs / peak FLOP/s, bytes / peak memory bandwidth)

(the roofline model: Williams, Waterman and Patterson, "Roofline: an insightful visual performance
model for multicore architectures", CACM 2009). `Roofline` is a TorchDispatchMode that sees every
aten or custom op of the step (on fake CUDA tensors, so nothing runs) and records:
- its FLOPs, from torch.utils.flop_counter's formulas (matmuls, convolutions, attention; every
  other op counts 0 and is bound by its bytes);
- the bytes it must move: each distinct tensor it reads, once, and each it writes, once, by the
  span of memory its strides cover (a stride-0 broadcast reads its storage once); ops whose
  outputs are views of their inputs (view, permute, expand, ...) move nothing.
The peak applied to an op's FLOPs is that of its inputs' dtype: bf16/fp16 tensor cores, else fp32.

The sum over ops is the predicted step time. It is a floor, not a forecast: every op at its peak,
no launch gaps, no overlap (which a real step could only lower by running ops concurrently), no
cache reuse between ops (which fused kernels and L2 give). benchmarks/run_gpu.sh sets it beside
the measured time; the ratio is the fraction of the floor a GPU reaches.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

# NVIDIA's datasheets (SXM): dense tensor-core bf16/fp16 (no sparsity), fp32 (CUDA cores),
# HBM bandwidth, memory.
GPUS = {
    "H100 SXM": {"bf16_tflops": 989.0, "fp32_tflops": 67.0, "hbm_tb_s": 3.35, "memory_gb": 80},
    "H200 SXM": {"bf16_tflops": 989.0, "fp32_tflops": 67.0, "hbm_tb_s": 4.8, "memory_gb": 141},
}
TOP_OPS = 10


def _span_bytes(t: torch.Tensor) -> int:
    """The bytes of memory a tensor's elements cover (stride-0 dimensions counted once)."""
    if t.numel() == 0:
        return 0
    dims = zip(t.shape, t.stride(), strict=True)
    span = 1 + sum((size - 1) * abs(stride) for size, stride in dims)
    return min(span, t.numel()) * t.element_size()


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


class Roofline(TorchDispatchMode):
    """Per op name: calls, FLOPs, bytes, and its roofline seconds on each GPU of `GPUS`."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, dict] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.observe(func, args, kwargs or {}, out)
        return out

    def observe(self, func, args, kwargs, out) -> None:
        """Record one op that ran with `args`, `kwargs` and made `out`."""
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage()._cdata for t in inputs}
        if not outputs:
            return  # a metadata query (prim.device, sizes): no kernel
        if not func._schema.is_mutable and all(
            t.untyped_storage()._cdata in storages for t in outputs
        ):
            return  # views of the inputs: no bytes move
        packet = func._overloadpacket
        flops = (
            flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        )
        moved = sum(_span_bytes(t) for t in {_key(t): t for t in inputs}.values())
        moved += sum(_span_bytes(t) for t in {_key(t): t for t in outputs}.values())
        low_precision = any(t.dtype in (torch.bfloat16, torch.float16) for t in inputs)
        name = str(packet).removeprefix("aten.")
        record = self.ops.setdefault(
            name, {"calls": 0, "flops": 0, "bytes": 0, **{gpu: 0.0 for gpu in GPUS}}
        )
        record["calls"] += 1
        record["flops"] += flops
        record["bytes"] += moved
        for gpu, peaks in GPUS.items():
            peak = peaks["bf16_tflops" if low_precision else "fp32_tflops"] * 1e12
            record[gpu] += max(flops / peak, moved / (peaks["hbm_tb_s"] * 1e12))


def predict(roofline: Roofline, batch: int) -> dict:
    """The step's predicted seconds and images/s per GPU, totals, and the most expensive ops."""
    ops = roofline.ops
    first = next(iter(GPUS))
    top = sorted(ops.items(), key=lambda item: -item[1][first])[:TOP_OPS]
    per_gpu = {}
    for gpu in GPUS:
        seconds = sum(op[gpu] for op in ops.values())
        per_gpu[gpu] = {"seconds": seconds, "images_per_s": batch / seconds if seconds else 0.0}
    return {
        "flops": sum(op["flops"] for op in ops.values()),
        "bytes": sum(op["bytes"] for op in ops.values()),
        "ops": sum(op["calls"] for op in ops.values()),
        "gpus": per_gpu,
        "top_ops": [{"op": name, **record} for name, record in top],
    }


def report_lines(prediction: dict) -> list[str]:
    """The prediction as the dry run prints it."""
    lines = [
        f"  predicted step (roofline per op at datasheet peaks, a floor): "
        f"{prediction['ops']} ops, {prediction['bytes'] / 1e9:.1f} GB moved"
    ]
    for gpu, p in prediction["gpus"].items():
        peaks = GPUS[gpu]
        lines.append(
            f"    {gpu} ({peaks['bf16_tflops']:.0f} TFLOP/s bf16, {peaks['hbm_tb_s']} TB/s): "
            f"{p['seconds'] * 1e3:.3f} ms/step, {p['images_per_s']:.1f} images/s"
        )
    first = next(iter(GPUS))
    lines.append(f"    the {len(prediction['top_ops'])} most expensive ops ({first} ms):")
    for op in prediction["top_ops"]:
        lines.append(
            f"      {op['op']:<44} {op['calls']:>5} calls {op['flops'] / 1e12:9.2f} TFLOP "
            f"{op['bytes'] / 1e9:8.2f} GB {op[first] * 1e3:8.3f} ms"
        )
    return lines
