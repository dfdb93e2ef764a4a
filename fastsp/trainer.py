"""The training loop: `train(train_config, model_config)`, read top to bottom.

Determinism across world sizes: the data stream (fastsp.data.ShardedBatchSampler) and the noise,
timesteps and label dropout of a step are functions of (seed, step) over the *global* batch; each
rank takes its contiguous slice. With equal-size micro-batches the mean of the ranks' mean losses
is the global mean, so N processes compute the same update as one process with the same global
batch (up to float summation order).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastsp import checkpoint as checkpoint_lib
from fastsp import config as config_lib
from fastsp import dist
from fastsp.config import ConfigError, TrainConfig
from fastsp.data import SyntheticDataset, build_dataset, make_loader
from fastsp.diffusion import NoiseSchedule
from fastsp.faults import kill_point
from fastsp.perceptual import SelfPerceptualLoss
from fastsp.sample import display_scale, generate, image_grid, save_png, schedule_from_config
from fastsp.unet import UNet, UNetConfig


def training_loss(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, torch.Tensor | None],
    perceptual_loss: SelfPerceptualLoss | None = None,
    t_prime: torch.Tensor | None = None,
    mse_weight: float = 0.0,
) -> torch.Tensor:
    """Stage 1 (perceptual_loss None): mean((f(x_t, t, c) - target)^2), target v = a eps - s x0.

    Stage 2: PAPER.md Algorithm 1 through `perceptual_loss`, plus mse_weight x the MSE loss.
    """
    x_t = schedule.add_noise(x0, noise, t)
    prediction = model(x_t, t, **cond)
    loss_dtype = torch.promote_types(prediction.dtype, torch.float32)  # bf16 -> fp32 accumulation
    if perceptual_loss is None:
        target = schedule.training_target(x0, noise, t)
        return F.mse_loss(prediction.to(loss_dtype), target.to(loss_dtype))
    loss = perceptual_loss(prediction, x0, noise, t, t_prime, cond, x_t=x_t)
    if mse_weight > 0:
        target = schedule.training_target(x0, noise, t)
        loss = loss + mse_weight * F.mse_loss(prediction.to(loss_dtype), target.to(loss_dtype))
    return loss


def step_randomness(
    seed: int,
    step: int,
    global_batch: int,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    label_dropout: float,
    device: torch.device,
    perceptual_loss: SelfPerceptualLoss | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Noise [B, *shape], t [B], the CFG-dropout mask [B] and t' [B] of one step (global batch)."""
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    noise = torch.randn((global_batch, *shape), generator=generator, device=device)
    t = schedule.sample_timesteps(global_batch, device, generator=generator)
    drop = torch.rand(global_batch, generator=generator, device=device) < label_dropout
    t_prime = perceptual_loss.sample_t_prime(t, generator) if perceptual_loss is not None else None
    return noise, t, drop, t_prime


def build_data(cfg: TrainConfig, model_cfg: UNetConfig):
    """The training data set, and the model config completed from it (channels, classes, context)"""
    if cfg.data == "synthetic" and cfg.data_format in ("auto", "synthetic"):
        context_dim = model_cfg.context_dim if cfg.cond == "context" else 0
        if cfg.cond == "context" and context_dim == 0:
            raise ConfigError(
                "--cond context with --data synthetic needs --context-dim > 0 (e.g. 1024)"
            )
        dataset = SyntheticDataset(
            10_000,
            cfg.channels,
            cfg.resolution,
            num_classes=10 if cfg.cond == "class" else 0,
            context_len=cfg.context_len if context_dim else 0,
            context_dim=context_dim,
            seed=cfg.seed,
        )
    else:
        dataset = build_dataset(
            cfg.data,
            cfg.data_format,
            resolution=cfg.resolution,
            channels=cfg.channels,
            latent_scale=cfg.latent_scale,
            random_flip=cfg.random_flip,
            on_bad_data=cfg.on_bad_data,
        )
    if cfg.cond == "class" and dataset.num_classes == 0:
        raise ConfigError(
            f"--cond class needs labelled data, but {cfg.data} has no labels "
            "(images need one subfolder per class); pass --cond none to train unconditionally"
        )
    if cfg.cond == "context" and not dataset.has_context:
        raise ConfigError(
            f"--cond context needs a context sequence per item, but {cfg.data} has none "
            "(latent shards need a 'context' array); pass --cond class or --cond none"
        )
    model_cfg = dataclasses.replace(
        model_cfg,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes if cfg.cond == "class" else 0,
        context_dim=dataset.context_shape[-1] if cfg.cond == "context" else 0,
    )
    return dataset, model_cfg


