"""The plan of a run: everything decided before anything is built, computed once, writing nothing.

`plan_run(cfg, model_cfg)` refuses what cannot run (each refusal a ConfigError or CheckpointError
naming the problem and the fix), builds the data set and completes both configs from it, and
answers once whether the step is captured as a CUDA graph
(fastsp.training.graph_plan.plan_graph: the reasons and the environment it needs), its precision
and memory format, and where the weights come from (the checkpoint resumed from, the --init
source, the frozen perceptual network). The assembly (fastsp.training.assembly) and the loop take
the plan as it is.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from fastsp import checkpoint as checkpoint_lib
from fastsp import config_file, diffusers_unet, dist, run_folder
from fastsp.config import BUILTIN_DATA, DiTConfig, TrainConfig, UNetConfig
from fastsp.data import build_dataset, describe_data
from fastsp.diffusion import NoiseSchedule
from fastsp.errors import ConfigError
from fastsp.family_config import (
    DiffusersConfig,
    check_data,
    check_run,
    check_source,
    find_denoiser_folder,
)
from fastsp.flow import FlowProcess, process_from_config
from fastsp.latent_shards import LatentsDataset
from fastsp.step import memory_format, uses_bf16
from fastsp.training.graph_plan import GraphPlan, plan_graph
from fastsp.training.resume import check_resume, check_same_process, check_same_shape


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run decided, not yet built: `plan_run` makes it, the assembly and the loop read it."""

    cfg: TrainConfig  # completed from the data set (its channels, its context length)
    # completed from the data set (channels, classes, context)
    model_cfg: UNetConfig | DiTConfig | DiffusersConfig
    dataset: Any
    data_lines: tuple[str, ...]  # what the data holds, and which values are the data's own
    schedule: NoiseSchedule | FlowProcess  # the process (--diffusion)
    world_size: int  # torchrun's WORLD_SIZE, known before the process group starts
    device_type: str  # "cuda" or "cpu"
    bf16: bool  # bf16 autocast of the step's forwards (fastsp.step.uses_bf16)
    memory_format: torch.memory_format  # of the networks and the step's inputs
    graph: GraphPlan  # captured or not, why not, and the environment a captured DDP step needs
    run_dir: Path
    resume_from: Path | None  # the checkpoint a --resume continues, None for a fresh start
    resume_lines: tuple[str, ...]  # what the resume changes ("said" fields)
    init_from: Path | None  # the weights a fresh run starts from (--init)
    perceptual_from: Path | None  # the frozen perceptual network's weights (stage 2)
    lora_init_from: Path | None  # the adapter a fresh LoRA run starts from (--lora-init)
    # Stage 2's perceptual pass is the LoRA model with its adapters off (fastsp.lora), not a copy
    perceptual_adapters_off: bool

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The frozen perceptual network's dtype: bf16 under the fast step's bf16 autocast (half
        the weight traffic of its forwards, no per-step weight casts), else fp32."""
        return torch.bfloat16 if self.bf16 and self.cfg.train_step == "fast" else torch.float32


def plan_run(
    cfg: TrainConfig,
    model_cfg: UNetConfig | DiTConfig,
    *,
    world_size: int | None = None,
    device_type: str | None = None,
    read_sources: bool = True,
) -> Plan:
    """Validate everything that can fail on user input and decide the run; writes nothing.

    world_size, device_type: what the run will have (default: torchrun's WORLD_SIZE and
    fastsp.dist.pick_device(cfg.device)); the dry run passes one process on CUDA.
    read_sources: look at the run folder (checkpoints to resume, config.json) and at the --init
    and perceptual sources; the dry run reads nothing (random weights).
    The caller checks --out against the data folder first (`check_out_and_data`, before the run
    folder is claimed)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was requested but torch sees no CUDA device; use --device cpu"
        )
    if cfg.parallel == "fsdp":
        from fastsp.training.parallel import check_launch, check_memory_format

        check_memory_format(cfg.channels_last)
        if world_size is None:  # the dry run's ranks are fake ones (fastsp.dryrun_parallel)
            check_launch(cfg.parallel)
    world_size = dist.launched_world_size() if world_size is None else world_size
    device_type = device_type or dist.pick_device(cfg.device).type
    schedule = process_from_config(cfg)
    dataset = build_data(cfg, model_cfg)
    cfg, model_cfg, data_lines = complete_from_data(cfg, model_cfg, dataset)
    if isinstance(model_cfg, DiffusersConfig):
        check_run(cfg, model_cfg, cfg.resolution)
        check_data(model_cfg, getattr(dataset, "family", None), data_conditions(dataset))
    check_resolution(cfg, model_cfg)
    check_batch(cfg, world_size)
    check_optimizer(cfg, device_type)
    check_lora(cfg, model_cfg)
    run_dir = Path(cfg.out)
    resume_from = init_from = perceptual_from = lora_init_from = None
    resume_lines: list[str] = []
    if read_sources:
        run_folder.check_out_folder(run_dir)
        resume_from = find_resume(cfg, run_dir)
        if resume_from is not None:
            resume_lines = check_resume(resume_from, cfg, model_cfg)
        if cfg.init:
            fix = "pass --init a checkpoint trained with these model options"
            init_from = resolve_source(cfg.init, cfg, model_cfg, "--init", fix)
        if cfg.objective == "self_perceptual" and cfg.perceptual_source == "frozen":
            perceptual_from = resolve_source(
                cfg.perceptual_checkpoint or cfg.init,
                cfg,
                model_cfg,
                "the perceptual network",
                "the perceptual network must have the online model's shape: pass a checkpoint "
                "of it",
            )
        if cfg.lora_init:
            lora_init_from = Path(cfg.lora_init)
            if not lora_init_from.exists():
                raise ConfigError(
                    f"--lora-init {cfg.lora_init} does not exist; pass a fastsp LoRA checkpoint "
                    "or a diffusers LoRA file (pytorch_lora_weights.safetensors)"
                )
    return Plan(
        cfg=cfg,
        model_cfg=model_cfg,
        dataset=dataset,
        data_lines=tuple(data_lines),
        schedule=schedule,
        world_size=world_size,
        device_type=device_type,
        bf16=uses_bf16(cfg.precision, cfg.train_step, torch.device(device_type)),
        memory_format=memory_format(cfg.channels_last),
        graph=plan_graph(cfg, world_size, device_type),
        run_dir=run_dir,
        resume_from=resume_from,
        resume_lines=tuple(resume_lines),
        init_from=init_from,
        perceptual_from=perceptual_from,
        lora_init_from=lora_init_from,
        # the base of the LoRA model is --init's network, the frozen perceptual one unless
        # --perceptual-checkpoint names another; the reference step keeps its plain copy
        perceptual_adapters_off=cfg.lora_rank > 0
        and cfg.objective == "self_perceptual"
        and cfg.perceptual_source == "frozen"
        and cfg.train_step == "fast"
        and perceptual_from == init_from,
    )


