"""Typed training configuration, named presets, and the command-line layer over them.

One flat dataclass holds every training field; the UNet's architecture is its own dataclass
(`fastsp.unet.UNetConfig`). On the command line every field of both is `--field-name VALUE`
(booleans: `--field-name` / `--no-field-name`; tuples: comma-separated). A preset fills in the
defaults; explicit options override it. Everything is validated before any work starts, and the
resolved configuration is written into the run folder and into every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import numbers
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any

from fastsp.diffusion import BETA_SCHEDULES, PREDICTION_TYPES, SAMPLERS
from fastsp.perceptual import DISTANCES, PREDICTED_NOISE, parse_layers, parse_perceptual_t
from fastsp.unet import UNET_PRESETS, UNetConfig


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field, the value and what's allowed."""


CONDITIONINGS = ("none", "class", "context")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "apex_fused_adam")
TRAIN_STEPS = ("fast", "reference")
OBJECTIVES = ("mse", "self_perceptual")
PERCEPTUAL_SOURCES = ("frozen", "ema")
DATA_FORMATS = ("auto", "digits", "images", "latents", "synthetic")
ON_BAD_DATA = ("stop", "skip")  # what a bad file does: stop the run, or leave the file out
MAX_RESOLUTION = 4096
MAX_SEED = 2**32 - 1