def check_batch(cfg: TrainConfig, world_size: int) -> None:
    if cfg.batch_size % (world_size * cfg.grad_accum) != 0:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} (global) must be divisible by world size "
            f"{world_size} x "
            f"--grad-accum {cfg.grad_accum} = {world_size * cfg.grad_accum}; pick a multiple of it"
        )


def check_resolution(cfg: TrainConfig, model_cfg: UNetConfig) -> None:
    factor = 2 ** (len(model_cfg.channel_mult) - 1)
    if cfg.resolution % factor != 0:
        raise ConfigError(
            f"--resolution {cfg.resolution} must be divisible by {factor} (the UNet halves it "
            f"{len(model_cfg.channel_mult) - 1} times); pick a multiple of {factor}"
        )


def check_same_shape(checkpoint: Path, model_cfg: UNetConfig, fix: str) -> None:
    """Refuse a checkpoint whose model config differs from `model_cfg`, naming every field."""
    saved = checkpoint_lib.read_config(checkpoint)["model"]
    ours = json.loads(json.dumps(dataclasses.asdict(model_cfg)))  # tuples -> lists, as saved
    differ = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
    if differ:
        details = ", ".join(f"{k}: checkpoint {a} vs requested {b}" for k, (a, b) in differ.items())
        raise checkpoint_lib.CheckpointError(
            f"{checkpoint} holds a model of another shape ({details}); {fix}"
        )


def check_resume(checkpoint: Path, cfg: TrainConfig, model_cfg: UNetConfig) -> None:
    """A checkpoint can only be resumed by a run of the same model shape and global batch."""
    fix = "resume with the original options, or pass another --out to start a new run"
    check_same_shape(checkpoint, model_cfg, fix)
    saved = checkpoint_lib.read_config(checkpoint)
    for name in ("batch_size", "seed"):
        if saved["train"][name] != getattr(cfg, name):
            raise checkpoint_lib.CheckpointError(
                f"{checkpoint} was trained with --{name.replace('_', '-')} "
                f"{saved['train'][name]}, not {getattr(cfg, name)}; the data stream depends on "
                "it. Resume with the original value"
            )


def build_optimizer(cfg: TrainConfig, params, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "apex_fused_adam":
        from apex.optimizers import FusedAdam  # checked importable in check_optimizer

        return FusedAdam(
            params,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            adam_w_mode=True,
        )
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        # torch's fused AdamW (CUDA and CPU): one kernel per step, and it reads `found_inf`, so a
        # step with non-finite gradients is skipped on the device without a host sync.
        fused=True,
    )


