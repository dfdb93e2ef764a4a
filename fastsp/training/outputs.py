"""What a run writes and says: rank 0's run folder (config.json, backends.json, metrics.jsonl,
sample grids, checkpoints), its first lines, and the progress of the loop.

Off a terminal (nohup, Slurm, CI: stderr is a file or a pipe) the progress is one plain line per
log interval; on a terminal, tqdm's bar.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from fastsp import checkpoint as checkpoint_lib
from fastsp import dist
from fastsp.errors import CheckpointError, CheckpointWriteError, NumericalFault
from fastsp.sampling import default_labels, display_scale, generate, image_grid, save_png
from fastsp.training.assembly import Run


def start_outputs(run: Run, config_text: str) -> MetricsWriter | None:
    """Rank 0: the run folder with config.json and backends.json, the metrics file, and the
    run's first lines (where it starts from, the objective, the model, the backends)."""
    if not run.info.is_main:
        return None
    cfg, plan, run_dir = run.cfg, run.plan, run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_lib.atomic_write_text(run_dir / "config.json", config_text)
    write_backends(run)
    metrics = MetricsWriter(run_dir, run.start_step)
    if cfg.resume and plan.resume_from is None:
        print(f"--resume: no checkpoint in {run_dir} yet, starting fresh")
    if plan.resume_from is not None:
        print(f"resuming from {plan.resume_from} (step {run.start_step})")
        for line in plan.resume_lines:
            print(line)
    elif plan.init_from is not None:
        print(f"initialised from {plan.init_from}")
    if run.perceptual_loss is not None:
        source = (
            "EMA of the online model"
            if cfg.perceptual_source == "ema"
            else (cfg.perceptual_checkpoint or cfg.init)
        )
        norm = "" if cfg.perceptual_norm == "none" else f" ({cfg.perceptual_norm}-normalised)"
        print(
            f"objective: self-perceptual at {cfg.perceptual_layers}{norm}, perceptual network: "
            f"{source}"
        )
    if cfg.objective == "model_guidance":
        print(
            f"objective: model guidance, w = {cfg.mg_scale} where t / T <= {cfg.mg_t_max}, "
            "guided by the EMA"
        )
    params = sum(p.numel() for p in run.model.parameters())
    print(
        f"model: {params / 1e6:.2f}M parameters; data: {cfg.data} ({len(plan.dataset)} items); "
        f"device: {run.info.device} x {run.info.world_size}"
    )
    for line in plan.data_lines:
        print(line)
    for part, backend in run.backends.items():
        print(f"{part.replace('_', ' ')}: {backend}")
    return metrics


def write_backends(run: Run) -> None:
    if run.info.is_main:
        checkpoint_lib.atomic_write_text(
            run.run_dir / "backends.json", json.dumps(run.backends, indent=2) + "\n"
        )


class Progress:
    """Rank 0's progress: tqdm's bar where stderr is a terminal; elsewhere (tqdm's
    `disable=None`: a file or a pipe) one plain line per log interval, not a carriage-return
    update per step that fills a log with one endless line."""

    def __init__(self, total: int, initial: int, is_main: bool):
        self.total = total
        self.bar = tqdm(
            total=total, initial=initial, disable=None if is_main else True, dynamic_ncols=True
        )
        self.plain = is_main and self.bar.disable

    def update(self) -> None:
        self.bar.update(1)

    def log(self, done: int, loss: float | None, images_per_s: float) -> None:
        shown = "none" if loss is None else f"{loss:.4f}"
        if self.plain:
            print(
                f"step {done}/{self.total}: loss {shown}, {images_per_s:.0f} images/s", flush=True
            )
        else:
            self.bar.set_postfix(loss=shown, img_s=f"{images_per_s:.0f}")

    def close(self) -> None:
        self.bar.close()


