"""A fake-CUDA dry run of one whole training step, on a CPU-only torch.

    python -m fastsp.dryrun --preset sd21 --objective self_perceptual --batch-size 16
    python -m fastsp.dryrun --preset tiny --json dryrun.json     # every option of fastsp/train.py

Runs `TrainStep.compute` (fastsp.step), built through the same StepConfig as a training run:
randomness, online forward under bf16 autocast, the bf16 perceptual pass, the fused feature MSE
(through its registered fake implementation), backward, clipping, fused AdamW and the EMA, on
FakeTensorMode tensors that say device "cuda". Nothing is read: random weights for every network
(no --init, no checkpoint), one synthetic batch of the configured shape (--channels,
--resolution, --context-len), so a user learns whether a config fits a GPU before getting one.

It prints, for the self-perceptual and the MSE step of the config (the objective asked for, and
the other one for the ratio):
  - any fault a GPU would raise, as one line naming the op, devices and dtypes (exit 1): a CPU
    tensor in a CUDA op, a host read (.item(), bool(), a device-to-host copy), operands of
    different dtypes in a matmul, convolution or attention (what autocast must prevent), the
    fused AdamW kernel's device, dtype and layout checks (fake_fused_adamw);
  - the FLOPs of one step (torch.utils.flop_counter's formulas, per op, as its FlopCounterMode
    counts them: matmuls, convolutions, attention; elementwise work, the MSE and the optimizer
    are not counted);
  - the peak of live tensor memory over the step (LiveMemory);
  - the self-perceptual / MSE FLOP ratio, and the images/s that 40% model FLOPs utilisation
    would give on an H100 SXM and an H200 SXM (dense bf16 peaks from NVIDIA's datasheets);
  - a predicted step time and images/s on both (fastsp.roofline: each op's FLOPs and bytes at
    the datasheet's FLOP/s and HBM bandwidth, summed: a floor), with the ten costliest ops.
An error of the dry run itself (a bug in fastsp, not an op the step's GPU would refuse) prints
its traceback and exits EXIT_INTERNAL_ERROR, never as a fault.
With --parallel fsdp --dry-world-size N it runs rank 0 of N under FSDP2 (fastsp.dryrun_parallel).
It cannot measure kernel time, numerics, the CUDA caching allocator's overhead above live
tensors, communication, DDP (a DDP rank holds what one process does), torch.compile (the eager
step runs) or xformers (SDPA's flash-attention op stands in: same FLOPs).

How: fastsp.fake_cuda registers fake CUDA before torch is imported, which is why importing this
module registers it in the whole process (run it as its own process; the tests do). The step is
the trainer's own: planned by fastsp.training.plan.plan_run and built by
fastsp.training.assembly.assemble with `on_meta=True` (networks built on the meta device, bf16
and channels_last applied there, then materialised with `to_empty(device="cuda")` inside the
fake mode); the plan, with its noise schedule, is made outside it (it branches on tensor
values). Autocast("cuda") turns itself off without CUDA, so the dry run tells it that CUDA and
bf16 are there (`cuda_autocast_on`). SDPA is routed to the flash-attention aten op
(`FlashSDPA`), so that FLOPs and memory are those of the GPU path, not of its math fallback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fastsp.fake_cuda import load_fake_cuda

load_fake_cuda()

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._prims_common import is_non_overlapping_and_dense_or_false  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from fastsp import config_cli, dist  # noqa: E402
from fastsp.checkpoint import atomic_write_text  # noqa: E402
from fastsp.cli import run_command  # noqa: E402
from fastsp.config_fields import with_objective  # noqa: E402
from fastsp.data_stream import make_loader  # noqa: E402
from fastsp.dryrun_memory import LiveMemory, storage_resizes  # noqa: E402
from fastsp.dryrun_parallel import check_world_size, fake_ranks, pop_world_size  # noqa: E402
from fastsp.errors import ConfigError, DryRunFault, ExpectedStop  # noqa: E402
from fastsp.roofline import GPUS, Roofline, predict, report_lines  # noqa: E402
from fastsp.run_folder import check_output_file  # noqa: E402
from fastsp.step import TrainStep  # noqa: E402
from fastsp.training.assembly import assemble  # noqa: E402
from fastsp.training.loop import ema_decay, learning_rate  # noqa: E402
from fastsp.training.plan import Plan, plan_run  # noqa: E402

DEVICE = torch.device("cuda")  # what fastsp.dist.pick_device gives a one-GPU run
# A bug of fastsp met by the dry run (BSD's EX_SOFTWARE): not EXIT_FAULT, a fault of the step.
EXIT_INTERNAL_ERROR = 70
GIB = 2**30
# Library code, left out of a fault's location: torch's package and the standard library.
_LIBRARY_DIRS = (str(Path(torch.__file__).parent), str(Path(os.__file__).parent))
MFU = 0.4
OBJECTIVES = ("self_perceptual", "mse")
# --init is required for self_perceptual (stage 2 starts from a stage-1 model); the dry run reads
# no weights, so a placeholder stands in when none is given.
RANDOM_WEIGHTS = "(dry run: random weights)"


# ---- what fake tensors do not check: dtypes, host reads, the fused AdamW kernel -----------------
# Ops whose CUDA kernels need every floating operand in one dtype (autocast's job). The fake
# (meta) kernels of these ops accept mixed dtypes, so the dry run checks them itself.
_SAME_DTYPE_OPS = {
    torch.ops.aten.convolution.default,
    torch.ops.aten.convolution_backward.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
}


def _tensors(args, kwargs) -> list[torch.Tensor]:
    return [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]


def _ours(frame: traceback.FrameSummary) -> bool:
    """A frame of the step's own code: not torch, not the standard library, not this module."""
    name = frame.filename
    return not (
        name.startswith(_LIBRARY_DIRS) or name.startswith("<") or name.endswith("dryrun.py")
    )