@dataclass
class TrainConfig:
    """Everything a training run needs, besides the UNet's shape (see `UNetConfig`)."""

    preset: str = "digits"  # the preset these values started from (informational once resolved)
    # data
    data: str = "digits"  # "digits" (built in), "synthetic", or a folder of images / latent shards
    data_format: str = "auto"  # how to read `data`; auto detects latents vs images
    resolution: int = 16  # image (or latent) side length the model trains at
    channels: int = 1  # image folders: 1 = grayscale, 3 = RGB; synthetic data: any (sd21: 4)
    latent_scale: float = 1.0  # multiplies latents read from shards (SD's VAE: 0.18215)
    random_flip: bool = True  # horizontal flips for image folders (never for digits)
    num_workers: int = 0  # DataLoader worker processes per rank
    on_bad_data: str = "stop"  # an unreadable image or shard: stop with its name, or skip it
    # conditioning
    cond: str = "class"  # none | class (labels, with a null label) | context (cross-attention)
    label_dropout: float = 0.1  # probability a label (or context) is replaced by the null one (CFG)
    context_len: int = 77  # context sequence length for synthetic context data
    # diffusion (PAPER.md: scaled-linear betas, zero terminal SNR, v-prediction)
    beta_schedule: str = "scaled_linear"
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = True
    prediction_type: str = "v"
    # objective (PAPER.md: stage 1 trains with mse, stage 2 with self_perceptual)
    objective: str = "mse"  # mse | self_perceptual
    init: str = ""  # checkpoint or run folder whose EMA weights start the model ("" = random)
    perceptual_checkpoint: str = ""  # the frozen perceptual network ("" = the --init checkpoint)
    perceptual_source: str = "frozen"  # frozen (a checkpoint; the paper) | ema (the online EMA)
    perceptual_layers: str = "mid"  # feature taps and weights, e.g. "mid" or "mid:1,down2:0.5"
    perceptual_t: str = "uniform"  # t' per example: uniform | same | LOW,HIGH (inclusive)
    predicted_noise: str = "eps_hat"  # re-noise x0_hat with eps_hat (the paper) or the true eps
    distance: str = "l2"  # feature distance: l2 (the paper) | l1
    mse_weight: float = 0.0  # weight of the ordinary MSE loss added to the self-perceptual one
    # optimisation
    steps: int = 3000  # optimizer steps
    batch_size: int = 64  # global batch: summed over ranks and gradient-accumulation micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3
    lr_warmup_steps: int = 100  # linear warm-up from 0 to lr
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    optimizer: str = "adamw"  # adamw (torch; fused kernel on CUDA) | apex_fused_adam (needs apex)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    max_bad_steps: int = 10  # stop after this many consecutive non-finite steps (each skipped)
    ema_decay: float = 0.999  # EMA of the weights, used for samples
    # execution
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = False  # channels_last memory format for the model and its inputs
    train_step: str = "fast"  # fast (fastsp.step) | reference (the naive oracle, fp32 eager)
    cuda_graph: bool = True  # capture the whole fast step as one CUDA graph (CUDA only)
    compile: bool = False  # torch.compile the online and perceptual networks
    batched_branches: bool = False  # real + predicted perceptual branches in one forward
    seed: int = 0
    deterministic: bool = False  # torch's deterministic algorithms (bit-identical reruns on CUDA)
    # outputs
    out: str = "runs/digits"  # run folder: config, metrics, samples, checkpoints
    resume: bool = False  # continue from the run folder's latest checkpoint (fresh if none)
    log_every: int = 50  # steps between metric lines (the only host syncs of the loop)
    checkpoint_every: int = 1000  # steps between checkpoints; one is always written at the end
    keep_last: int = 0  # keep only the newest K checkpoints (0 keeps all; the newest never goes)
    sample_every: int = 1000  # steps between sample grids; one is always written at the end
    sample_num: int = 64  # images in a sample grid
    sample_steps: int = 50  # sampler steps for sample grids
    sample_sampler: str = "ddim"  # ddim | euler
    sample_cfg: float = 1.0  # classifier-free guidance scale for sample grids (1 = none)
    sample_cfg_rescale: float = 0.0  # CFG rescale phi for sample grids

    def __post_init__(self):
        # Each field alone first (type, finiteness, range), so the cross-field rules below can
        # compare values without tripping over a string or a NaN.
        _require_choice("preset", self.preset, tuple(PRESETS))
        # data
        _require_str(self, "data", "a data set name (digits, synthetic) or a folder path")
        _require_choice("data_format", self.data_format, DATA_FORMATS)
        # The upper bound catches a typo before it reaches the allocator (100000 asks for a 60 TB
        # activation); 4096 is far above the sizes diffusion UNets train at (SD's latents: 64-128).
        _require_int(self, "resolution", 1, MAX_RESOLUTION)
        _require_int(self, "channels", 1, note=" (image folders: 1 or 3)")
        _require_number(self, "latent_scale", 0, low_open=True)
        _require_bool(self, "random_flip")
        _require_int(self, "num_workers", 0, note=" (0 loads in the main process)")
        _require_choice("on_bad_data", self.on_bad_data, ON_BAD_DATA)
        # conditioning
        _require_choice("cond", self.cond, CONDITIONINGS)
        _require_number(self, "label_dropout", 0, 1, high_open=True, what="a probability")
        _require_int(self, "context_len", 1)
        # diffusion: a schedule needs two timesteps (zero terminal SNR pins the last one to
        # alpha_bar = 0 and rescales from the first)
        _require_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _require_int(self, "num_timesteps", 2, note=" (a schedule needs 2 timesteps or more)")
        _require_number(self, "beta_start", 0, 1, low_open=True, high_open=True)
        _require_number(
            self, "beta_end", self.beta_start, 1, high_open=True, note=" (beta_start <= beta_end)"
        )
        _require_bool(self, "zero_terminal_snr")
        _require_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        # objective
        _require_choice("objective", self.objective, OBJECTIVES)
        _require_str(
            self, "init", "a checkpoint or run folder path, or '' for random weights", empty_ok=True
        )
        _require_str(
            self,
            "perceptual_checkpoint",
            "a checkpoint or run folder path, or '' for the --init checkpoint",
            empty_ok=True,
        )
        _require_choice("perceptual_source", self.perceptual_source, PERCEPTUAL_SOURCES)
        self._check_perceptual_layers()
        _require_str(self, "perceptual_t", "'uniform', 'same' or 'LOW,HIGH'")
        _require_choice("predicted_noise", self.predicted_noise, PREDICTED_NOISE)
        _require_choice("distance", self.distance, DISTANCES)
        _require_number(self, "mse_weight", 0)
        # optimisation
        for name in ("steps", "batch_size", "grad_accum"):
            _require_int(self, name, 1)
        _require_number(self, "lr", 0, low_open=True)
        _require_int(self, "lr_warmup_steps", 0, note=" (0 disables)")
        _require_number(self, "weight_decay", 0)
        _require_number(self, "adam_beta1", 0, 1, high_open=True)
        _require_number(self, "adam_beta2", 0, 1, high_open=True)
        _require_number(self, "adam_eps", 0, low_open=True)
        _require_choice("optimizer", self.optimizer, OPTIMIZERS)
        _require_number(self, "grad_clip", 0, note=" (0 disables clipping)")
        _require_int(self, "max_bad_steps", 1)
        _require_number(self, "ema_decay", 0, 1, high_open=True)
        # execution
        _require_choice("device", self.device, DEVICES)
        _require_choice("precision", self.precision, PRECISIONS)
        _require_bool(self, "channels_last")
        _require_choice("train_step", self.train_step, TRAIN_STEPS)
        for name in ("cuda_graph", "compile", "batched_branches", "deterministic"):
            _require_bool(self, name)
        # The step's generator is seeded with seed * 1_000_003 + step, which must fit torch's
        # 64-bit seed; numpy's 32-bit seed range is the usual convention and fits with room.
        _require_int(self, "seed", 0, MAX_SEED)
        # outputs
        _require_str(self, "out", "a run folder path")
        _require_bool(self, "resume")
        _require_int(self, "log_every", 1)
        for name in ("checkpoint_every", "keep_last", "sample_every"):
            _require_int(self, name, 0, note=" (0 disables)")
        _require_int(self, "sample_num", 1)
        # the sampler spaces sample_steps distinct timesteps over the schedule
        _require_int(self, "sample_steps", 1, self.num_timesteps, note=" (at most num_timesteps)")
        _require_choice("sample_sampler", self.sample_sampler, SAMPLERS)
        _require_number(self, "sample_cfg", 0, note=" (1 = no guidance)")
        _require_number(self, "sample_cfg_rescale", 0, 1)
        self._check_combinations()

    def _check_perceptual_layers(self) -> None:
        _require_str(self, "perceptual_layers", "layer names with weights, e.g. 'mid:1,down2:0.5'")
        try:
            layers = parse_layers(self.perceptual_layers)
        except ValueError as error:
            raise ConfigError(
                f"invalid value {self.perceptual_layers!r} for perceptual_layers: {error}"
            ) from None
        # parse_layers takes float("nan") and float("inf") as weights; either makes the loss NaN
        _require(
            self,
            "perceptual_layers",
            all(math.isfinite(w) for w in layers.values()),
            "layer names with finite weights >= 0, e.g. 'mid' or 'mid:1,down2:0.5'",
        )

    def _check_combinations(self) -> None:
        """Rules between fields; each message names the field to change."""
        if self.data_format in ("digits", "synthetic") and self.data != self.data_format:
            _require(
                self,
                "data",
                False,
                f"{self.data_format!r} with --data-format {self.data_format} (built in, it reads "
                "no files); pass --data-format auto for a folder",
            )
        if self.data_format == "images" and self.channels not in (1, 3):
            # fastsp.data.ImageFolderDataset raises the same for an auto-detected image folder
            _require(
                self,
                "channels",
                False,
                "1 (grayscale) or 3 (RGB) for an image folder; pass --channels 1 or --channels 3 "
                "(other counts need latent shards or --data synthetic)",
            )
        try:
            parse_perceptual_t(self.perceptual_t, self.num_timesteps)
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
            self._check_reference_step()
        if self.prediction_type == "eps" and self.zero_terminal_snr:
            raise ConfigError(
                "prediction_type='eps' cannot be trained with zero_terminal_snr: at the last "
                "timestep sqrt(alpha_bar) = 0, so x0 = (x_t - s*eps)/a divides by zero. Use "
                "--prediction-type v (the paper's choice) or --no-zero-terminal-snr."
            )

    def _check_reference_step(self) -> None:
        """The naive reference step implements only the paper's defaults (PAPER.md Algorithm 1)."""
        paper = {
            "perceptual_layers": "mid",
            "predicted_noise": "eps_hat",
            "distance": "l2",
            "mse_weight": 0.0,
            "precision": ("auto", "fp32"),
            "optimizer": "adamw",
        }
        for name, allowed in paper.items():
            allowed = allowed if isinstance(allowed, tuple) else (allowed,)
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"--train-step reference runs the paper's defaults in fp32 only; "
                    f"--{name.replace('_', '-')} {getattr(self, name)!r} needs --train-step fast "
                    f"(or pass --{name.replace('_', '-')} {allowed[-1]})"
                )


