"""Training: `build_run(train_config, model_config)` validates and assembles a run, and
`run_loop(run)` trains it, read top to bottom; `train` is the two in one call.

Determinism across world sizes: the data stream (fastsp.data.ShardedBatchSampler) and the noise,
timesteps and label dropout of a step are functions of (seed, step) over the *global* batch; each
rank takes its contiguous slice. With equal-size micro-batches the mean of the ranks' mean losses
is the global mean, so N processes compute the same update as one process with the same global
batch (up to float summation order).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastsp import checkpoint as checkpoint_lib
from fastsp import (
    config_fields,
    config_file,
    diffusers_unet,
    dist,
    model_config,
    preemption,
    run_folder,
)
from fastsp.attention import describe_backend as describe_attention
from fastsp.config import TrainConfig
from fastsp.config_fields import BUILTIN_DATA
from fastsp.data import build_dataset, describe_data
from fastsp.data_stream import make_loader
from fastsp.diffusion import NoiseSchedule
from fastsp.errors import (
    CheckpointError,
    CheckpointWriteError,
    ConfigError,
    GraphCaptureError,
    NumericalFault,
    Preempted,
)
from fastsp.faults import kill_point
from fastsp.feature_loss import feature_mse_backend
from fastsp.latent_shards import LatentsDataset
from fastsp.model_config import DiTConfig, UNetConfig
from fastsp.models import build_model
from fastsp.perceptual import SelfPerceptualLoss
from fastsp.sampling import (
    default_labels,
    display_scale,
    generate,
    image_grid,
    save_png,
)
from fastsp.step import StepConfig, TrainStep, captures_graph, graph_environment, uses_bf16
from fastsp.unet import UNet, decide_attention


def build_data(cfg: TrainConfig, model_cfg: UNetConfig):
    """The training data set, and the model config completed from it (channels, classes, context)"""
    synthetic = cfg.data == "synthetic" and cfg.data_format in ("auto", "synthetic")
    context_dim = model_cfg.context_dim if cfg.cond == "context" else 0
    if synthetic and cfg.cond == "context" and context_dim == 0:
        raise ConfigError(
            "--cond context with --data synthetic needs --context-dim > 0 (e.g. 1024)"
        )
    dataset = build_dataset(
        cfg.data,
        cfg.data_format,
        resolution=cfg.resolution,
        channels=cfg.channels,
        latent_scale=cfg.latent_scale,
        random_flip=cfg.random_flip,
        on_bad_data=cfg.on_bad_data,
        # what synthetic data holds (folders and digits say it themselves)
        num_classes=10 if cfg.cond == "class" else 0,
        context_len=cfg.context_len if context_dim else 0,
        context_dim=context_dim,
        seed=cfg.seed,
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
    if getattr(dataset, "resolution", cfg.resolution) != cfg.resolution:  # latents set their own
        raise ConfigError(
            f"--resolution {cfg.resolution} does not match the latents in {cfg.data}, which are "
            f"{dataset.resolution}x{dataset.resolution}; pass --resolution {dataset.resolution} "
            "(the latent side, not the image side)"
        )
    if cfg.cond == "class" and isinstance(dataset, LatentsDataset):
        dataset.check_label_range()  # one stray huge label must not grow the label embedding
    model_cfg = dataclasses.replace(
        model_cfg,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes if cfg.cond == "class" else 0,
        context_dim=dataset.context_shape[-1] if cfg.cond == "context" else 0,
    )
    return dataset, model_cfg


def data_config(cfg: TrainConfig, dataset) -> tuple[TrainConfig, list[str]]:
    """`cfg` with the values the data set decides (digits and latent shards have their own
    channels, context shards their own length: --channels and --context-len apply to image
    folders and synthetic data), so that config.json records what the run trains on; and the
    lines that say so, with what the data holds (fastsp.data.describe_data)."""
    lines = describe_data(dataset, labels=cfg.cond == "class")
    decided = {"channels": (dataset.channels, "image folders and synthetic data")}
    if cfg.cond == "context" and dataset.context_shape is not None:
        decided["context_len"] = (dataset.context_shape[0], "synthetic data")
    for name, (value, where) in decided.items():
        if getattr(cfg, name) != value:
            lines.append(
                f"{name.replace('_', ' ')}: {value}, the data's own (--{name.replace('_', '-')} "
                f"{getattr(cfg, name)} applies to {where} only); config.json records {value}"
            )
    return dataclasses.replace(cfg, **{name: v for name, (v, _) in decided.items()}), lines


def check_out_and_data(cfg: TrainConfig) -> None:
    """The run folder and a data folder must not hold one another: grids and checkpoints
    written into the data would be read as data (a new class "samples") by the next run."""
    built_in = cfg.data_format in BUILTIN_DATA or (
        cfg.data_format == "auto" and cfg.data in BUILTIN_DATA
    )
    if built_in:
        return
    root = cfg.data
    data, out = os.path.realpath(root), os.path.realpath(cfg.out)
    if os.path.commonpath([data, out]) == data:
        raise ConfigError(
            f"--out {cfg.out} is {'the data folder' if out == data else 'inside the data folder'}"
            f" {root}: the run's grids and checkpoints would be read as data by the next run; "
            "pass an --out outside the data folder"
        )
    if os.path.commonpath([data, out]) == out:
        raise ConfigError(
            f"the data folder {root} is inside --out {cfg.out}: the run would write beside its "
            "own data; pass an --out that does not hold the data folder"
        )


def check_batch(cfg: TrainConfig, world_size: int) -> None:
    if cfg.batch_size % (world_size * cfg.grad_accum) != 0:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} (global) must be divisible by world size "
            f"{world_size} x "
            f"--grad-accum {cfg.grad_accum} = {world_size * cfg.grad_accum}; pick a multiple of it"
        )


def check_resolution(cfg: TrainConfig, model_cfg: UNetConfig | DiTConfig) -> None:
    if isinstance(model_cfg, DiTConfig):
        if cfg.resolution % model_cfg.patch_size != 0:
            raise ConfigError(
                f"--resolution {cfg.resolution} must be divisible by the DiT's --patch-size "
                f"{model_cfg.patch_size}; pick a multiple of it"
            )
        return
    factor = 2 ** (len(model_cfg.channel_mult) - 1)
    if cfg.resolution % factor != 0:
        raise ConfigError(
            f"--resolution {cfg.resolution} must be divisible by {factor} (the UNet halves it "
            f"{len(model_cfg.channel_mult) - 1} times); pick a multiple of {factor}"
        )


def check_same_shape(checkpoint: Path, model_cfg: UNetConfig, fix: str) -> None:
    """Refuse a checkpoint (or diffusers UNet folder) whose model config differs from
    `model_cfg`, naming every field."""
    saved = {"kind": "unet", **diffusers_unet.source_model_config(checkpoint)}  # no kind: a UNet
    ours = json.loads(json.dumps(config_file.model_to_dict(model_cfg)))  # tuples -> lists, as saved
    differ = {
        k: (saved.get(k), v)
        for k, v in ours.items()
        if k not in RESUME_MODEL_MAY_CHANGE and not same_value(saved.get(k), v)
    }
    if differ:  # typed: a "16" in a hand-made config is not 16, and says so
        details = ", ".join(f"{k}: {show_pair(b, a)}" for k, (a, b) in differ.items())
        raise CheckpointError(f"{checkpoint} holds a model of another shape ({details}); {fix}")


# What a resume may change, decided field by field; every TrainConfig field is named (a test
# checks it). "same": the field defines what the run learns (data, conditioning, diffusion,
# objective, optimizer and EMA settings) or what the checkpoint's state means (the global batch
# and the seed fix the data stream); a resume with another value is refused. "may change": how
# the run executes, how long, what it logs and writes. "said": may change, and the start says so.
# The optimizer's hyperparameters besides the learning rate are "same": load_state_dict would put
# the checkpoint's back into the optimizer while config.json claimed the new ones.
RESUME_FIELDS: dict[str, str] = {
    "preset": "may change",  # only the defaults; the resolved fields are compared
    "data": "same",
    "data_format": "same",
    "resolution": "same",
    "channels": "same",
    "latent_scale": "same",
    "random_flip": "same",
    "num_workers": "may change",
    "on_bad_data": "may change",  # what a file that went bad does; the data's rule stays
    "cond": "same",
    "label_dropout": "same",
    "context_len": "same",
    "beta_schedule": "same",
    "num_timesteps": "same",
    "beta_start": "same",
    "beta_end": "same",
    "zero_terminal_snr": "same",
    "prediction_type": "same",
    "objective": "same",
    "init": "same",  # stage 2's frozen perceptual network unless perceptual_checkpoint names one
    "perceptual_checkpoint": "same",
    "perceptual_source": "same",
    "perceptual_layers": "same",
    "perceptual_t": "same",
    "predicted_noise": "same",
    "distance": "same",
    "mse_weight": "same",
    "perceptual_on_t": "same",
    "steps": "may change",
    "batch_size": "same",
    "grad_accum": "may change",  # the same global batch in more or fewer micro-steps
    "lr": "said",
    "lr_warmup_steps": "said",
    "weight_decay": "same",
    "adam_beta1": "same",
    "adam_beta2": "same",
    "adam_eps": "same",
    "optimizer": "same",  # another optimizer's state
    "grad_clip": "same",
    "max_bad_steps": "may change",
    "ema_decay": "same",  # the EMA is the model that samples
    "device": "may change",
    "precision": "may change",
    "channels_last": "may change",
    "train_step": "may change",  # fast and reference compute the same update
    "cuda_graph": "may change",
    "compile": "may change",
    "batched_branches": "may change",
    "seed": "same",
    "deterministic": "may change",
    "out": "may change",  # a run folder copied elsewhere
    "resume": "may change",
    "log_every": "may change",
    "checkpoint_every": "may change",
    "keep_last": "may change",
    "sample_every": "may change",
    "sample_num": "may change",
    "sample_steps": "may change",
    "sample_sampler": "may change",
    "sample_cfg": "may change",
    "sample_cfg_rescale": "may change",
}
# Every field of the model (either kind) defines it, except the choice of attention kernels.
RESUME_MODEL_MAY_CHANGE = ("attention_backend",)


def same_value(a: Any, b: Any) -> bool:
    """Equal values of one type (an int and a float count as one: JSON writes 1e-3 and 0.001
    alike); "8" is not 8."""
    number = (int, float)
    same_type = type(a) is type(b) or (
        isinstance(a, number)
        and isinstance(b, number)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    )
    return same_type and a == b


def show_pair(ours: Any, theirs: Any, where: str = "checkpoint") -> str:
    """'x0 (checkpoint: v)', with the types when they differ: "8 (int; checkpoint: '8', str)"."""
    if type(ours) is type(theirs) or same_value(ours, theirs):
        return f"{config_fields.show_value(ours)} ({where}: {config_fields.show_value(theirs)})"
    return f"{ours!r} ({type(ours).__name__}; {where}: {theirs!r}, {type(theirs).__name__})"


def check_resume(checkpoint: Path, cfg: TrainConfig, model_cfg: Any) -> list[str]:
    """Refuse a resume that changes what the run learns (RESUME_FIELDS), listing every
    difference; return the lines that say what it does change ("said" fields)."""
    saved, saved_model = checkpoint_lib.read_configs(checkpoint)
    differ, said = [], []
    for field in dataclasses.fields(cfg):
        name, rule = field.name, RESUME_FIELDS.get(field.name, "same")  # undecided: kept
        ours, theirs = getattr(cfg, name), getattr(saved, name)
        if same_value(ours, theirs):
            continue
        option = config_fields.option_flag(name)
        if rule == "same":
            differ.append(f"{option} {show_pair(ours, theirs)}")
        elif rule == "said":
            said.append(
                f"{option} {config_fields.show_value(ours)} from here on (the checkpoint's: "
                f"{config_fields.show_value(theirs)})"
            )
    if type(saved_model) is not type(model_cfg):
        differ.append(
            f"model kind {model_config.model_kind(model_cfg)} "
            f"(checkpoint: {model_config.model_kind(saved_model)})"
        )
    else:
        for field in dataclasses.fields(model_cfg):
            ours, theirs = getattr(model_cfg, field.name), getattr(saved_model, field.name)
            if field.name not in RESUME_MODEL_MAY_CHANGE and not same_value(ours, theirs):
                differ.append(f"{config_fields.option_flag(field.name)} {show_pair(ours, theirs)}")
    if differ:
        raise CheckpointError(
            f"{checkpoint} cannot be resumed with other settings than it was trained with: "
            f"{'; '.join(differ)}. They define what the run learns (the README lists what a "
            "resume may change). Resume with the original values, or pass another --out to "
            f"start a new run (--init {checkpoint} starts it from these weights)"
        )
    return said


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
        # The fast step: torch's fused AdamW (CUDA and CPU), one kernel per step; it reads
        # `found_inf`, so a step with non-finite gradients is skipped on the device without a
        # host sync, and with capturable=True (CUDA) it can be captured in a CUDA graph. The
        # reference step: torch's default AdamW, as fastsp.reference uses.
        fused=cfg.train_step == "fast",
        capturable=cfg.train_step == "fast" and device.type == "cuda",
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
    bf16: bool = False,
) -> SelfPerceptualLoss | None:
    """Stage 2's loss around the frozen perceptual network (or the online model's EMA)."""
    if cfg.objective != "self_perceptual":
        return None
    if cfg.perceptual_source == "ema":
        perceptual = ema
    else:
        source = diffusers_unet.resolve_source(cfg.perceptual_checkpoint or cfg.init)
        fix = "the perceptual network must have the online model's shape: pass a checkpoint of it"
        check_same_shape(source, model_cfg, fix)
        perceptual = build_model(model_cfg)
        diffusers_unet.load_state_into(perceptual, source)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        # Frozen, so it can be held in bf16 when the step runs under bf16 autocast: half the
        # weight traffic of the perceptual forwards, and no per-step fp32 -> bf16 weight casts.
        dtype = torch.bfloat16 if bf16 and cfg.train_step == "fast" else torch.float32
        perceptual = perceptual.to(device, dtype, memory_format=memory_format)
    try:
        return SelfPerceptualLoss(
            perceptual,
            schedule.alphas_cumprod,
            layers=cfg.perceptual_layers,
            prediction_type=cfg.prediction_type,
            perceptual_t=cfg.perceptual_t,
            predicted_noise=cfg.predicted_noise,
            distance=cfg.distance,
            batched_branches=cfg.batched_branches,
            perceptual_on_t=cfg.perceptual_on_t,
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


def use_deterministic_algorithms() -> None:
    """--deterministic: torch's deterministic kernels, so that a rerun or a resumed run is
    bit-identical on CUDA as it is on the CPU. cuBLAS needs a fixed workspace size for that, set
    before its first use (PyTorch's reproducibility notes); the loop's first step is that use."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


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


def write_samples(path: Path, ema: UNet, cfg: TrainConfig, dataset, device: torch.device) -> None:
    """A grid of EMA samples, without guidance unless sample_cfg says otherwise."""
    num = cfg.sample_num
    labels = default_labels(num, ema.config.num_classes, None)
    context = (
        torch.stack([dataset[(i % len(dataset), False)]["context"] for i in range(num)])
        if ema.config.context_dim > 0
        else None
    )
    images = generate(
        ema,
        NoiseSchedule.from_config(cfg),
        num,
        (ema.config.in_channels, cfg.resolution, cfg.resolution),
        labels=labels,
        context=context,
        null_context=getattr(dataset, "null_context", None),
        num_steps=cfg.sample_steps,
        sampler=cfg.sample_sampler,
        guidance_scale=cfg.sample_cfg,
        guidance_rescale=cfg.sample_cfg_rescale,
        seed=cfg.seed,
        device=device,
    )
    save_png(image_grid(images), path, scale=display_scale(cfg.resolution))


def describe_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> str:
    """The optimizer implementation a run uses, for its first lines and backends.json."""
    if type(optimizer).__module__.startswith("apex"):
        return "apex FusedAdam (adam_w_mode)"
    flags = [name for name in ("fused", "foreach", "capturable") if optimizer.defaults.get(name)]
    if not flags:  # torch picks: foreach for CUDA tensors, a for-loop for CPU ones
        flags = [
            "foreach" if device.type == "cuda" else "for-loop",
            f"torch's default on {device.type.upper()}",
        ]
    return f"torch {type(optimizer).__name__} ({', '.join(flags)})"


@dataclasses.dataclass
class Run:
    """A validated, assembled training run that has not started: `build_run` writes no file.

    `run_loop(run)` trains it. Benchmarks and tests time and inspect `run.step`, the very step
    the loop runs.
    """

    cfg: TrainConfig
    model_cfg: UNetConfig  # completed from the data set (channels, classes, context)
    info: dist.DistInfo
    run_dir: Path
    dataset: Any
    model: UNet  # the online model's fp32 master weights
    ema: UNet
    optimizer: torch.optim.Optimizer
    perceptual_loss: SelfPerceptualLoss | None
    step: TrainStep
    start_step: int  # 0, or the step of the checkpoint resumed from
    resume_from: Path | None
    init_from: Path | None
    backends: dict[str, str]  # what runs each part of the step (attention, feature MSE, ...)
    data_lines: list[str] = dataclasses.field(default_factory=list)  # classes, data's own values
    resume_lines: list[str] = dataclasses.field(default_factory=list)  # what the resume changes


def build_run(cfg: TrainConfig, model_cfg: UNetConfig) -> Run:
    """Validate everything that can fail on user input, then build data, models, the perceptual
    loss, the optimizer and the step, and load the resume state. Writes nothing."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was requested but torch sees no CUDA device; use --device cpu"
        )
    schedule = NoiseSchedule.from_config(cfg)
    dataset, model_cfg = build_data(cfg, model_cfg)
    check_out_and_data(cfg)
    cfg, data_lines = data_config(cfg, dataset)
    check_resolution(cfg, model_cfg)
    # Decided from the config before the process group starts (fastsp.step.graph_environment):
    # torchrun's WORLD_SIZE and the device dist.init will pick.
    world_size = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ else 1
    graph_env = graph_environment(cfg, world_size, dist.pick_device(cfg.device).type)
    os.environ.update(graph_env)
    info = dist.init(cfg.device)
    device = info.device
    check_batch(cfg, info.world_size)
    check_optimizer(cfg, device)
    run_dir = Path(cfg.out)
    run_folder.check_out_folder(run_dir)
    # A run folder's config.json goes through the one reader too: a hand-edited one, or one of
    # another version, is refused naming the field, never silently overwritten.
    if (run_dir / "config.json").is_file():
        config_file.read_config_file(run_dir / "config.json")
    resume_from = checkpoint_lib.latest_checkpoint(run_dir)
    if resume_from is not None and not cfg.resume:
        raise ConfigError(
            f"{run_dir} already holds checkpoints (latest: {resume_from.name}); pass --resume to "
            "continue that run, or another --out to start a new one"
        )
    resume_lines = check_resume(resume_from, cfg, model_cfg) if resume_from is not None else []
    init_from = diffusers_unet.resolve_source(cfg.init) if cfg.init else None
    if init_from is not None:
        check_same_shape(
            init_from, model_cfg, "pass --init a checkpoint trained with these model options"
        )
    bf16 = uses_bf16(cfg.precision, cfg.train_step, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    torch.manual_seed(cfg.seed)

    model = build_model(model_cfg)
    if init_from is not None and resume_from is None:  # stage 2 starts from stage 1's EMA weights
        diffusers_unet.load_state_into(model, init_from)
    model = model.to(device, memory_format=memory_format)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    perceptual_loss = build_perceptual_loss(cfg, model_cfg, schedule, ema, device, bf16)
    optimizer = build_optimizer(cfg, model.parameters(), device)
    start_step = 0
    if resume_from is not None:
        state = checkpoint_lib.load_training_state(resume_from, model, ema, optimizer)
        start_step = state["step"]
    online = model
    # The one side stream of a captured step: DDP is built on it, and TrainStep.capture warms up
    # and captures on it (it says why). None when the step is not captured: an eager DDP step
    # then runs on the stream DDP was built on.
    stream = torch.cuda.Stream(device) if captures_graph(cfg, device.type) else None
    if info.world_size > 1:
        online = wrap_ddp(model, device, stream)
    attention_backend = describe_attention(model_cfg.attention_backend, device)
    if cfg.compile:
        # Dynamo must not trace xformers' support checks (fastsp.attention): each attention
        # layer's kernel is chosen here, once, outside compiled code.
        networks = [model] + ([perceptual_loss.features.network] if perceptual_loss else [])
        dtype = torch.bfloat16 if bf16 else torch.float32  # what the layers see under autocast
        attention_backend = decide_attention(networks, device, dtype) or attention_backend
        online = torch.compile(online)
        if perceptual_loss is not None:
            features = perceptual_loss.features
            features.network = torch.compile(features.network)
    step = TrainStep(
        StepConfig.from_train(
            cfg,
            model_cfg,
            world_size=info.world_size,
            rank=info.rank,
            bf16=bf16,
            context_shape=dataset.context_shape if model_cfg.context_dim else None,
        ),
        model=model,
        online=online,
        ema=ema,
        optimizer=optimizer,
        schedule=schedule,
        perceptual_loss=perceptual_loss,
        device=device,
        # CFG dropout's context: the empty prompt's embedding of fastsp.prepare's shards
        null_context=getattr(dataset, "null_context", None),
        stream=stream,
    )
    graph_off = step.graph_unsupported_reasons() + ([] if cfg.cuda_graph else ["--no-cuda-graph"])
    backends = {
        "attention": attention_backend,
        "feature_mse": feature_mse_backend(device),
        "optimizer": describe_optimizer(optimizer, device),
        "precision": "bf16 autocast, fp32 master weights" if bf16 else "fp32",
        "compile": "torch.compile (online and perceptual networks)" if cfg.compile else "off",
        "cuda_graph": (
            "eager (" + "; ".join(graph_off) + ")"
            if graph_off
            else "to be captured at the first step"
        ),
        "graph_environment": (
            ", ".join(f"{name}={value}" for name, value in graph_env.items())
            + " (assigned for CUDA-graph capture of DDP)"
            if graph_env
            else "unchanged (no CUDA-graph capture with DDP on CUDA)"
        ),
    }
    return Run(
        cfg=cfg,
        model_cfg=model_cfg,
        info=info,
        run_dir=run_dir,
        dataset=dataset,
        model=model,
        ema=ema,
        optimizer=optimizer,
        perceptual_loss=perceptual_loss,
        step=step,
        start_step=start_step,
        resume_from=resume_from,
        init_from=init_from,
        backends=backends,
        data_lines=data_lines,
        resume_lines=resume_lines,
    )


def wrap_ddp(
    model: torch.nn.Module, device: torch.device, stream: torch.cuda.Stream | None
) -> DistributedDataParallel:
    """DDP around `model`, constructed on `stream` when given (PyTorch's CUDA-graph notes: a
    DDP backward to be captured needs DDP built on a side stream, the one the step is warmed up
    and captured on; see fastsp.step.TrainStep.capture)."""
    with torch.cuda.stream(stream):  # None: the current stream
        online = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if stream is not None:
        torch.cuda.current_stream().wait_stream(stream)
    return online


def write_backends(run: Run) -> None:
    if run.info.is_main:
        checkpoint_lib.atomic_write_text(
            run.run_dir / "backends.json", json.dumps(run.backends, indent=2) + "\n"
        )


def capture_step(run: Run, batch: dict[str, torch.Tensor], log=print) -> None:
    """Capture the step as one CUDA graph on its first batch, where the run asks for it and can
    (fastsp.step.TrainStep.capture logs why not); backends.json then says what happened."""
    if not (run.cfg.cuda_graph and run.info.device.type == "cuda"):
        return  # backends.json already says why the step runs eagerly
    # With DDP a failed capture stops the run (fastsp.errors.GraphCaptureError), on every rank: a
    # rank whose capture worked would otherwise wait in the graph's all-reduce for one that left.
    failed = None
    try:
        captured = run.step.capture(batch, log=log)
    except GraphCaptureError as error:
        failed = error
    if run.step.config.ddp and dist.any_rank(failed is not None):
        raise failed or GraphCaptureError(
            "CUDA graph capture of the DDP step failed on another rank (its error says why); "
            "rerun with --no-cuda-graph"
        )
    run.backends["cuda_graph"] = (
        "captured: the whole step replays as one CUDA graph"
        if captured
        else f"eager ({run.step.graph_error or 'capture is not supported here, see the log'})"
    )
    if run.run_dir.exists():
        write_backends(run)


def start_outputs(run: Run, config_text: str) -> MetricsWriter | None:
    """Rank 0: the run folder with config.json and backends.json, the metrics file, and the
    run's first lines (where it starts from, the objective, the model, the backends)."""
    if not run.info.is_main:
        return None
    cfg, run_dir = run.cfg, run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_lib.atomic_write_text(run_dir / "config.json", config_text)
    write_backends(run)
    metrics = MetricsWriter(run_dir, run.start_step)
    if cfg.resume and run.resume_from is None:
        print(f"--resume: no checkpoint in {run_dir} yet, starting fresh")
    if run.resume_from is not None:
        print(f"resuming from {run.resume_from} (step {run.start_step})")
        for line in run.resume_lines:
            print(line)
    elif run.init_from is not None:
        print(f"initialised from {run.init_from}")
    if run.perceptual_loss is not None:
        source = (
            "EMA of the online model"
            if cfg.perceptual_source == "ema"
            else (cfg.perceptual_checkpoint or cfg.init)
        )
        print(
            f"objective: self-perceptual at {cfg.perceptual_layers}, perceptual network: {source}"
        )
    params = sum(p.numel() for p in run.model.parameters())
    print(
        f"model: {params / 1e6:.2f}M parameters; data: {cfg.data} ({len(run.dataset)} items); "
        f"device: {run.info.device} x {run.info.world_size}"
    )
    for line in run.data_lines:
        print(line)
    for part, backend in run.backends.items():
        print(f"{part.replace('_', ' ')}: {backend}")
    return metrics


def save_step_checkpoint(run: Run, done: int, config_text: str) -> Path | None:
    """Every rank: rank 0 saves the checkpoint of step `done` (and prunes); a failed save stops
    every rank now, not at a collective's timeout. Returns the new checkpoint (rank 0)."""
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


def run_loop(run: Run) -> Path:
    """Train `run` from its start step to cfg.steps; returns the final checkpoint's folder.

    Rank 0 writes the run folder: config.json, backends.json, metrics.jsonl, sample grids and
    checkpoints. SIGTERM/SIGINT stop after the current step with a checkpoint (`Preempted`).
    """
    cfg, info, run_dir, train_step = run.cfg, run.info, run.run_dir, run.step
    ema, device, start_step = run.ema, run.info.device, run.start_step
    config_text = config_file.dumps(cfg, run.model_cfg)
    if start_step >= cfg.steps:  # e.g. --steps 5 --resume on a run at step 10
        if info.is_main:
            print(
                f"nothing to do: {run.resume_from} is at step {start_step} and --steps is "
                f"{cfg.steps}; {run_dir} is left as it was (pass a larger --steps to train on)"
            )
        return run.resume_from

    metrics = start_outputs(run, config_text)  # rank 0: the run folder and the first lines

    # ---- the loop ------------------------------------------------------------------------------
    batches = iter(
        make_loader(
            run.dataset,
            cfg.batch_size,
            info.rank,
            info.world_size,
            cfg.seed,
            start_step,
            cfg.num_workers,
        )
    )
    bad_items = 0  # items the data set substituted (--on-bad-data skip), counted on the host
    # Files found bad when the data set was built (--on-bad-data skip), left out of every epoch.
    bad_files = len(getattr(run.dataset, "bad_files", []))
    steps_since_log, log_start = 0, time.perf_counter()
    progress = tqdm(
        total=cfg.steps, initial=start_step, disable=not info.is_main, dynamic_ncols=True
    )
    final_checkpoint = run.resume_from
    # The entry points install the handlers at their start (fastsp.preemption); a caller of the
    # Python API gets them for the loop, and its own back afterwards.
    owns_handlers = not preemption.installed()
    stop_signal = preemption.install()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        use_deterministic_algorithms()
    try:
        for step in range(start_step, cfg.steps):
            batch = next(batches)
            bad_items += int(batch["bad"].sum()) if "bad" in batch else 0  # a CPU tensor
            if step == start_step:
                capture_step(run, batch, log=print if info.is_main else lambda message: None)
            # One step on the device (fastsp.step): randomness from (seed, step), forward,
            # perceptual pass, loss, backward, clip, fused AdamW (skipped if not finite), EMA.
            train_step.run(batch, step, learning_rate(cfg, step), 1.0 - ema_decay(cfg, step))

            done = step + 1
            steps_since_log += 1
            progress.update(1)
            checkpoint_now = done == cfg.steps or (
                cfg.checkpoint_every and done % cfg.checkpoint_every == 0
            )
            if done % cfg.log_every == 0 or checkpoint_now:
                totals = torch.stack(
                    [
                        train_step.loss_sum,
                        train_step.grad_norm_sum,
                        train_step.good_steps,
                        torch.tensor(float(bad_items), device=device),
                    ]
                )
                totals = dist.all_reduce_mean(totals)
                loss_value, grad_norm_value, good, bad_data = totals.tolist()
                # The longest run since the last log, so a run of K that ended between two
                # logs stops training too (each rank skips the same steps: DDP averages the
                # gradients before the finiteness check).
                worst_in_a_row = int(train_step.worst_bad_in_a_row.item())
                if worst_in_a_row >= cfg.max_bad_steps:
                    raise NumericalFault(
                        f"stopped at step {done}: {worst_in_a_row} consecutive steps had "
                        f"non-finite gradients (their updates were skipped); the last checkpoint "
                        f"({checkpoint_lib.latest_checkpoint(run_dir) or 'none yet'}) is intact. "
                        "Lower --lr, check the data for NaN/inf values, or raise --max-bad-steps"
                    )
                elapsed = time.perf_counter() - log_start
                images_per_s = cfg.batch_size * steps_since_log / elapsed
                if metrics is not None:
                    # means over the finite steps; null (not 0) for an interval without one
                    values = {
                        "loss": loss_value / good if good else None,
                        "lr": learning_rate(cfg, step),
                        "images_per_s": images_per_s,
                        "grad_norm": grad_norm_value / good if good else None,
                        "skipped_steps": steps_since_log - round(good),
                        "bad_items": round(bad_data * info.world_size),
                        "bad_files": bad_files,
                    }
                    metrics.write(done, values)
                    shown = "none" if values["loss"] is None else f"{values['loss']:.4f}"
                    progress.set_postfix(loss=shown, img_s=f"{images_per_s:.0f}")
                train_step.reset_metrics()
                bad_items = 0
                steps_since_log, log_start = 0, time.perf_counter()
            # SIGTERM / SIGINT on any rank: all ranks stop after this same step, with a checkpoint.
            preempted = (
                stop_signal.requested
                if info.world_size == 1
                else dist.any_rank(stop_signal.requested)
            )
            if checkpoint_now or preempted:
                final_checkpoint = save_step_checkpoint(run, done, config_text)
            kill_point(f"step:{done}")
            # Optional outputs after the checkpoint, so that they can never cost the training;
            # none once a stop is asked for.
            if (
                info.is_main
                and not preempted
                and (done == cfg.steps or (cfg.sample_every and done % cfg.sample_every == 0))
            ):
                write_samples(
                    run_dir / "samples" / f"step_{done:08d}.png", ema, cfg, run.dataset, device
                )
            if preempted:
                # Every rank says where it stopped before anyone exits (torchrun then terminates
                # the slower ranks as soon as one has exited).
                # One write per line: two ranks share torchrun's stderr, and print() writes the
                # text and its newline separately, so lines from different ranks interleave.
                sys.stderr.write(f"\nrank {info.rank}: stopping after step {done}\n")
                sys.stderr.flush()
                dist.barrier()
                raise Preempted(
                    f"stopped by {stop_signal.name or 'a signal to another rank'} after step "
                    f"{done}; checkpoint written: "
                    f"{checkpoint_lib.latest_checkpoint(run_dir)}. Continue with --resume"
                )
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        if owns_handlers:
            preemption.uninstall()
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


def train(cfg: TrainConfig, model_cfg: UNetConfig) -> Path:
    """Build and run (or resume) a training run; returns the final checkpoint's folder.

    The run folder is claimed first (fastsp.run_folder.claimed: made if new, locked by rank 0,
    RANK as torchrun sets it), so a second trainer on it stops before reading anything; a start
    that fails, or that a signal stops (fastsp.preemption), leaves no folder it made behind.
    """
    stop_before_training(agree=False)  # asked for during the imports: nothing is made yet
    check_out_and_data(cfg)  # before the claim, which would leave its lock file in the data
    with run_folder.claimed(cfg.out, is_main=os.environ.get("RANK", "0") == "0"):
        run = build_run(cfg, model_cfg)
        stop_before_training(agree=True)
        return run_loop(run)


def stop_before_training(agree: bool) -> None:
    """Raise Preempted if a stop was asked for (fastsp.preemption) before the first write;
    `agree`: on any rank (the process group is up), so that every rank stops."""
    stop = preemption.install() if preemption.installed() else None
    requested = stop is not None and stop.requested
    if agree:
        requested = dist.any_rank(requested)
    if requested:
        raise Preempted(
            f"stopped by {(stop and stop.name) or 'a signal to another rank'} before training "
            "started; nothing was written. Rerun the same command"
        )