def _location(frames: list[traceback.FrameSummary]) -> str:
    """The innermost frame of the step's own code, as ' at file:line'."""
    ours = [f for f in frames if _ours(f)]
    return f" at {Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else ""


def _where() -> str:
    return _location(traceback.extract_stack())


def _describe(tensors: list[torch.Tensor]) -> str:
    return ", ".join(f"{t.device} {str(t.dtype).removeprefix('torch.')}" for t in tensors)


class StepChecks(TorchDispatchMode):
    """Faults a CUDA run hits that fake tensors let through: operands of different dtypes in
    `_SAME_DTYPE_OPS`; in a step to be captured as a CUDA graph, a host read (`.item()`, `bool()`,
    `float()` of a CUDA tensor: `aten._local_scalar_dense`) or a device-to-host copy, syncs no
    graph can hold; and in the step after the first (the one a run captures: the first fills the
    device tables) a host-to-device copy, whose value a graph would freeze. An eager step (the
    reference step, --no-cuda-graph) may sync: its host reads are counted and read as 1 (fake
    tensors hold no value), so `if finite.item():` takes the path of a good step."""

    def __init__(self, *observers):
        super().__init__()
        self.captured = True  # the plan's answer (fastsp.training.graph_plan.plan_graph)
        self.replayed = False  # inside the measured step: what a captured graph would replay
        self.host_syncs = 0
        # What sees every op's outputs (LiveMemory, Roofline), from inside this one mode: each
        # Python dispatch mode on the stack costs every op another round trip through Python.
        self.observers = list(observers)

    def _sync(self, what: str) -> None:
        if self.captured:
            raise DryRunFault(f"{what}: a device sync that a CUDA graph cannot capture{_where()}")
        self.host_syncs += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.prim.device.default:
            # a fake tensor's .device, which C++ code asks of the operands of nearly every op
            # (fake tensors answer it in Python): neither a fault nor memory nor FLOPs
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        inputs = _tensors(args, kwargs)
        on_cuda = [t for t in inputs if t.device.type == "cuda"]
        if func in _SAME_DTYPE_OPS:
            floating = [t for t in inputs if t.is_floating_point()]
            if len({t.dtype for t in floating}) > 1:
                raise DryRunFault(
                    f"{func} got operands of different dtypes ({_describe(floating)}): the CUDA "
                    f"kernel refuses them; the op must run under autocast or on one dtype"
                    f"{_where()}"
                )
        if on_cuda and func in (
            torch.ops.aten._local_scalar_dense.default,
            torch.ops.aten.equal.default,
        ):
            self._sync(
                f"host read of a CUDA tensor ({func}, from .item(), bool(), float() or a Python "
                f"branch on a tensor's value) on {_describe(on_cuda)}"
            )
            return (
                True if func is torch.ops.aten.equal.default or inputs[0].dtype == torch.bool else 1
            )
        if (
            self.replayed
            and self.captured
            and func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
        ):
            source = inputs[-1] if func is torch.ops.aten.copy_.default else inputs[0]
            target = inputs[0] if func is torch.ops.aten.copy_.default else kwargs.get("device")
            to_cuda = (
                target is not None
                and torch.device(target.device if isinstance(target, torch.Tensor) else target).type
                == "cuda"
            )
            if source.device.type == "cpu" and to_cuda:
                raise DryRunFault(
                    f"host-to-device copy inside the step ({func} of a cpu "
                    f"{str(source.dtype).removeprefix('torch.')} {list(source.shape)} tensor): a "
                    "captured graph replays the value copied at capture; keep it in a device "
                    f"buffer filled before the step{_where()}"
                )
        out = func(*args, **kwargs)
        if on_cuda and any(
            isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves(out)
        ):
            self._sync(f"device-to-host copy in the step ({func} of {_describe(on_cuda)} to cpu)")
        for observer in self.observers:
            observer.observe(func, args, kwargs, out)
        return out