# The presets. Each names its UNet shape (fastsp.unet.UNET_PRESETS) and overrides TrainConfig's
# defaults. `digits` is the CPU demo and the default; `tiny` is for tests; `sd21` is the Stable
# Diffusion 2.1-base UNet for GPU benchmarks (synthetic latents and context unless --data is set).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
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
        out="runs/tiny",
    ),
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
}


def _require(config: Any, name: str, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(
            f"invalid value {getattr(config, name)!r} for {name}: it must be {allowed}"
        )


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"invalid value {value!r} for {name}: choose one of {', '.join(choices)}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (True is an int in Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require_int(config: Any, name: str, low: int, high: int | None = None, note: str = "") -> None:
    value = getattr(config, name)
    ok = is_int(value) and value >= low and (high is None or value <= high)
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    _require(config, name, ok, allowed + note)


def _require_number(
    config: Any,
    name: str,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    what: str = "a finite number",
    note: str = "",
) -> None:
    """A real, finite value in the interval; an int is taken where a float is expected."""
    value = getattr(config, name)
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (high is None or (value < high if high_open else value <= high))
    )
    if high is None:
        allowed = f"{what} {'>' if low_open else '>='} {low}"
    else:
        allowed = f"{what} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _require(config, name, ok, allowed + note)


def _require_bool(config: Any, name: str) -> None:
    option = _option(name)
    _require(
        config,
        name,
        isinstance(getattr(config, name), bool),
        f"True or False ({option} / --no-{option[2:]})",
    )


