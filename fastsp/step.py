"""One training step, as one function of static buffers: eager, or captured as one CUDA graph.

A step (PAPER.md Algorithm 1 for stage 2, the plain MSE loss for stage 1), all on the device:

    randomness   noise, t, CFG-dropout mask and t' drawn from the step's seed (global batch)
    forward      online model under bf16 autocast (fp32 master weights), channels_last
    perceptual   the frozen network (held in bf16) cut at the deepest tap, real + predicted branch
    loss         fastsp.feature_mse (fused Triton kernel on CUDA), accumulated in fp32
    backward     with gradient accumulation over micro-batches (DDP syncs on the last)
    update       global-norm clip; fused AdamW with the learning rate as a device tensor and
                 `found_inf` from the gradient norm (a non-finite step is skipped, no host sync)
    EMA          foreach ops, weight (1 - decay) as a device tensor, 0 on a skipped step
    metrics      device-side sums, read by the trainer only at log intervals

Nothing in `TrainStep.compute` reads a tensor on the host (no `.item()`, no Python branch on a
tensor's value; `tests/test_step.py` runs it under a dispatch mode that fails on any host read),
so on CUDA it is captured once as a CUDA graph and replayed every step. The host only copies the
batch into static buffers, seeds the step's generator and fills the learning-rate and EMA-weight
buffers before each replay. DDP's construction, the warm-up and the capture share one side
stream (`TrainStep.stream`). If capture fails the step runs eagerly and the reason is logged; with
DDP a failed capture stops the run instead (`GraphCaptureError`).

`train_step="reference"` swaps the loss for fastsp.reference's naive one (two full fp32 forwards
of the frozen network with a forward hook, F.mse_loss): the same loop around the oracle.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch

from fastsp.diffusion import NoiseSchedule
from fastsp.errors import GraphCaptureError
from fastsp.flow import FlowProcess
from fastsp.model_guidance import ModelGuidance
from fastsp.objectives import reference_training_loss, training_loss
from fastsp.perceptual import SelfPerceptualLoss

# Eager iterations on a side stream before capture. DDP needs at least 11 (PyTorch's CUDA-graph
# notes: its reducer finishes setting up buckets during the first iterations).
WARMUP_STEPS = 3
WARMUP_STEPS_DDP = 11


def draw_randomness(
    generator: torch.Generator,
    global_batch: int,
    shape: tuple[int, ...],
    schedule: NoiseSchedule | FlowProcess,
    label_dropout: float,
    perceptual_loss: SelfPerceptualLoss | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Noise [B, *shape], t [B], the CFG-dropout mask [B] and t' [B] of one step (global batch)."""
    device = generator.device
    noise = torch.randn((global_batch, *shape), generator=generator, device=device, dtype=dtype)
    t = schedule.sample_timesteps(global_batch, device, generator=generator)
    drop = torch.rand(global_batch, generator=generator, device=device) < label_dropout
    t_prime = perceptual_loss.sample_t_prime(t, generator) if perceptual_loss is not None else None
    return noise, t, drop, t_prime


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step`'s randomness: a function of (seed, step) only, so a resumed or
    re-sharded run draws the same noise."""
    return seed * 1_000_003 + step


def step_randomness(
    seed: int,
    step: int,
    global_batch: int,
    shape: tuple[int, ...],
    schedule: NoiseSchedule | FlowProcess,
    label_dropout: float,
    device: torch.device,
    perceptual_loss: SelfPerceptualLoss | None = None,
    dtype: torch.dtype = torch.float32,
):
    """`draw_randomness` from a fresh generator seeded for (seed, step)."""
    generator = torch.Generator(device=device).manual_seed(step_seed(seed, step))
    return draw_randomness(
        generator, global_batch, shape, schedule, label_dropout, perceptual_loss, dtype
    )


@dataclass(frozen=True)
class StepConfig:
    """What one training step needs besides its modules; `from_train` derives it from a run's
    configs, tests and benchmarks may build it directly."""

    seed: int  # the step's randomness is drawn from (seed, step): see `step_seed`
    global_batch: int  # drawn in full on every rank; each rank trains on its slice
    shape: tuple[int, ...]  # [C, H, W] of x0
    world_size: int = 1
    rank: int = 0  # this rank trains on items [rank * local_batch, (rank + 1) * local_batch)
    num_classes: int = 0  # class labels of the model (0: unconditional or context)
    context_shape: tuple[int, int] | None = None  # [L, D] of the cross-attention context
    label_dropout: float = 0.0  # CFG dropout: the null label (or the null context) this often
    pooled_dim: int = 0  # P of a pooled prompt embedding [P] (SDXL, SD3, Flux; 0: none)
    time_ids: bool = False  # SDXL's added time ids [6] (never dropped)
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 0.0  # max global gradient norm (0: not clipped)
    mse_weight: float = 0.0  # weight of the MSE loss added to the self-perceptual one
    bf16: bool = False  # bf16 autocast of the forwards
    channels_last: bool = False  # memory format of the inputs
    reference_loss: bool = False  # the naive oracle's loss (fastsp.reference) instead
    prediction_type: str = "v"  # the model's parameterisation (the reference loss needs it)
    fsdp: bool = False  # the networks are FSDP2-sharded (fastsp.training.parallel), not DDP

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    @property
    def ddp(self) -> bool:
        return self.world_size > 1 and not self.fsdp

    @classmethod
    def from_train(
        cls,
        cfg,
        model_cfg,
        *,
        world_size: int,
        rank: int,
        bf16: bool,
        context_shape: tuple[int, int] | None = None,
        pooled_dim: int = 0,
        time_ids: bool = False,
    ) -> StepConfig:
        """The step of a run of `cfg` (a TrainConfig) and `model_cfg` (completed from the data);
        `context_shape` is the data set's [L, D] (None without cross-attention), `pooled_dim`
        and `time_ids` its other conditions."""
        return cls(
            seed=cfg.seed,
            global_batch=cfg.batch_size,
            shape=(model_cfg.in_channels, cfg.resolution, cfg.resolution),
            world_size=world_size,
            rank=rank,
            num_classes=model_cfg.num_classes,
            context_shape=tuple(context_shape) if context_shape else None,
            label_dropout=cfg.label_dropout,
            pooled_dim=pooled_dim,
            time_ids=time_ids,
            grad_accum=cfg.grad_accum,
            grad_clip=cfg.grad_clip,
            mse_weight=cfg.mse_weight,
            bf16=bf16,
            channels_last=cfg.channels_last,
            reference_loss=cfg.train_step == "reference",
            prediction_type=cfg.prediction_type,
            fsdp=cfg.parallel == "fsdp",
        )


def uses_bf16(precision: str, train_step: str, device: torch.device) -> bool:
    """The step's precision: bf16 autocast when asked for, or by default for the fast step on
    CUDA (the reference step is the fp32 oracle); fp32 otherwise."""
    return precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and train_step == "fast"
    )


class TrainStep:
    """The training step of `fastsp.training.loop.run_loop`; call `run(batch, step, lr,
    ema_weight)`.

    Args:
        config: the step's settings (`StepConfig.from_train` for a run).
        model: the online model (fp32 master weights); `online` is what is called (the model, or
            its DDP wrapper, or a compiled version of either).
        ema, optimizer: the EMA copy and the optimizer over the model's parameters that require
            gradients (all of them, or the LoRA adapters).
        perceptual_loss: stage 2's loss, None for stage 1.
        model_guidance: the guided target of --objective model_guidance (its guide is `ema`),
            None for the others.
        null_context: [L, D], what CFG dropout puts in place of a dropped item's context: the
            empty prompt's embedding for text-conditioned data (as Stable Diffusion is trained;
            the data set's `null_context`), zeros when None.
        null_pooled: [P], the same for the pooled embedding (the data set's `null_pooled`).
        stream: the CUDA side stream of a step that will be captured (`plan_graph`), the one
            DDP was constructed on when there is DDP; warm-up and capture run on it (see
            `capture`). None for a step that runs eagerly: it runs on the current stream, and
            `capture` makes a stream if asked.
    """

    def __init__(
        self,
        config: StepConfig,
        *,
        model: torch.nn.Module,
        online: torch.nn.Module,
        ema: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: NoiseSchedule | FlowProcess,
        perceptual_loss: SelfPerceptualLoss | None,
        device: torch.device,
        null_context: torch.Tensor | None = None,
        null_pooled: torch.Tensor | None = None,
        stream: torch.cuda.Stream | None = None,
        model_guidance: ModelGuidance | None = None,
    ):
        self.config = config
        self.model_guidance = model_guidance
        # The one side stream of the capture: warm-up and capture run on it, and DDP must have
        # been built on it (`fastsp.training.assembly.assemble` does). None: `capture` makes one.
        self.stream = stream
        self.model, self.online, self.ema, self.optimizer = model, online, ema, optimizer
        self.schedule, self.perceptual_loss, self.device = schedule, perceptual_loss, device
        local_batch, shape = config.local_batch, config.shape
        self.memory_format = memory_format(config.channels_last)
        # The trained parameters: every one, or under LoRA the adapters alone (fastsp.lora)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dtype = self.params[0].dtype  # fp32 master weights (float64 in tests)
        # torch's fused AdamW skips a step on the device (found_inf); any other optimizer (the
        # reference's foreach AdamW, apex FusedAdam) needs the verdict on the host.
        self.host_skip = not optimizer.defaults.get("fused", False)

        # Static input buffers: the host copies each batch into them (a CUDA graph reads fixed
        # addresses).
        self.x0 = torch.zeros((local_batch, *shape), device=device, dtype=self.dtype).contiguous(
            memory_format=self.memory_format
        )
        self.labels = (
            torch.zeros(local_batch, dtype=torch.long, device=device)
            if config.num_classes
            else None
        )
        self.context = (
            torch.zeros((local_batch, *config.context_shape), device=device, dtype=self.dtype)
            if config.context_shape
            else None
        )
        # A static buffer too (a captured graph reads it in place); zeros unless the data set
        # stores an empty-prompt embedding.
        self.null_context = None
        if config.context_shape:
            self.null_context = torch.zeros(config.context_shape, device=device, dtype=self.dtype)
            if null_context is not None:
                if tuple(null_context.shape) != tuple(config.context_shape):
                    raise ValueError(
                        f"null_context has shape {list(null_context.shape)}, the step's context "
                        f"is {list(config.context_shape)} ([L, D])"
                    )
                self.null_context.copy_(null_context)
        # A diffusers family's other conditions (fastsp.families), static buffers alike
        self.pooled = self.null_pooled = self.time_ids = None
        if config.pooled_dim:
            pooled_shape = (local_batch, config.pooled_dim)
            self.pooled = torch.zeros(pooled_shape, device=device, dtype=self.dtype)
            self.null_pooled = torch.zeros(pooled_shape[1:], device=device, dtype=self.dtype)
            if null_pooled is not None:
                self.null_pooled.copy_(null_pooled)
        if config.time_ids:
            self.time_ids = torch.zeros((local_batch, 6), device=device, dtype=self.dtype)
        # Device scalars the host fills before each step: a captured graph reads them in place.
        self.lr = torch.zeros((), device=device)
        self.ema_weight = torch.zeros((), device=device, dtype=self.dtype)
        # The EMA update, ema <- ema + w (model - ema), w = ema_weight or 0 on a skipped step
        # (which leaves ema exact), as three foreach ops: sub, mul_ by w, add_. The forms of
        # `_foreach_lerp_` do not fit: .Scalar reads a 0-d tensor w on the host (`.item()`,
        # which a CUDA graph cannot contain; the capture-safety test catches it), and .List with
        # stride-0 `expand_as` views of w leaves torch's fused multi-tensor path, which needs
        # dense, non-overlapping tensors (ATen's ForeachUtils.h, can_use_fast_route), for one
        # kernel per parameter. `_foreach_mul_.Tensor` takes w as a 0-d device tensor and reads
        # it on the device, on the fused path.
        self.ema_step_weight = torch.zeros((), device=device, dtype=self.dtype)
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        # Under FSDP2 the model and the EMA are sharded alike: the update runs on the local shards
        self.ema_params = [local(p) for name, p in ema.named_parameters() if name in trained]
        self.model_values = [local(p.detach()) for p in self.params]
        # torch's gradient norm and clip run one foreach kernel over plain tensors but a kernel
        # per tensor for types it does not list (foreach=None): fake tensors among them, so the
        # dry run would count a launch per parameter that a GPU never makes. Asked for by name;
        # FSDP2's DTensors keep the per-tensor path torch picks for them.
        self.foreach_norm = not any(is_dtensor(p) for p in self.params)
        self.force_skip = torch.zeros((), dtype=torch.bool, device=device)  # warm-up: no update
        self.found_inf = torch.zeros((), device=device)
        self.generator = torch.Generator(device=device)
        if not self.host_skip:
            # Fused AdamW takes the learning rate as a device tensor and skips the update where
            # found_inf is 1.
            for group in optimizer.param_groups:
                group["lr"] = self.lr
            optimizer.found_inf = self.found_inf
        # Device-side sums since the last log (read and zeroed by the trainer).
        # fp32 sums (float64 for a float64 model, so tests can compare to 1e-12).
        self.metric_dtype = torch.promote_types(self.dtype, torch.float32)
        self.loss_sum = torch.zeros((), device=device, dtype=self.metric_dtype)
        self.grad_norm_sum = torch.zeros((), device=device, dtype=self.metric_dtype)
        self.good_steps = torch.zeros((), device=device)
        self.bad_in_a_row = torch.zeros((), dtype=torch.long, device=device)
        # The longest run of consecutive non-finite steps since the last log: a run of K that
        # ends between two logs must still stop training, though the trainer reads only then.
        self.worst_bad_in_a_row = torch.zeros((), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None

    # ---- the step ------------------------------------------------------------------------------
    def compute(self, zero_grad: bool = True) -> None:
        """One step from the static buffers. No host reads: capturable as one CUDA graph."""
        noise, t, drop, t_prime = draw_randomness(
            self.generator,
            self.config.global_batch,
            self.config.shape,
            self.schedule,
            self.config.label_dropout,
            self.perceptual_loss,
            self.dtype,
        )
        mine = slice(
            self.config.rank * self.config.local_batch,
            (self.config.rank + 1) * self.config.local_batch,
        )
        noise, t, drop = noise[mine], t[mine], drop[mine]
        noise = noise.contiguous(memory_format=self.memory_format)
        t_prime = t_prime[mine] if t_prime is not None else None
        labels, context = self.labels, self.context
        if labels is not None:  # classifier-free guidance dropout: the null label is num_classes
            labels = torch.where(drop, self.config.num_classes, labels)
        if context is not None:  # a dropped item's context is the null context, row for row
            context = torch.where(drop[:, None, None], self.null_context, context)
        extra = {}  # a diffusers family's: the pooled embedding dropped with the context
        if self.pooled is not None:
            extra["pooled"] = torch.where(drop[:, None], self.null_pooled, self.pooled)
        if self.time_ids is not None:
            extra["time_ids"] = self.time_ids

        micro_batch = self.config.local_batch // self.config.grad_accum
        step_loss = torch.zeros((), device=self.device, dtype=self.metric_dtype)
        for micro in range(self.config.grad_accum):
            part = slice(micro * micro_batch, (micro + 1) * micro_batch)
            last = micro == self.config.grad_accum - 1
            sync = (
                contextlib.nullcontext() if last or not self.config.ddp else self.online.no_sync()
            )
            if self.config.fsdp:  # FSDP2's reduce-scatter on the last micro-step only
                self.online.set_requires_gradient_sync(last)
            cond = {
                "labels": labels[part] if labels is not None else None,
                "context": context[part] if context is not None else None,
                **{name: value[part] for name, value in extra.items()},
            }
            guidance = {}  # model guidance: the null condition and the rows dropout kept
            if self.model_guidance is not None:
                null_cond = self.null_condition(micro_batch, cond)
                guidance = {"null_cond": null_cond, "guided": ~drop[part]}
            # cache_enabled=False: autocast's cache of cast weights must not outlive a captured
            # region (PyTorch's CUDA-graph notes); each weight is cast once per step anyway.
            autocast = torch.autocast(
                self.device.type, torch.bfloat16, enabled=self.config.bf16, cache_enabled=False
            )
            with sync, autocast:
                micro_t_prime = t_prime[part] if t_prime is not None else None
                if self.config.reference_loss:
                    loss = reference_training_loss(
                        self.online,
                        self.schedule,
                        self.x0[part],
                        noise[part],
                        t[part],
                        cond,
                        self.perceptual_loss,
                        micro_t_prime,
                        self.config.prediction_type,
                        self.model_guidance,
                        **guidance,
                    )
                else:
                    loss = training_loss(
                        self.online,
                        self.schedule,
                        self.x0[part],
                        noise[part],
                        t[part],
                        cond,
                        self.perceptual_loss,
                        micro_t_prime,
                        self.config.mse_weight,
                        self.model_guidance,
                        **guidance,
                    )
                (loss / self.config.grad_accum).backward()
            step_loss += loss.detach().to(self.metric_dtype) / self.config.grad_accum

        # The update is skipped on the device when the (all-reduced, so identical on every rank)
        # gradient norm is not finite: fused AdamW reads `found_inf` and leaves parameters,
        # moments and its step count alone; the EMA moves by a zero weight.
        if self.config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.params, self.config.grad_clip, foreach=self.foreach_norm or None
            )
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None],
                foreach=self.foreach_norm or None,
            )
        if is_dtensor(grad_norm):  # FSDP2: all-reduced already, read on every rank
            grad_norm = grad_norm.full_tensor()
        finite = torch.isfinite(grad_norm) & ~self.force_skip
        if self.host_skip:
            if finite.item():  # no found_inf input: one host sync per step
                self.optimizer.step()
        else:
            self.found_inf.copy_(~finite)
            self.optimizer.step()
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch.mul(self.ema_weight, finite, out=self.ema_step_weight)
            self.update_ema()
        self.loss_sum += torch.where(finite, step_loss, 0.0)
        self.grad_norm_sum += torch.where(finite, grad_norm.to(self.metric_dtype), 0.0)
        self.good_steps += finite
        self.bad_in_a_row.copy_(torch.where(finite, 0, self.bad_in_a_row + 1))
        torch.maximum(self.worst_bad_in_a_row, self.bad_in_a_row, out=self.worst_bad_in_a_row)

    def null_condition(self, batch: int, cond: dict) -> dict[str, torch.Tensor | None]:
        """The condition CFG dropout gives `batch` dropped rows of `cond`: null labels, null
        context, the null pooled embedding; SDXL's time ids are never dropped."""
        null = dict(cond, labels=None, context=None)
        if self.labels is not None:
            null["labels"] = torch.full_like(self.labels[:batch], self.config.num_classes)
        if self.context is not None:
            null["context"] = self.null_context.expand(batch, *self.null_context.shape)
        if self.pooled is not None:
            null["pooled"] = self.null_pooled.expand(batch, *self.null_pooled.shape)
        return null

    def update_ema(self) -> None:
        """ema <- ema + ema_step_weight (model - ema), on the fused foreach path (see __init__).
        One temporary the size of the model, freed at once."""
        step = torch._foreach_sub(self.model_values, self.ema_params)
        torch._foreach_mul_(step, self.ema_step_weight)
        torch._foreach_add_(self.ema_params, step)

    # ---- host side -----------------------------------------------------------------------------
    def load(self, batch: dict[str, torch.Tensor], step: int, lr: float, ema_weight: float) -> None:
        """Copy the batch into the static buffers and set the step's seed, lr and EMA weight."""
        self.x0.copy_(batch["x"], non_blocking=True)
        if self.labels is not None:
            self.labels.copy_(batch["label"], non_blocking=True)
        if self.context is not None:
            self.context.copy_(batch["context"], non_blocking=True)
        for name, buffer in (("pooled", self.pooled), ("time_ids", self.time_ids)):
            if buffer is not None:
                buffer.copy_(batch[name], non_blocking=True)
        self.generator.manual_seed(step_seed(self.config.seed, step))
        if self.host_skip:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        else:
            self.lr.fill_(lr)
        self.ema_weight.fill_(ema_weight)

    def run(self, batch: dict[str, torch.Tensor], step: int, lr: float, ema_weight: float) -> None:
        """Train on `batch` as step number `step` (replaying the CUDA graph when captured)."""
        self.load(batch, step, lr, ema_weight)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.compute()

    def reset_metrics(self) -> None:
        for accumulator in (self.loss_sum, self.grad_norm_sum, self.good_steps):
            accumulator.zero_()
        # A run still going on carries over: the next window's maximum starts from it.
        self.worst_bad_in_a_row.copy_(self.bad_in_a_row)

    def capture(self, batch: dict[str, torch.Tensor], log=print) -> bool:
        """Capture `compute` as one CUDA graph; on failure keep running eagerly and log why, or,
        with DDP, raise GraphCaptureError. Whether to capture is `plan_graph`'s answer, asked
        before the step is built (it decides the stream DDP is built on): call this only where
        that plan says `captured`.

        Warm-up runs on a side stream (PyTorch's CUDA-graph recipe) with every update forced off
        (found_inf = 1, EMA weight 0), so warming up leaves weights, moments and EMA untouched.
        DDP's construction, the warm-up and the capture use one stream, `self.stream`: DDP's
        reducer keeps the AccumulateGrad nodes of its parameters, each tied to the stream it was
        created on, and `torch.cuda.graph` captures on a stream of its own unless given one, so
        three streams would leave a captured backward waiting on a stream outside the capture
        (torch warns of this mismatch; full-step captures fail from it).
        """
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        side = self.stream
        try:
            self.load(batch, 0, 0.0, 0.0)
            self.force_skip.fill_(True)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS_DDP if self.config.ddp else WARMUP_STEPS):
                    self.compute()
            torch.cuda.current_stream().wait_stream(side)
            self.optimizer.zero_grad(set_to_none=True)  # backward in the graph allocates them
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.generator)
            # thread_local: the data loader's pin-memory thread may call CUDA during capture.
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self.compute(zero_grad=False)
            self.graph = graph
        except RuntimeError as error:  # capture is best effort: the eager step is the same step
            self.graph = None
            self.graph_error = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self.optimizer.zero_grad(set_to_none=True)
            if self.config.ddp:
                why = self.graph_error or type(error).__name__
                raise GraphCaptureError(
                    f"CUDA graph capture of the DDP step failed ({why}); with DDP a failed capture "
                    "can leave the gradient reducer half-way, so the run stops instead of stepping "
                    "eagerly. Rerun with --no-cuda-graph"
                ) from error
            log(f"CUDA graph: capture failed ({self.graph_error}); running the step eagerly")
        finally:
            self.force_skip.fill_(False)
            self.bad_in_a_row.zero_()  # the forced skips of the warm-up are not real ones
            self.reset_metrics()
        if self.graph is not None:
            log("CUDA graph: the whole step is captured and replayed")
        return self.graph is not None


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (a view: in-place updates reach it), or the
    tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is an FSDP2 DTensor. The check never imports torch.distributed.tensor:
    a DTensor exists only once FSDP2 has imported it, and that import pulls in sympy, a cost
    every process start (the trainer, each test's subprocess) would otherwise pay."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def memory_format(channels_last: bool) -> torch.memory_format:
    """The memory format of the networks and their inputs (--channels-last)."""
    return torch.channels_last if channels_last else torch.contiguous_format
