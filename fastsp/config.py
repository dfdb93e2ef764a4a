"""The training config: `TrainConfig` with the named presets (PRESETS) that fill in its defaults,
and `resolve`, which completes a preset with explicit options into validated configs.

A leaf module (the standard library, fastsp.errors and the other config modules only), so that a
checkpoint, the sampler or a data module can read and validate a configuration without importing
the model or the training objective. Its neighbours, each with one job:
- fastsp.config_fields: the option vocabularies, the field declaration `option(default, help,
  choices)`, the validators and the parsers of option values;
- fastsp.model_config: the model's shape (`UNetConfig`, `DiTConfig`) and its presets;
- fastsp.diffusers_unet_config: a diffusers UNet's config.json <-> UNetConfig;
- fastsp.config_file: config.json, written into the run folder and into every checkpoint;
- fastsp.config_cli: the command line (`--help`, `parse_args`).
A preset names one of the two models (MODEL_PRESETS) and overrides TrainConfig's defaults;
explicit options override it. Everything is validated before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fastsp.config_fields import (
    BETA_SCHEDULES,
    BUILTIN_DATA,
    CONDITIONINGS,
    DATA_FORMATS,
    DEVICES,
    DIFFUSIONS,
    DISTANCES,
    FEATURE_NORMS,
    FLOW_T_SAMPLING,
    MAY_CHANGE,
    MODEL_SOURCES,
    OBJECTIVES,
    ON_BAD_DATA,
    OPTIMIZERS,
    PARALLELS,
    PERCEPTUAL_SOURCES,
    PRECISIONS,
    PREDICTED_NOISE,
    PREDICTION_TYPES,
    SAID,
    SAME,
    SAMPLERS,
    TRAIN_STEPS,
    added_option,
    check_objective_options,
    check_process_options,
    check_reference_step,
    option,
    parse_layers,
    parse_perceptual_on_t,
    parse_perceptual_t,
    refuse_eps_at_zero_terminal_snr,
    require,
    require_bool,
    require_choice,
    require_int,
    require_number,
    require_str,
)
from fastsp.diffusers_unet_config import init_model_config
from fastsp.errors import ConfigError
from fastsp.family_config import diffusers_model_config
from fastsp.model_config import MODEL_PRESETS, DiTConfig, UNetConfig, check_model_options

# The bounds of --resolution and --seed (the reasons are at their checks in TrainConfig)
MAX_RESOLUTION = 4096
MAX_SEED = 2**32 - 1

# The presets. Each builds the model preset of its name (fastsp.model_config.MODEL_PRESETS) and
# overrides TrainConfig's defaults. `digits` is the CPU demo and the default; `tiny` is for tests;
# `sd21` is the Stable Diffusion 2.1-base UNet for GPU benchmarks (synthetic latents and context
# unless --data is set).
DEFAULT_PRESET = "digits"
# What tiny and dit_tiny share: a short run on the CPU, for tests.
_TEST_RUN: dict[str, Any] = dict(
    resolution=8,
    batch_size=8,
    steps=20,
    lr=1e-3,
    lr_warmup_steps=0,
    log_every=5,
    checkpoint_every=0,
    sample_every=0,
    sample_num=16,
    sample_steps=4,
)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(_TEST_RUN, out="runs/tiny"),
    "digits": dict(out="runs/digits"),
    "sd21": dict(
        data="synthetic",
        resolution=64,
        channels=4,
        cond="context",
        batch_size=32,
        steps=1000,
        lr=1e-4,
        lr_warmup_steps=500,
        weight_decay=0.01,
        ema_decay=0.9999,
        channels_last=True,
        checkpoint_every=0,
        sample_every=0,
        sample_num=4,
        out="runs/sd21",
    ),
    # The DiT (fastsp.dit) on the same footing: dit_tiny for tests, dit_digits the CPU demo, and
    # the paper's shapes on synthetic 32x32x4 latents with class labels for GPU benchmarks.
    "dit_tiny": dict(_TEST_RUN, out="runs/dit_tiny"),
    "dit_digits": dict(lr=3e-4, out="runs/dit_digits"),
    **{
        name: dict(
            data="synthetic",
            resolution=32,
            channels=4,
            cond="class",
            batch_size=32,
            steps=1000,
            lr=1e-4,
            lr_warmup_steps=0,
            ema_decay=0.9999,
            checkpoint_every=0,
            sample_every=0,
            sample_num=4,
            out=f"runs/{name}",
        )
        for name in ("dit_s2", "dit_b2", "dit_l2", "dit_xl2")
    },
}


@dataclass
class TrainConfig:
    """Everything a training run needs, besides the model's shape (`UNetConfig`, `DiTConfig`)."""

    # resume: only the defaults; the resolved fields are compared
    preset: str = option(
        DEFAULT_PRESET,
        "the named defaults that explicit options override",
        tuple(PRESETS),
        resume=MAY_CHANGE,
    )
    # data
    data: str = option(
        "digits",
        "training data: digits or letters (built in; letters needs matplotlib), synthetic, or a "
        "folder of images or latents",
        resume=SAME,
    )
    data_format: str = option(
        "auto",
        "how to read --data; auto tells latent shards from images",
        DATA_FORMATS,
        resume=SAME,
    )
    resolution: int = option(16, "image (or latent) side length the model trains at", resume=SAME)
    channels: int = option(
        1, "image folders: 1 = grayscale, 3 = RGB; synthetic data: any", resume=SAME
    )
    latent_scale: float = option(
        1.0,
        "multiplies latents of hand-made shards (raw SD VAE latents: 0.18215); must stay 1 for "
        "fastsp.prepare's shards, which carry the VAE's factor already (metadata.json)",
        resume=SAME,
    )
    random_flip: bool = option(
        True, "horizontal flips for image folders (never for digits)", resume=SAME
    )
    num_workers: int = option(
        0, "DataLoader worker processes per rank (0 = the main process)", resume=MAY_CHANGE
    )
    # resume: what a file that went bad does; the data's rule stays
    on_bad_data: str = option(
        "stop",
        "an unreadable image or shard: stop with its name, or skip it",
        ON_BAD_DATA,
        resume=MAY_CHANGE,
    )
    # conditioning
    cond: str = option(
        "class",
        "conditioning: none, class labels (with a null label), or a context (cross-attention)",
        CONDITIONINGS,
        resume=SAME,
    )
    label_dropout: float = option(
        0.1,
        "probability that a label (or context) is replaced by the null one (for CFG)",
        resume=SAME,
    )
    context_len: int = option(77, "context sequence length of synthetic context data", resume=SAME)
    # diffusion (PAPER.md: scaled-linear betas, zero terminal SNR, v-prediction) or flow
    diffusion: str = added_option("ddpm", "the process (flow: rectified flow)", DIFFUSIONS)
    beta_schedule: str = option(
        "scaled_linear",
        "the beta schedule (the paper: scaled_linear)",
        BETA_SCHEDULES,
        resume=SAME,
    )
    num_timesteps: int = option(1000, "timesteps T (flow: the model sees sigma T)", resume=SAME)
    beta_start: float = option(0.00085, "the first beta (cosine ignores it)", resume=SAME)
    beta_end: float = option(
        0.012, "the last beta before the rescale (cosine ignores it)", resume=SAME
    )
    zero_terminal_snr: bool = option(
        True,
        "rescale the schedule so that its last timestep is pure noise (the paper)",
        resume=SAME,
    )
    prediction_type: str = option(
        "v", "what the network predicts (the paper: v)", PREDICTION_TYPES, resume=SAME
    )
    # rectified flow (fastsp.flow)
    flow_shift: float = added_option(1.0, "flow: timestep shift s (SD3: 3; 1 = none)")
    flow_dynamic_shift: bool = added_option(False, "flow: Flux's shift from the resolution")
    flow_t_sampling: str = added_option("uniform", "flow: the draw of t", FLOW_T_SAMPLING)
    flow_logit_mean: float = added_option(0.0, "flow: the logit-normal's mean")
    flow_logit_std: float = added_option(1.0, "flow: the logit-normal's std")
    model: str = added_option("fastsp", "fastsp: the preset's; diffusers: --init's", MODEL_SOURCES)
    guidance: float = added_option(1.0, "Flux's guidance value (dev: 3.5)")
    # objective (PAPER.md: stage 1 trains with mse, stage 2 with self_perceptual)
    objective: str = option(
        "mse",
        "the loss: mse (stage 1), self_perceptual (stage 2, needs --init) or model_guidance",
        OBJECTIVES,
        resume=SAME,
    )
    # resume: stage 2's frozen perceptual network unless perceptual_checkpoint names one
    init: str = option(
        "",
        "checkpoint or run folder whose EMA weights start the model, or a diffusers UNet or "
        "pipeline folder (its config.json sets the architecture) ('' = random weights)",
        resume=SAME,
    )
    perceptual_checkpoint: str = option(
        "",
        "the frozen perceptual network: a checkpoint, run, or diffusers UNet or pipeline folder "
        "('' = the --init checkpoint)",
        resume=SAME,
    )
    perceptual_source: str = option(
        "frozen",
        "the perceptual network: frozen (a checkpoint; the paper) or ema (the online EMA)",
        PERCEPTUAL_SOURCES,
        resume=SAME,
    )
    perceptual_layers: str = option(
        "mid",
        "feature taps and their weights, e.g. mid or mid:1,down2:0.5",
        resume=SAME,
    )
    perceptual_t: str = option(
        "uniform",
        "t' per example: uniform (the paper), same, or LOW,HIGH (inclusive)",
        resume=SAME,
    )
    predicted_noise: str = option(
        "eps_hat",
        "what re-noises x0_hat: eps_hat (the paper) or the true eps",
        PREDICTED_NOISE,
        resume=SAME,
    )
    distance: str = option("l2", "the feature distance (the paper: l2)", DISTANCES, resume=SAME)
    mse_weight: float = option(
        0.0,
        "weight of the ordinary MSE loss added to the self-perceptual one",
        resume=SAME,
    )
    perceptual_on_t: str = option(
        "all",
        "online timesteps where the self-perceptual loss applies: all (the paper) or LOW,HIGH "
        "(inclusive); each example outside the range gets the MSE loss instead",
        resume=SAME,
    )
    perceptual_norm: str = added_option(
        "none", "features scaled by the real branch's: channel (LPL) or energy", FEATURE_NORMS
    )
    # model guidance (fastsp.model_guidance, arXiv 2502.12154)
    mg_scale: float = added_option(0.45, "model guidance's w in [0, 1) (the authors' 0.45)")
    mg_t_max: float = added_option(0.75, "model guidance only where t / T <= this (1: all t)")
    # LoRA (fastsp.lora): adapters on the frozen --init weights
    lora_rank: int = added_option(0, "LoRA adapter rank (0: off, every weight trains)")
    lora_alpha: float = added_option(0.0, "LoRA scale alpha: W + alpha/rank B A (0: the rank)")
    lora_targets: str = added_option(
        "", "layers given adapters, comma-separated name suffixes ('': attention, feed-forward)"
    )
    lora_dropout: float = added_option(0.0, "dropout on the LoRA adapters' input")
    lora_init: str = added_option(
        "", "adapter to start from: a fastsp LoRA checkpoint or a diffusers LoRA file"
    )
    # optimisation
    steps: int = option(3000, "optimizer steps", resume=MAY_CHANGE)
    batch_size: int = option(
        64,
        "global batch: summed over ranks and gradient-accumulation micro-steps",
        resume=SAME,
    )
    # resume: the same global batch in more or fewer micro-steps
    grad_accum: int = option(
        1, "gradient-accumulation micro-steps per optimizer step", resume=MAY_CHANGE
    )
    lr: float = option(1e-3, "peak learning rate, reached after the warm-up", resume=SAID)
    lr_warmup_steps: int = option(
        100, "steps of linear warm-up from 0 to lr (0 = none)", resume=SAID
    )
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay", resume=SAME)
    adam_beta1: float = option(
        0.9, "AdamW's beta1 (decay of the gradient's running mean)", resume=SAME
    )
    adam_beta2: float = option(
        0.999, "AdamW's beta2 (decay of the squared gradient's mean)", resume=SAME
    )
    adam_eps: float = option(1e-8, "AdamW's epsilon (added to the denominator)", resume=SAME)
    # resume: another optimizer's state
    optimizer: str = option(
        "adamw",
        "adamw (torch's; fused kernel on CUDA) or apex_fused_adam (needs apex)",
        OPTIMIZERS,
        resume=SAME,
    )
    grad_clip: float = option(1.0, "max global gradient norm (0 = no clipping)", resume=SAME)
    max_bad_steps: int = option(
        10,
        "stop after this many consecutive non-finite steps (each one is skipped)",
        resume=MAY_CHANGE,
    )
    # resume: the EMA is the model that samples
    ema_decay: float = option(
        0.999, "decay of the weights' EMA, the weights samples use", resume=SAME
    )
    # execution
    device: str = option("auto", "auto = cuda when available, else cpu", DEVICES, resume=MAY_CHANGE)
    precision: str = option(
        "auto", "auto = bf16 autocast on CUDA, fp32 on CPU", PRECISIONS, resume=MAY_CHANGE
    )
    channels_last: bool = option(
        False, "channels_last memory format for the model and its inputs", resume=MAY_CHANGE
    )
    # resume: fast and reference compute the same update
    train_step: str = option(
        "fast",
        "fast (fastsp.step) or reference (the naive oracle, fp32 eager)",
        TRAIN_STEPS,
        resume=MAY_CHANGE,
    )
    cuda_graph: bool = option(
        True, "capture the whole fast step as one CUDA graph (CUDA only)", resume=MAY_CHANGE
    )
    compile: bool = option(
        False, "torch.compile the online and perceptual networks", resume=MAY_CHANGE
    )
    parallel: str = added_option(
        "ddp", "data parallel: ddp (replicas) or fsdp (FSDP2, sharded)", PARALLELS
    )
    batched_branches: bool = option(
        False,
        "run the real and predicted perceptual branches as one forward",
        resume=MAY_CHANGE,
    )
    seed: int = option(0, "the seed of every random draw of the run", resume=SAME)
    deterministic: bool = option(
        False,
        "torch's deterministic algorithms (bit-identical reruns on CUDA)",
        resume=MAY_CHANGE,
    )
    # outputs
    # resume: a run folder copied elsewhere
    out: str = option(
        "runs/digits", "run folder: config, metrics, samples, checkpoints", resume=MAY_CHANGE
    )
    resume: bool = option(
        False,
        "continue from the run folder's latest checkpoint (a fresh start if none)",
        resume=MAY_CHANGE,
    )
    log_every: int = option(
        50, "steps between metric lines (the only host syncs of the loop)", resume=MAY_CHANGE
    )
    checkpoint_every: int = option(
        1000, "steps between checkpoints (0 = only the one at the end)", resume=MAY_CHANGE
    )
    keep_last: int = option(
        0,
        "keep only the newest K checkpoints (0 = keep all; the newest never goes)",
        resume=MAY_CHANGE,
    )
    sample_every: int = option(
        1000, "steps between sample grids (0 = only the one at the end)", resume=MAY_CHANGE
    )
    sample_num: int = option(64, "images in a sample grid", resume=MAY_CHANGE)
    sample_steps: int = option(50, "sampler steps for sample grids", resume=MAY_CHANGE)
    sample_sampler: str = option("ddim", "the sampler of sample grids", SAMPLERS, resume=MAY_CHANGE)
    sample_cfg: float = option(
        1.0,
        "classifier-free guidance scale of sample grids (1 = no guidance)",
        resume=MAY_CHANGE,
    )
    sample_cfg_rescale: float = option(
        0.0, "CFG rescale phi of sample grids (0 = none)", resume=MAY_CHANGE
    )

    def __post_init__(self):
        # Each field alone first (type, finiteness, range), so the cross-field rules below can
        # compare values without tripping over a string or a NaN.
        require_choice("preset", self.preset, tuple(PRESETS))
        # data
        require_str(self, "data", "a data set name (digits, synthetic) or a folder path")
        require_choice("data_format", self.data_format, DATA_FORMATS)
        # The upper bound catches a typo before it reaches the allocator (100000 asks for a 60 TB
        # activation); 4096 is far above the sizes diffusion UNets train at (SD's latents: 64-128).
        require_int(self, "resolution", 1, MAX_RESOLUTION)
        require_int(self, "channels", 1, note=" (image folders: 1 or 3)")
        require_number(self, "latent_scale", 0, low_open=True)
        require_bool(self, "random_flip")
        require_int(self, "num_workers", 0, note=" (0 loads in the main process)")
        require_choice("on_bad_data", self.on_bad_data, ON_BAD_DATA)
        # conditioning
        require_choice("cond", self.cond, CONDITIONINGS)
        require_number(self, "label_dropout", 0, 1, high_open=True, what="a probability")
        require_int(self, "context_len", 1)
        # diffusion: a schedule needs two timesteps (zero terminal SNR pins the last one to
        # alpha_bar = 0 and rescales from the first)
        require_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        require_int(self, "num_timesteps", 2, note=" (a schedule needs 2 timesteps or more)")
        require_number(self, "beta_start", 0, 1, low_open=True, high_open=True)
        require_number(
            self, "beta_end", self.beta_start, 1, high_open=True, note=" (beta_start <= beta_end)"
        )
        require_bool(self, "zero_terminal_snr")
        require_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_process_options(self)
        # objective
        require_choice("objective", self.objective, OBJECTIVES)
        require_str(
            self,
            "init",
            "a checkpoint, run or diffusers UNet folder path, or '' for random weights",
            empty_ok=True,
        )
        require_str(
            self,
            "perceptual_checkpoint",
            "a checkpoint, run or diffusers UNet folder path, or '' for the --init checkpoint",
            empty_ok=True,
        )
        require_choice("perceptual_source", self.perceptual_source, PERCEPTUAL_SOURCES)
        self._check_perceptual_layers()
        require_str(self, "perceptual_t", "'uniform', 'same' or 'LOW,HIGH'")
        require_str(self, "perceptual_on_t", "'all' or 'LOW,HIGH'")
        require_choice("predicted_noise", self.predicted_noise, PREDICTED_NOISE)
        require_choice("distance", self.distance, DISTANCES)
        require_number(self, "mse_weight", 0)
        check_objective_options(self)
        require_choice("model", self.model, MODEL_SOURCES)
        require_number(self, "guidance", 0)
        require_int(self, "lora_rank", 0, note=" (0: no adapters)")
        require_number(self, "lora_alpha", 0, note=" (0: the rank)")
        require_str(self, "lora_targets", "comma-separated layer names", empty_ok=True)
        require_number(self, "lora_dropout", 0, 1, high_open=True, what="a probability")
        require_str(self, "lora_init", "an adapter path, or ''", empty_ok=True)
        # optimisation
        for name in ("steps", "batch_size", "grad_accum"):
            require_int(self, name, 1)
        require_number(self, "lr", 0, low_open=True)
        require_int(self, "lr_warmup_steps", 0, note=" (0 disables)")
        require_number(self, "weight_decay", 0)
        require_number(self, "adam_beta1", 0, 1, high_open=True)
        require_number(self, "adam_beta2", 0, 1, high_open=True)
        require_number(self, "adam_eps", 0, low_open=True)
        require_choice("optimizer", self.optimizer, OPTIMIZERS)
        require_number(self, "grad_clip", 0, note=" (0 disables clipping)")
        require_int(self, "max_bad_steps", 1)
        require_number(self, "ema_decay", 0, 1, high_open=True)
        # execution
        require_choice("device", self.device, DEVICES)
        require_choice("precision", self.precision, PRECISIONS)
        require_bool(self, "channels_last")
        require_choice("train_step", self.train_step, TRAIN_STEPS)
        require_choice("parallel", self.parallel, PARALLELS)
        for name in ("cuda_graph", "compile", "batched_branches", "deterministic"):
            require_bool(self, name)
        # The step's generator is seeded with seed * 1_000_003 + step, which must fit torch's
        # 64-bit seed; numpy's 32-bit seed range is the usual convention and fits with room.
        require_int(self, "seed", 0, MAX_SEED)
        # outputs
        require_str(self, "out", "a run folder path")
        require_bool(self, "resume")
        require_int(self, "log_every", 1)
        for name in ("checkpoint_every", "keep_last", "sample_every"):
            require_int(self, name, 0, note=" (0 disables)")
        require_int(self, "sample_num", 1)
        # the sampler spaces sample_steps distinct timesteps over the schedule
        require_int(self, "sample_steps", 1, self.num_timesteps, note=" (at most num_timesteps)")
        require_choice("sample_sampler", self.sample_sampler, SAMPLERS)
        require_number(self, "sample_cfg", 0, note=" (1 = no guidance)")
        require_number(self, "sample_cfg_rescale", 0, 1)
        self._check_combinations()

    def _check_perceptual_layers(self) -> None:
        require_str(self, "perceptual_layers", "layer names with weights, e.g. 'mid:1,down2:0.5'")
        try:
            layers = parse_layers(self.perceptual_layers)
        except ValueError as error:
            raise ConfigError(
                f"invalid value {self.perceptual_layers!r} for perceptual_layers: {error}"
            ) from None
        # parse_layers takes float("nan") and float("inf") as weights; either makes the loss NaN
        require(
            self,
            "perceptual_layers",
            all(math.isfinite(w) for w in layers.values()),
            "layer names with finite weights >= 0, e.g. 'mid' or 'mid:1,down2:0.5'",
        )

    def _check_combinations(self) -> None:
        """Rules between fields; each message names the field to change."""
        if self.data_format in BUILTIN_DATA and self.data != self.data_format:
            require(
                self,
                "data",
                False,
                f"{self.data_format!r} with --data-format {self.data_format} (built in, it reads "
                "no files); pass --data-format auto for a folder",
            )
        if self.data_format == "images" and self.channels not in (1, 3):
            # fastsp.data.ImageFolderDataset raises the same for an auto-detected image folder
            require(
                self,
                "channels",
                False,
                "1 (grayscale) or 3 (RGB) for an image folder; pass --channels 1 or --channels 3 "
                "(other counts need latent shards or --data synthetic)",
            )
        if self.sample_cfg != 1 and self.cond == "none":
            # else the final grid would fail after every step of training
            raise ConfigError(
                f"--sample-cfg {self.sample_cfg} needs a conditional model (guidance contrasts "
                "the conditional and the unconditional prediction), but --cond none trains an "
                "unconditional one; pass --sample-cfg 1, or --cond class or --cond context"
            )
        try:  # flow's model time reaches T itself (sigma = 1): ranges up to T
            count = self.num_timesteps + (self.diffusion == "flow")
            parse_perceptual_t(self.perceptual_t, count)
            parse_perceptual_on_t(self.perceptual_on_t, count)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.objective == "self_perceptual" and not self.init:
            # PAPER.md: stage 2 fine-tunes a stage-1 model; from random weights the perceptual
            # loss alone does not train a usable model.
            raise ConfigError(
                "--objective self_perceptual needs a stage-1 (MSE) model to start from: pass "
                "--init CHECKPOINT (it starts the online model and, unless "
                "--perceptual-checkpoint names another, is the frozen perceptual network)"
            )
        if self.perceptual_source == "ema" and self.perceptual_checkpoint:
            # the trainer would silently ignore the checkpoint
            raise ConfigError(
                f"--perceptual-checkpoint {self.perceptual_checkpoint!r} is only read with "
                "--perceptual-source frozen; drop it, or pass --perceptual-source frozen"
            )
        if self.train_step == "reference":
            check_reference_step(self)
        refuse_eps_at_zero_terminal_snr(self.prediction_type, self.zero_terminal_snr, cli=True)


def resolve(
    preset: str, train_overrides: dict[str, Any], model_overrides: dict[str, Any]
) -> tuple[TrainConfig, UNetConfig | DiTConfig]:
    """Preset defaults, then explicit overrides; both dataclasses validate on construction."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    try:
        train = TrainConfig(**{**PRESETS[preset], **train_overrides, "preset": preset})
        if train.model == "diffusers":  # the folder's config.json is the architecture
            return train, diffusers_model_config(train, model_overrides)
        base = init_model_config(train.init, model_overrides) or MODEL_PRESETS[preset]
        check_model_options(preset, base, model_overrides)
        model = dataclasses.replace(base, **model_overrides)
    except ValueError as error:  # every refusal reads as a ConfigError
        raise ConfigError(str(error)) from None
    return train, model