def _strides(t: torch.Tensor) -> list[int]:
    """Strides of the dims of size > 1. The CUDA kernel compares all strides, but the fake
    convolution backward makes a weight gradient as `.to(channels_last)` of a contiguous tensor,
    a no-op where size-1 dims (a 1x1 kernel) make both formats one, while cuDNN allocates it with
    channels_last strides in every dim, as the parameter has them: differences in size-1 dims
    are the fake kernels', not the GPU's (so a real one, pytorch#106951, goes unseen)."""
    return [stride for size, stride in zip(t.shape, t.stride(), strict=True) if size > 1]


def fake_fused_adamw(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    *,
    lr,
    beta1,
    beta2,
    weight_decay,
    eps,
    amsgrad,
    maximize,
    grad_scale=None,
    found_inf=None,
):
    """`aten::_fused_adamw_.tensor_lr` on fake tensors: the checks of the CUDA kernel
    (ATen's native/cuda/FusedAdamWKernel.cu and ForeachUtils.h check_fast_path_restrictions), and
    nothing else (fake tensors hold no values to update)."""
    if not params:
        return
    device = params[0].device
    if lr.device.type == "cpu":
        # The CUDA kernel then reads lr with lr.item(): a host sync, outside any CUDA graph.
        raise DryRunFault(
            f"fused AdamW got a CPU learning-rate tensor with {device} params: its CUDA kernel "
            "reads it with lr.item(), a host sync that a captured step cannot contain; keep lr "
            f"a 0-d tensor on the params' device{_where()}"
        )
    for name, tensor in (("grad_scale", grad_scale), ("found_inf", found_inf), ("lr", lr)):
        if tensor is not None and tensor.device != device:
            raise DryRunFault(
                f"fused AdamW: {name} on {tensor.device} must be on the params' device {device}"
            )
        if tensor is not None and tensor.dtype != torch.float32:
            raise DryRunFault(
                f"fused AdamW: {name} is {tensor.dtype}; the CUDA kernel reads it as float32"
            )
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    names = ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]
    mixed = params[0].dtype != exp_avgs[0].dtype  # the kernel's mixed-precision mode
    for name, tensors in zip(names, lists, strict=False):
        if len(tensors) != len(params):
            raise DryRunFault(f"fused AdamW: {len(tensors)} {name} for {len(params)} params")
        for i, t in enumerate(tensors):
            reference = params[i] if mixed else params[0]
            problem = (
                "is not on the params' device"
                if t.device != device
                else f"is {t.dtype}, not {reference.dtype}"
                if t.dtype != reference.dtype and not (mixed and name != "params")
                else "is not strided"
                if t.layout != torch.strided
                else "is not non-overlapping and dense"
                if not is_non_overlapping_and_dense_or_false(t)
                else f"has sizes {list(t.shape)} / strides {list(t.stride())}, params[{i}] "
                f"{list(params[i].shape)} / {list(params[i].stride())}"
                if t.shape != params[i].shape or _strides(t) != _strides(params[i])
                else ""
            )
            if problem:
                raise DryRunFault(
                    f"fused AdamW: {name}[{i}] ({t.device} {t.dtype}) {problem}: the CUDA kernel "
                    "needs params, grads, exp_avgs and exp_avg_sqs of one dtype, device, layout "
                    "and stride"
                )
    for i, step in enumerate(state_steps):
        if step.device != device or step.dtype != torch.float32:
            raise DryRunFault(
                f"fused AdamW: state_steps[{i}] is {step.device} {step.dtype}; the CUDA kernel "
                f"reads float32 step counts on the params' device {device} (capturable=True)"
            )