def check_optimizer(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.optimizer != "apex_fused_adam":
        return
    reasons = []
    try:
        import apex.optimizers  # noqa: F401
    except ImportError as error:
        reasons.append(
            f"apex is not importable ({error}); build it from NVIDIA's source, not PyPI's 'apex'"
        )
    if device.type != "cuda":
        reasons.append("apex FusedAdam needs CUDA tensors")
    if reasons:
        raise ConfigError(
            "--optimizer apex_fused_adam cannot run: "
            + "; ".join(reasons)
            + ". Use --optimizer adamw"
        )


def build_perceptual_loss(
    cfg: TrainConfig,
    model_cfg: UNetConfig,
    schedule: NoiseSchedule,
    ema: UNet,
    device: torch.device,
) -> SelfPerceptualLoss | None:
    """Stage 2's loss around the frozen perceptual network (or the online model's EMA)."""
    if cfg.objective != "self_perceptual":
        return None
    if cfg.perceptual_source == "ema":
        perceptual = ema
    else:
        source = checkpoint_lib.resolve_checkpoint(cfg.perceptual_checkpoint or cfg.init)
        fix = "the perceptual network must have the online model's shape: pass a checkpoint of it"
        check_same_shape(source, model_cfg, fix)
        perceptual = UNet(model_cfg)
        checkpoint_lib.load_weights(perceptual, source / "ema.safetensors")
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        perceptual = perceptual.to(device, memory_format=memory_format)
    try:
        return SelfPerceptualLoss(
            perceptual,
            schedule.alphas_cumprod,
            layers=cfg.perceptual_layers,
            prediction_type=cfg.prediction_type,
            perceptual_t=cfg.perceptual_t,
            predicted_noise=cfg.predicted_noise,
            distance=cfg.distance,
        )
    except ValueError as error:  # e.g. a tap name the model does not have
        raise ConfigError(f"--perceptual-layers: {error}") from None


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over lr_warmup_steps, then constant."""
    if cfg.lr_warmup_steps == 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps)


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """The configured decay, warmed up as min(decay, (1 + step) / (10 + step)).

    Without the warm-up a 0.999 EMA after 1,000 steps still holds 0.999^1000 = 37% of the random
    initial weights; with it the EMA is an average over roughly the last (step / 10) steps early on.
    """
    return min(cfg.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, weight: torch.Tensor) -> None:
    """ema <- ema + weight * (model - ema), weight = 1 - decay as a device tensor (0 skips)."""
    ema_params = list(ema.parameters())
    differences = torch._foreach_sub([p.detach() for p in model.parameters()], ema_params)
    torch._foreach_mul_(differences, weight)
    torch._foreach_add_(ema_params, differences)


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint; rerun with --resume."""


class NumericalFault(RuntimeError):
    """Too many consecutive steps with non-finite gradients; the last checkpoint is intact."""


class StopSignal:
    """SIGTERM and SIGINT ask the loop to finish its step, checkpoint and stop.

    A second signal while stopping restores the default behaviour (a second Ctrl-C kills).
    Handlers can only be installed from the main thread; elsewhere signals keep their defaults.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.name = ""
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # the second signal: stop waiting
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested = True
        self.name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class MetricsWriter:
    """Rank 0's metrics: JSON lines always, TensorBoard when it is installed."""

    def __init__(self, run_dir: Path):
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            pass

    def write(self, step: int, values: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def write_samples(path: Path, ema: UNet, cfg: TrainConfig, dataset, device: torch.device) -> None:
    """A grid of EMA samples, without guidance unless sample_cfg says otherwise."""
    num = cfg.sample_num
    labels = torch.arange(num) % ema.config.num_classes if ema.config.num_classes > 0 else None
    context = (
        torch.stack([dataset[(i, False)]["context"] for i in range(num)])
        if ema.config.context_dim > 0
        else None
    )
    images = generate(
        ema,
        schedule_from_config(dataclasses.asdict(cfg)),
        num,
        (ema.config.in_channels, cfg.resolution, cfg.resolution),
        labels=labels,
        context=context,
        num_steps=cfg.sample_steps,
        sampler=cfg.sample_sampler,
        guidance_scale=cfg.sample_cfg,
        guidance_rescale=cfg.sample_cfg_rescale,
        seed=cfg.seed,
        device=device,
    )
    save_png(image_grid(images), path, scale=display_scale(cfg.resolution))


def train(cfg: TrainConfig, model_cfg: UNetConfig) -> Path:
    """Run (or resume) training; returns the final checkpoint's folder.

    Every check that can fail on user input runs before the first file is written.
    """
    # ---- validate everything before any work -------------------------------------------------
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was requested but torch sees no CUDA device; use --device cpu"
        )
    schedule = schedule_from_config(dataclasses.asdict(cfg))
    dataset, model_cfg = build_data(cfg, model_cfg)
    check_resolution(cfg, model_cfg)
    info = dist.init(cfg.device)
    device = info.device
    check_batch(cfg, info.world_size)
    check_optimizer(cfg, device)
    run_dir = Path(cfg.out)
    resume_from = checkpoint_lib.latest_checkpoint(run_dir)
    if resume_from is not None and not cfg.resume:
        raise ConfigError(
            f"{run_dir} already holds checkpoints (latest: {resume_from.name}); pass --resume to "
            "continue that run, or another --out to start a new one"
        )
    if resume_from is not None:
        check_resume(resume_from, cfg, model_cfg)
    init_from = checkpoint_lib.resolve_checkpoint(cfg.init) if cfg.init else None
    if init_from is not None:
        check_same_shape(
            init_from, model_cfg, "pass --init a checkpoint trained with these model options"
        )
    config_text = config_lib.dumps(cfg, model_cfg)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    torch.manual_seed(cfg.seed)

    # ---- model, EMA, optimizer ---------------------------------------------------------------
    model = UNet(model_cfg)
    if init_from is not None and resume_from is None:  # stage 2 starts from stage 1's EMA weights
        checkpoint_lib.load_weights(model, init_from / "ema.safetensors")
    model = model.to(device, memory_format=memory_format)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    perceptual_loss = build_perceptual_loss(cfg, model_cfg, schedule, ema, device)
    optimizer = build_optimizer(cfg, model.parameters(), device)
    start_step = 0
    if resume_from is not None:
        state = checkpoint_lib.load_training_state(resume_from, model, ema, optimizer)
        start_step = state["step"]
    ddp_model = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if info.world_size > 1
        else model
    )

    # ---- outputs (rank 0) ----------------------------------------------------------------------
    metrics = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_lib.atomic_write_text(run_dir / "config.json", config_text)
        metrics = MetricsWriter(run_dir)
        if cfg.resume and resume_from is None:
            print(f"--resume: no checkpoint in {run_dir} yet, starting fresh")
        if resume_from is not None:
            print(f"resuming from {resume_from} (step {start_step})")
        elif init_from is not None:
            print(f"initialised from {init_from}")
        if perceptual_loss is not None:
            source = (
                "EMA of the online model"
                if cfg.perceptual_source == "ema"
                else (cfg.perceptual_checkpoint or cfg.init)
            )
            print(
                f"objective: self-perceptual at {cfg.perceptual_layers}, "
                f"perceptual network: {source}"
            )

        params = sum(p.numel() for p in model.parameters())
        print(
            f"model: {params / 1e6:.2f}M parameters; data: {cfg.data} ({len(dataset)} items); "
            f"device: {device} x {info.world_size}; precision: {'bf16' if use_bf16 else 'fp32'}"
        )

    # ---- the loop ------------------------------------------------------------------------------
    local_batch = cfg.batch_size // info.world_size
    micro_batch = local_batch // cfg.grad_accum
    shape = (model_cfg.in_channels, cfg.resolution, cfg.resolution)
    batches = iter(
        make_loader(
            dataset,
            cfg.batch_size,
            info.rank,
            info.world_size,
            cfg.seed,
            start_step,
            cfg.num_workers,
        )
    )
    # Device-side accumulators, read only at log intervals (the loop's only regular host sync).
    loss_sum = torch.zeros((), device=device)
    grad_norm_sum = torch.zeros((), device=device)
    good_steps = torch.zeros((), device=device)
    bad_in_a_row = torch.zeros((), device=device, dtype=torch.long)
    bad_items = torch.zeros((), device=device, dtype=torch.long)
    steps_since_log, log_start = 0, time.perf_counter()
    progress = tqdm(
        total=cfg.steps, initial=start_step, disable=not info.is_main, dynamic_ncols=True
    )
    final_checkpoint = resume_from
    stop_signal = StopSignal()
    try:
        for step in range(start_step, cfg.steps):
            batch = next(batches)
            noise, t, drop, t_prime = step_randomness(
                cfg.seed,
                step,
                cfg.batch_size,
                shape,
                schedule,
                cfg.label_dropout,
                device,
                perceptual_loss,
            )
            mine = slice(info.rank * local_batch, (info.rank + 1) * local_batch)
            noise, t, drop = noise[mine], t[mine], drop[mine]
            t_prime = t_prime[mine] if t_prime is not None else None
            x0 = batch["x"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            bad_items += batch["bad"].sum().to(device) if "bad" in batch else 0
            labels = (
                batch["label"].to(device, non_blocking=True) if model_cfg.num_classes > 0 else None
            )
            if (
                labels is not None
            ):  # classifier-free guidance dropout: the null label is num_classes
                labels = torch.where(drop, torch.full_like(labels, model_cfg.num_classes), labels)
            context = (
                batch["context"].to(device, non_blocking=True)
                if model_cfg.context_dim > 0
                else None
            )
            if context is not None:
                context = context * (~drop).to(context.dtype)[:, None, None]

            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                part = slice(micro * micro_batch, (micro + 1) * micro_batch)
                last = micro == cfg.grad_accum - 1
                sync = (
                    contextlib.nullcontext()
                    if last or info.world_size == 1
                    else ddp_model.no_sync()
                )
                with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    cond = {
                        "labels": labels[part] if labels is not None else None,
                        "context": context[part] if context is not None else None,
                    }
                    loss = training_loss(
                        ddp_model,
                        schedule,
                        x0[part],
                        noise[part].contiguous(memory_format=memory_format),
                        t[part],
                        cond,
                        perceptual_loss,
                        t_prime[part] if t_prime is not None else None,
                        cfg.mse_weight,
                    )
                    (loss / cfg.grad_accum).backward()
                step_loss += loss.detach() / cfg.grad_accum

            # The update is skipped on the device when the (all-reduced, so identical on every
            # rank) gradient norm is not finite: fused AdamW reads `found_inf` and leaves
            # parameters, moments and its step count alone; the EMA moves by a zero weight.
            params = list(model.parameters())
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in params if p.grad is not None]
                )
            finite = torch.isfinite(grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            if cfg.optimizer == "apex_fused_adam":
                if finite.item():  # apex has no found_inf input: one host sync per step
                    optimizer.step()
            else:
                optimizer.found_inf = (~finite).float()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, model, (1.0 - ema_decay(cfg, step)) * finite)
            loss_sum += torch.where(finite, step_loss, 0.0)
            grad_norm_sum += torch.where(finite, grad_norm, 0.0)
            good_steps += finite
            bad_in_a_row = torch.where(finite, 0, bad_in_a_row + 1)

            done = step + 1
            steps_since_log += 1
            progress.update(1)
            checkpoint_now = done == cfg.steps or (
                cfg.checkpoint_every and done % cfg.checkpoint_every == 0
            )
            if done % cfg.log_every == 0 or checkpoint_now:
                totals = torch.stack([loss_sum, grad_norm_sum, good_steps, bad_items.float()])
                totals = dist.all_reduce_mean(totals)
                loss_value, grad_norm_value, good, bad_data = totals.tolist()
                in_a_row = int(bad_in_a_row.item())
                if in_a_row >= cfg.max_bad_steps:
                    raise NumericalFault(
                        f"stopped at step {done}: {in_a_row} consecutive steps had non-finite "
                        f"gradients (updates skipped, so the weights are those of step "
                        f"{done - in_a_row}); the last checkpoint "
                        f"({checkpoint_lib.latest_checkpoint(run_dir) or 'none yet'}) is intact. "
                        "Lower --lr, check the data for NaN/inf values, or raise --max-bad-steps"
                    )
                elapsed = time.perf_counter() - log_start
                images_per_s = cfg.batch_size * steps_since_log / elapsed
                if metrics is not None:
                    values = {
                        "loss": loss_value / max(good, 1.0),  # mean over the finite steps
                        "lr": learning_rate(cfg, step),
                        "images_per_s": images_per_s,
                        "grad_norm": grad_norm_value / max(good, 1.0),
                        "skipped_steps": steps_since_log - round(good),
                        "bad_items": round(bad_data * info.world_size),
                    }
                    metrics.write(done, values)
                    progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{images_per_s:.0f}")
                for accumulator in (loss_sum, grad_norm_sum, good_steps, bad_items):
                    accumulator.zero_()
                steps_since_log, log_start = 0, time.perf_counter()
            # SIGTERM / SIGINT on any rank: all ranks stop after this same step, with a checkpoint.
            preempted = (
                stop_signal.requested
                if info.world_size == 1
                else dist.any_rank(stop_signal.requested)
            )
            if info.is_main and (
                done == cfg.steps or (cfg.sample_every and done % cfg.sample_every == 0)
            ):
                write_samples(
                    run_dir / "samples" / f"step_{done:08d}.png", ema, cfg, dataset, device
                )
            if checkpoint_now or preempted:
                save_error = None
                if info.is_main:
                    state = {"samples_seen": done * cfg.batch_size, "world_size": info.world_size}
                    try:
                        final_checkpoint = checkpoint_lib.save_checkpoint(
                            run_dir, done, model, ema, optimizer, state, config_text
                        )
                        checkpoint_lib.prune_checkpoints(run_dir, cfg.keep_last)
                    except checkpoint_lib.CheckpointError as error:
                        save_error = error
                # A failed save (disk full) stops every rank now, not at a collective's timeout.
                if dist.any_rank(save_error is not None):
                    raise save_error or checkpoint_lib.CheckpointError(
                        f"rank 0 could not save the checkpoint of step {done}; see its error"
                    )
            kill_point(f"step:{done}")
            if preempted:
                # Every rank says where it stopped before anyone exits (torchrun then terminates
                # the slower ranks as soon as one has exited).
                # One write per line: two ranks share torchrun's stderr, and print() writes the
                # text and its newline separately, so lines from different ranks interleave.
                sys.stderr.write(f"\nrank {info.rank}: stopping after step {done}\n")
                sys.stderr.flush()
                dist.barrier()
                raise Preempted(
                    f"stopped by {stop_signal.name} after step {done}; checkpoint written: "
                    f"{checkpoint_lib.latest_checkpoint(run_dir)}. Continue with --resume"
                )
    finally:
        stop_signal.restore()
        progress.close()
        if metrics is not None:
            metrics.close()
    dist.barrier()
    if info.is_main:
        print(
            f"run folder: {run_dir}\n  checkpoint: {final_checkpoint}\n"
            f"  samples: {run_dir / 'samples'}\n"
            f"  metrics: {run_dir / 'metrics.jsonl'}"
        )
    return checkpoint_lib.latest_checkpoint(run_dir) or run_dir