class MetricsWriter:
    """Rank 0's metrics: JSON lines always, TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        path = run_dir / "metrics.jsonl"
        if path.exists():
            self._drop_lines_after(path, start_step)
        self.file = open(path, "a", encoding="utf-8")
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            pass

    @staticmethod
    def _drop_lines_after(path: Path, start_step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their lines (and a line torn
        by a kill) so that metrics.jsonl has one line per logged step, in order."""
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", start_step + 1) <= start_step:
                kept.append(line)
        checkpoint_lib.atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def write(self, step: int, values: dict[str, float | None]) -> None:
        """One line; None (a mean over no finite step) is JSON's null, and no TensorBoard point."""
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in values.items():
                if value is not None:
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def save_step_checkpoint(run: Run, done: int, config_text: str) -> Path | None:
    """Every rank: rank 0 saves the checkpoint of step `done` (and prunes); a failed save stops
    every rank now, not at a collective's timeout. Returns the new checkpoint (rank 0)."""
    if run.cfg.parallel == "fsdp":
        return save_sharded_checkpoint(run, done, config_text)
    saved, save_error = None, None
    if run.info.is_main:
        state = {"samples_seen": done * run.cfg.batch_size, "world_size": run.info.world_size}
        # Never let a checkpoint with non-finite weights replace (or, with --keep-last, prune)
        # good ones. The step skips non-finite gradients, so this is the last line of defence;
        # one host read per checkpoint.
        save_error = nonfinite_weights_error(done, run.model, run.ema, run.run_dir)
        if save_error is None:
            try:
                saved = checkpoint_lib.save_checkpoint(
                    run.run_dir, done, run.model, run.ema, run.optimizer, state, config_text
                )
                checkpoint_lib.prune_checkpoints(run.run_dir, run.cfg.keep_last)
            except CheckpointError as error:
                save_error = error
    if dist.any_rank(save_error is not None):
        raise save_error or CheckpointWriteError(
            f"rank 0 could not save the checkpoint of step {done}; see its error"
        )
    return saved


def save_sharded_checkpoint(run: Run, done: int, config_text: str) -> Path | None:
    """Every rank: the FSDP2 checkpoint of step `done` through torch.distributed.checkpoint
    (fastsp.training.parallel), refused where any rank holds a non-finite weight; rank 0
    prunes. Returns the new checkpoint (rank 0)."""
    from fastsp.training import parallel

    bad = parallel.nonfinite_names(run.model, run.ema)
    if dist.any_rank(bool(bad)):
        raise NumericalFault(
            f"not saving the checkpoint of step {done}: non-finite weights "
            f"({', '.join(bad[:3]) or 'on another rank'}); the last checkpoint "
            f"({checkpoint_lib.latest_checkpoint(run.run_dir) or 'none yet'}) is intact. "
            "Lower --lr and resume from it"
        )
    state = {"samples_seen": done * run.cfg.batch_size, "world_size": run.info.world_size}
    args = (run.run_dir, done, run.model, run.ema, run.optimizer, state, config_text)
    saved = parallel.save_checkpoint(*args)
    if run.info.is_main:
        checkpoint_lib.prune_checkpoints(run.run_dir, run.cfg.keep_last)
    return saved


def nonfinite_weights_error(
    step: int, model: torch.nn.Module, ema: torch.nn.Module, run_dir: Path
) -> NumericalFault | None:
    """A NumericalFault naming the non-finite tensors of the model and its EMA, or None."""
    tensors = {
        f"{prefix}.{name}": value
        for prefix, module in (("model", model), ("ema", ema))
        for name, value in module.state_dict().items()
        if value.is_floating_point()
    }
    finite = torch.stack([torch.isfinite(v).all() for v in tensors.values()]).tolist()
    bad = [name for name, ok in zip(tensors, finite, strict=True) if not ok]
    if not bad:
        return None
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return NumericalFault(
        f"not saving the checkpoint of step {step}: non-finite weights in {shown}; the last "
        f"checkpoint ({checkpoint_lib.latest_checkpoint(run_dir) or 'none yet'}) is intact. "
        "Lower --lr and resume from it"
    )


def write_samples(run: Run, done: int) -> None:
    """Rank 0 (every rank under FSDP2, whose sharded EMA needs them all for a forward): a grid
    of EMA samples of step `done` into the run folder's samples/, without guidance unless
    sample_cfg says otherwise; rank 0 writes it."""
    cfg, ema, dataset = run.cfg, run.ema, run.dataset
    num = cfg.sample_num
    labels = default_labels(num, ema.config.num_classes, None)
    context = (
        torch.stack([dataset[(i % len(dataset), False)]["context"] for i in range(num)])
        if ema.config.context_dim > 0
        else None
    )
    first = dataset[(0, False)]  # a diffusers family's other conditions, from the data too
    conditions = {
        name: torch.stack([dataset[(i % len(dataset), False)][name] for i in range(num)])
        for name in ("pooled", "time_ids")
        if name in first
    }
    images = generate(
        ema,
        run.plan.schedule,
        num,
        (ema.config.in_channels, cfg.resolution, cfg.resolution),
        labels=labels,
        context=context,
        null_context=getattr(dataset, "null_context", None),
        conditions=conditions,
        null_pooled=getattr(dataset, "null_pooled", None),
        num_steps=cfg.sample_steps,
        sampler=cfg.sample_sampler,
        guidance_scale=cfg.sample_cfg,
        guidance_rescale=cfg.sample_cfg_rescale,
        seed=cfg.seed,
        device=run.info.device,
    )
    if not run.info.is_main:
        return
    path = run.run_dir / "samples" / f"step_{done:08d}.png"
    save_png(image_grid(images), path, scale=display_scale(cfg.resolution))