torch.library.register_fake("aten::_fused_adamw_.tensor_lr")(fake_fused_adamw)


class FlashSDPA(TorchFunctionMode):
    """F.scaled_dot_product_attention as a GPU runs it for the models' attention (no mask, no
    dropout): the flash-attention aten op where its kernels apply, else the memory-efficient one.
    Without this the fake CUDA call would decompose into the math path, whose FLOPs and [L, L]
    score matrices are not what a GPU runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        options = {**dict(zip(names, args, strict=False)), **kwargs}  # diffusers: keywords
        q, k, v = options["query"], options["key"], options["value"]
        if torch.is_autocast_enabled("cuda"):  # what autocast does to SDPA's inputs on a GPU
            q, k, v = (x.to(torch.get_autocast_dtype("cuda")) for x in (q, k, v))
        if options.get("attn_mask") is not None or options.get("dropout_p", 0.0) != 0.0:
            return func(*args, **kwargs)
        scale, causal = options.get("scale"), bool(options.get("is_causal", False))
        head_dim = q.shape[-1]  # flash attention's kernels: fp16/bf16, D a multiple of 8 to 256
        if q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, causal, False, scale=scale
            )[0]
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, needs_grad, 0.0, causal, scale=scale
        )[0]


@contextlib.contextmanager
def cuda_autocast_on():
    """torch.autocast("cuda") disables itself where torch.cuda.is_available() is False
    (torch.cuda.amp.common.amp_definitely_not_available) and asks torch.cuda.is_bf16_supported():
    tell it the dry run's GPU is there and has bf16 (H100, H200), leaving is_available() False."""
    common = torch.cuda.amp.common
    saved = common.amp_definitely_not_available, torch.cuda.is_bf16_supported
    common.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda including_emulation=True: True
    try:
        yield
    finally:
        common.amp_definitely_not_available, torch.cuda.is_bf16_supported = saved


# ---- building the step: the trainer's own plan and assembly, on fake CUDA, reading nothing ----
def dry_configs(argv: list[str] | None):
    """parse_args of fastsp/train.py's options; --init is optional (no weights are read)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--init" or a.startswith("--init=") for a in argv):
        argv += ["--init", RANDOM_WEIGHTS]
    command = (
        "python -m fastsp.dryrun",
        "Dry-run one training step of this run on fake CUDA: what a GPU would reject, FLOPs and "
        "memory. Takes fastsp/train.py's options (--init optional: random weights).",
    )
    return config_cli.parse_args(argv, command)


def dry_plan(cfg, model_cfg, world_size: int = 1) -> Plan:
    """The plan of rank 0 of `world_size` on CUDA (fastsp.training.plan.plan_run, every refusal
    of a run) with one synthetic data set of the configured shape (--channels, --resolution,
    --context-len), and no weights, checkpoints or run folder read."""
    synthetic = dataclasses.replace(cfg, data="synthetic", data_format="auto", device="auto")
    return plan_run(
        synthetic, model_cfg, world_size=world_size, device_type="cuda", read_sources=False
    )


def build_step(plan: Plan, step_class: type[TrainStep] = TrainStep):
    """(run, batch): the run of `plan` as the trainer assembles it
    (fastsp.training.assembly.assemble), its networks built on the meta device and materialised
    on fake CUDA with random weights, and the data set's first batch. Call inside
    FakeTensorMode."""
    info = dist.DistInfo(0, plan.world_size, 0, DEVICE)
    run = assemble(plan, info, on_meta=True, step_class=step_class)
    with torch._subclasses.fake_tensor.unset_fake_temporarily():  # real CPU tensors, as loaded
        cfg = plan.cfg
        loader = make_loader(plan.dataset, cfg.batch_size, 0, plan.world_size, cfg.seed)
        batch = next(iter(loader))  # rank 0's
    return run, batch


def _fault_line(error: BaseException) -> str:
    """One line for a fault: the dry run's own message, or the op error fake tensors raised."""
    if isinstance(error, DryRunFault):
        return str(error)
    text = " ".join(str(error).split())
    where = _location(traceback.extract_tb(error.__traceback__))
    if type(error).__name__ == "FakeTensorDeviceMismatchError":
        return f"a CPU tensor in a CUDA op: {text}{where}"
    if "should be the same" in text and "type" in text:  # a convolution's dtype check
        return f"operands of different dtypes (does the op run under autocast?): {text}{where}"
    if type(error).__name__ == "DataDependentOutputException":
        return f"host read of a CUDA tensor ({text}): a device sync{where}"
    return f"{type(error).__name__}: {text}{where}"