def _require_str(config: Any, name: str, allowed: str, empty_ok: bool = False) -> None:
    """A string; `empty_ok` for the optional paths, where "" means "not given"."""
    value = getattr(config, name)
    _require(config, name, isinstance(value, str) and (empty_ok or value != ""), allowed)


def resolve(
    preset: str, train_overrides: dict[str, Any], model_overrides: dict[str, Any]
) -> tuple[TrainConfig, UNetConfig]:
    """Preset defaults, then explicit overrides; both dataclasses validate on construction."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    try:
        train = TrainConfig(**{**PRESETS[preset], **train_overrides, "preset": preset})
        model = dataclasses.replace(UNET_PRESETS[preset], **model_overrides)
    except ValueError as error:  # UNetConfig validates with ValueError; present both the same way
        raise ConfigError(str(error)) from None
    return train, model


def to_dict(train: TrainConfig, model: UNetConfig) -> dict[str, Any]:
    """The resolved configuration as written to config.json (tuples become lists)."""
    return {"train": dataclasses.asdict(train), "model": dataclasses.asdict(model)}


def _from_dict(cls: type, values: dict[str, Any], what: str) -> Any:
    """A config dataclass from config.json; unknown fields are an error, not ignored."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"config.json has unknown {what} fields {unknown}: from another version?")
    # JSON has lists where the dataclasses have tuples
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def model_config_from_dict(values: dict[str, Any]) -> UNetConfig:
    return _from_dict(UNetConfig, values, "model")


def train_config_from_dict(values: dict[str, Any]) -> TrainConfig:
    return _from_dict(TrainConfig, values, "training")


def dumps(train: TrainConfig, model: UNetConfig) -> str:
    return json.dumps(to_dict(train, model), indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """argparse with a short error that suggests the closest option and exits with status 2."""

    def error(self, message: str):
        hint = ""
        if message.startswith("unrecognized arguments:"):
            words = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("-")]
            options = [o for action in self._actions for o in action.option_strings]
            for word in words:
                close = difflib.get_close_matches(word, options, n=1)
                if close:
                    hint = f" (did you mean {close[0]}?)"
                    break
        sys.stderr.write(f"error: {message}{hint}\nrun with --help to list every option\n")
        raise SystemExit(2)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int; `tuple[int, ...]` -> tuple."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: set[str]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = _base_type(hints[f.name])
        dest = f"{cls.__name__}.{f.name}"
        if kind is bool:
            parser.add_argument(
                _option(f.name), dest=dest, action=argparse.BooleanOptionalAction, default=None
            )
        elif kind is tuple:
            parser.add_argument(
                _option(f.name), dest=dest, type=_int_tuple, default=None, metavar="A,B,..."
            )
        else:
            parser.add_argument(
                _option(f.name), dest=dest, type=kind, default=None, metavar=kind.__name__.upper()
            )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastsp/train.py",
        description="Train a diffusion model (MSE objective). Every config field is an option; "
        "a preset supplies the defaults.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--preset", default="digits", help=f"one of {', '.join(PRESETS)} (default: digits)"
    )
    _add_dataclass_options(parser, TrainConfig, skip={"preset"})
    # in_channels and num_classes come from the data set; the rest of the UNet shape is an option.
    _add_dataclass_options(parser, UNetConfig, skip={"in_channels", "num_classes"})
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, UNetConfig]:
    """Parse the command line into validated configs; a bad value exits with status 2."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    train_overrides = {
        k.split(".", 1)[1]: v
        for k, v in args.items()
        if k.startswith("TrainConfig.") and v is not None
    }
    model_overrides = {
        k.split(".", 1)[1]: v
        for k, v in args.items()
        if k.startswith("UNetConfig.") and v is not None
    }
    try:
        return resolve(args["preset"], train_overrides, model_overrides)
    except ConfigError as error:
        parser.error(str(error))