def resolve_source(path: str, cfg: TrainConfig, model_cfg, what: str, fix: str) -> Path:
    """An --init / --perceptual-checkpoint path resolved (fastsp.diffusers_unet.resolve_source; a
    diffusers denoiser's model or pipeline folder with --model diffusers), refused when it holds
    a model of another shape or process."""
    if isinstance(model_cfg, DiffusersConfig) and find_denoiser_folder(path) is not None:
        folder = find_denoiser_folder(path)
        check_source(folder, model_cfg)
        return folder
    source = diffusers_unet.resolve_source(path)
    check_same_shape(source, model_cfg, fix)
    check_same_process(source, cfg, what)
    return source


def data_conditions(dataset) -> dict[str, Any]:
    """What a diffusers family checks the data set holds (fastsp.family_config.check_data)."""
    return {
        "channels": dataset.channels,
        "context_dim": dataset.context_shape[-1] if dataset.context_shape else 0,
        "pooled_dim": getattr(dataset, "pooled_dim", 0),
        "time_ids": getattr(dataset, "has_time_ids", False),
    }


def find_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue: the run folder's latest with --resume, None for a new run. A
    run folder's config.json goes through the one reader too: a hand-edited one, or one of
    another version, is refused naming the field, never silently overwritten."""
    if (run_dir / "config.json").is_file():
        config_file.read_config_file(run_dir / "config.json")
    latest = checkpoint_lib.latest_checkpoint(run_dir)
    if latest is not None and not cfg.resume:
        raise ConfigError(
            f"{run_dir} already holds checkpoints (latest: {latest.name}); pass --resume to "
            "continue that run, or another --out to start a new one"
        )
    return latest


def build_data(cfg: TrainConfig, model_cfg: UNetConfig | DiTConfig):
    """The training data set, refused where it cannot feed the configured conditioning."""
    synthetic = cfg.data == "synthetic" and cfg.data_format in ("auto", "synthetic")
    family = isinstance(model_cfg, DiffusersConfig)  # synthetic data holds what the module takes
    context_dim = model_cfg.context_dim if cfg.cond == "context" else 0
    if family and cfg.cond == "context":
        context_dim = model_cfg.context_width
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
        pooled_dim=model_cfg.pooled_dim if family else 0,
        time_ids=family and model_cfg.uses_time_ids,
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
    return dataset


def complete_from_data(
    cfg: TrainConfig, model_cfg: UNetConfig | DiTConfig, dataset
) -> tuple[TrainConfig, UNetConfig | DiTConfig, list[str]]:
    """Both configs with the values the data set decides, so that config.json records what the
    run trains on: the model's input channels, classes and context width; the run's channels
    and context length (digits and latent shards have their own channels, context shards their
    own length: --channels and --context-len apply to image folders and synthetic data). And
    the lines that say so, with what the data holds (fastsp.data.describe_data)."""
    given_context_dim = model_cfg.context_dim
    model_cfg = dataclasses.replace(
        model_cfg,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes if cfg.cond == "class" else 0,
        context_dim=dataset.context_shape[-1] if cfg.cond == "context" else 0,
    )
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
    if given_context_dim not in (0, model_cfg.context_dim) and model_cfg.context_dim:
        lines.append(
            f"context dim: {model_cfg.context_dim}, the data's own (--context-dim "
            f"{given_context_dim} applies to synthetic data only); config.json records "
            f"{model_cfg.context_dim}"
        )
    cfg = dataclasses.replace(cfg, **{name: v for name, (v, _) in decided.items()})
    return cfg, model_cfg, lines


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
    if isinstance(model_cfg, DiffusersConfig):  # fastsp.family_config.check_run
        return
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


def check_optimizer(cfg: TrainConfig, device_type: str) -> None:
    if cfg.optimizer != "apex_fused_adam":
        return
    reasons = []
    try:
        import apex.optimizers  # noqa: F401
    except ImportError as error:
        reasons.append(
            f"apex is not importable ({error}); build it from NVIDIA's source, not PyPI's 'apex'"
        )
    if device_type != "cuda":
        reasons.append("apex FusedAdam needs CUDA tensors")
    if reasons:
        raise ConfigError(
            "--optimizer apex_fused_adam cannot run: "
            + "; ".join(reasons)
            + ". Use --optimizer adamw"
        )


def check_lora(cfg: TrainConfig, model_cfg: UNetConfig | DiTConfig | DiffusersConfig) -> None:
    """LoRA options need --lora-rank, peft and targets the model has (fastsp.lora)."""
    if cfg.lora_rank == 0 and not (
        cfg.lora_alpha or cfg.lora_targets or cfg.lora_dropout or cfg.lora_init
    ):
        return
    try:
        from fastsp import lora
    except ImportError as error:
        raise ConfigError(f"--lora-rank needs peft ({error}); pip install 'fastsp[lora]'") from None
    lora.check_options(cfg, model_cfg)