def dry_step(cfg, model_cfg, step_class: type[TrainStep] = TrainStep, world_size: int = 1) -> dict:
    """Build the step of (cfg, model_cfg) on fake CUDA and run it twice, as a run does before
    capture (the first step fills the schedule's device tables and creates the optimizer's
    state); the second is measured, as rank 0 of `world_size` (fastsp.dryrun_parallel: the
    caller's fake process group). Returns its figures.

    What the step's ops raise on fake CUDA (a RuntimeError: a device or dtype mismatch, a host
    read) is a fault a GPU would raise: DryRunFault. Anything else (building the step, or an
    exception of another kind) is a bug of fastsp and propagates as it is."""
    # outside the fake mode: the schedule branches on values
    plan = dry_plan(cfg, model_cfg, world_size)
    memory, roofline = LiveMemory(), Roofline()
    checks = StepChecks(memory)
    checks.captured = plan.graph.captured
    fake = FakeTensorMode(allow_non_fake_inputs=True)  # the CPU batch and tables come in
    started = time.perf_counter()
    resizes = storage_resizes(memory.resized)  # FSDP2 frees unsharded blocks by resizing
    with cuda_autocast_on(), fake, resizes, checks, FlashSDPA():
        run, batch = build_step(plan, step_class)
        step = run.step
        lr, ema_weight = learning_rate(plan.cfg, 0), 1.0 - ema_decay(plan.cfg, 0)
        try:
            step.run(batch, 0, lr, ema_weight)
            memory.reset_peak()
            state = memory.live  # what outlives a step: weights, EMA, optimizer state, buffers
            checks.host_syncs = 0
            checks.observers.append(roofline)  # the measured step's FLOPs and bytes, per op
            step.load(batch, 1, lr, ema_weight)  # what TrainStep.run does: load, then the
            checks.replayed = True  # step (replayed as a graph when captured)
            step.compute()
            checks.replayed = False
        except ExpectedStop:
            raise
        except RuntimeError as error:  # an op the GPU would refuse (torch's op errors)
            raise DryRunFault(_fault_line(error)) from error
    # FLOPs by torch.utils.flop_counter's formulas (Roofline applies them op by op)
    by_op = {name: op["flops"] for name, op in roofline.ops.items() if op["flops"]}
    return {
        "objective": cfg.objective,
        "world_size": world_size,
        "flops": sum(by_op.values()),
        "flops_by_op": by_op,
        "peak_bytes": memory.peak,
        "predicted": predict(roofline, cfg.batch_size // world_size),  # per GPU
        "state_bytes": state,
        "parameters": sum(p.numel() for p in step.params),
        "cpu_seconds": time.perf_counter() - started,
        "model": dataclasses.asdict(plan.model_cfg),
        "graph": list(plan.graph.reasons),
        "host_syncs": checks.host_syncs,
        "bf16": step.config.bf16,
    }


def at_mfu(flops_per_step: float, batch: int) -> dict[str, float]:
    """Images/s at MFU x each GPU's dense bf16 peak: batch / (FLOPs / (MFU x peak))."""
    return {
        name: batch * MFU * gpu["bf16_tflops"] * 1e12 / flops_per_step for name, gpu in GPUS.items()
    }


def dry_run(cfg, model_cfg, step_class: type[TrainStep] = TrainStep, world_size: int = 1) -> dict:
    """The dry run of `cfg`'s step and of the other objective's (for the ratio), as rank 0 of
    `world_size`: its figures."""
    runs = {}
    for objective in (cfg.objective, *(o for o in OBJECTIVES if o != cfg.objective)):
        runs[objective] = dry_step(
            with_objective(cfg, objective), model_cfg, step_class, world_size
        )
    asked = runs[cfg.objective]
    return {
        "torch": torch.__version__,
        "preset": cfg.preset,
        "objective": cfg.objective,
        "batch_size": cfg.batch_size,
        "world_size": world_size,
        "parallel": cfg.parallel,
        "resolution": cfg.resolution,
        "channels": asked["model"]["in_channels"],
        "steps": runs,
        "sp_mse_flop_ratio": runs["self_perceptual"]["flops"] / runs["mse"]["flops"],
        "mfu": MFU,
        "gpus": GPUS,
        "images_per_s": at_mfu(asked["flops"], cfg.batch_size // world_size),  # per GPU
    }


def _flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f} FLOP"


def report(result: dict) -> str:
    """The dry run's figures as the lines it prints."""
    asked = result["steps"][result["objective"]]
    side = result["resolution"]
    lines = [
        f"dry run (fake CUDA, torch {result['torch']}): --preset {result['preset']}, batch "
        f"{result['batch_size']} of {result['channels']}x{side}x{side}, "
        + ("bf16 autocast" if asked["bf16"] else "fp32")
        + (
            f"; rank 0 of {result['world_size']} under FSDP2"
            if result["parallel"] == "fsdp"
            else ""
        )
    ]
    for objective, step in result["steps"].items():
        lines.append(
            f"  {objective:<16} {_flops(step['flops']):>14} per step   peak live tensors "
            f"{step['peak_bytes'] / GIB:8.3f} GiB (state {step['state_bytes'] / GIB:.3f})   "
            f"{step['cpu_seconds']:.0f} s on this CPU"
        )
    lines.append(f"  self-perceptual / MSE FLOP ratio: {result['sp_mse_flop_ratio']:.3f}")
    for name, rate in result["images_per_s"].items():
        gpu = GPUS[name]
        fits = asked["peak_bytes"] <= gpu["memory_gb"] * 1e9
        lines.append(
            f"  {name} ({gpu['bf16_tflops']:.0f} TFLOP/s dense bf16, {gpu['memory_gb']} GB): "
            f"{rate:.1f} images/s at {MFU:.0%} MFU ({result['objective']}"
            + ("" if asked["bf16"] else "; an fp32 step: this peak overstates it")
            + "); its live tensors "
            + ("fit" if fits else "do NOT fit")
        )
    lines.extend(report_lines(asked["predicted"]))
    graph = asked["graph"]
    lines.append(
        "  CUDA graph: would capture the step"
        if not graph
        else f"  CUDA graph: off ({'; '.join(graph)}); host syncs per step: {asked['host_syncs']}"
    )
    lines.append(
        "  not checked: measured kernel time, numerics, allocator overhead, communication, DDP, "
        "torch.compile, xformers"
    )
    return "\n".join(lines)


def check_torch() -> None:
    """A CUDA build of torch has no fake CUDA (see load_fake_cuda): it needs its GPU."""
    if torch.backends.cuda.is_built() and not torch.cuda.is_available():
        raise ConfigError(
            f"this torch ({torch.__version__}) is built for CUDA but sees no GPU, and the dry "
            "run's fake CUDA needs a CPU-only build: run it in an environment with the CPU wheel "
            "(pip install torch --index-url https://download.pytorch.org/whl/cpu), or on a GPU"
        )


def run(cfg, model_cfg, json_path: str | None = None, dry_world_size: str | None = None) -> None:
    world_size = check_world_size(cfg.parallel, dry_world_size)
    if json_path:
        check_output_file(json_path, "--json")  # before the step is traced
    check_torch()
    if cfg.compile:
        print("note: --compile is not traced by the dry run; it runs the eager step")
    if cfg.device == "cpu":
        print("note: the dry run checks the CUDA step; --device cpu is ignored")
    backend = model_cfg.attention_backend  # xformers cannot run fake tensors; SDPA's flash op
    backend = "sdpa" if backend in ("auto", "xformers") else backend  # stands in (same FLOPs)
    model_cfg = dataclasses.replace(model_cfg, attention_backend=backend)
    with fake_ranks(world_size) if cfg.parallel == "fsdp" else contextlib.nullcontext():
        result = dry_run(dataclasses.replace(cfg, compile=False), model_cfg, world_size=world_size)
    print(report(result))
    if json_path:
        atomic_write_text(Path(json_path), json.dumps(result, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    json_path = None
    if "--json" in argv:  # the dry run's own option; the rest are fastsp/train.py's
        at = argv.index("--json")
        if at + 1 >= len(argv):
            print("error: --json needs a file path", file=sys.stderr)
            return 2
        json_path = argv[at + 1]
        del argv[at : at + 2]
    world_size = pop_world_size(argv)  # the dry run's own option too
    train_config, model_config = dry_configs(argv)
    try:
        return run_command(
            run, train_config, model_config, json_path, world_size, rerun="rerun the dry run"
        )
    except Exception:  # noqa: BLE001 (not an expected stop, so not a fault of the step: a bug)
        traceback.print_exc()
        print(
            "internal error of the dry run (a bug in fastsp, not a fault a GPU would raise); "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
