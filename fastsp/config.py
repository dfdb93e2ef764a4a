"""Typed configuration, named presets, the option vocabularies, and the command line over them.

A leaf module: it imports only the standard library (no torch, no other fastsp module), so a
checkpoint, the sampler or a data module can read and validate a configuration without importing
the model or the training objective. The modules that use an option's vocabulary (the schedules,
the samplers, the losses, the attention backends, the data readers) import it from here: each
vocabulary and each rule between options is defined once.

Three dataclasses: `TrainConfig` holds every training field, `UNetConfig` the UNet's architecture
(re-exported as `fastsp.unet.UNetConfig`), `DiTConfig` the transformer's (fastsp.dit); a preset
names one of the two models (MODEL_PRESETS), and config.json records its kind. Every field is
declared with `option(default, help, choices)`: its one-line description and allowed values live
in the field's metadata, and `--help` shows them. On the command line every field is
`--field-name VALUE` (booleans: `--field-name` / `--no-field-name`; tuples: comma-separated); the
DiT's fields it shares with the UNet (context_dim, attention_backend) are one option, and an
option of the model kind the preset does not build is refused. A preset fills in the defaults;
explicit options override it. Everything is validated before any work starts, and the resolved
configuration is written into the run folder and into every checkpoint.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastsp.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Vocabularies: the allowed values of each option, imported from here by the modules that use them

# fastsp.diffusion
PREDICTION_TYPES = ("v", "eps", "x0")
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SAMPLERS = ("ddim", "euler")
# fastsp.perceptual
PERCEPTUAL_T = ("uniform", "same")  # or a (low, high) range of timesteps, inclusive
PREDICTED_NOISE = ("eps_hat", "eps")
DISTANCES = ("l2", "l1")
# fastsp.attention
ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "math")
# fastsp.data
CONDITIONINGS = ("none", "class", "context")
DATA_FORMATS = ("auto", "digits", "images", "latents", "letters", "synthetic")
BUILTIN_DATA = ("digits", "letters", "synthetic")  # data sets that read no files
ON_BAD_DATA = ("stop", "skip")  # what a bad file does: stop the run, or leave the file out
# the trainer
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "apex_fused_adam")
TRAIN_STEPS = ("fast", "reference")
OBJECTIVES = ("mse", "self_perceptual")
PERCEPTUAL_SOURCES = ("frozen", "ema")

MAX_RESOLUTION = 4096
MAX_SEED = 2**32 - 1


# What a resume may change, declared on each TrainConfig field (`option(..., resume=...)`; a test
# checks that every field has a rule; fastsp.training.resume applies them). SAME: the field
# defines what the run learns (data, conditioning, diffusion, objective, optimizer and EMA
# settings) or what the checkpoint's state means (the global batch and the seed fix the data
# stream); a resume with another value is refused. MAY_CHANGE: how the run executes, how long,
# what it logs and writes. SAID: may change, and the start says so. The optimizer's
# hyperparameters besides the learning rate are SAME: load_state_dict would put the checkpoint's
# back into the optimizer while config.json claimed the new ones.
SAME, MAY_CHANGE, SAID = "same", "may change", "said"
RESUME_RULES = (SAME, MAY_CHANGE, SAID)


def option(
    default: Any, help: str, choices: tuple[str, ...] | None = None, resume: str | None = None
) -> Any:
    """A config field with its one-line description (and allowed values) as the field's metadata,
    and for a TrainConfig field what a resume may do to it (one of RESUME_RULES).

    `build_parser` shows both in `--help`; the dataclass default is `default` (tuples are
    immutable, so they are plain defaults too).
    """
    metadata = {"help": help, "choices": choices}
    if resume is not None:
        if resume not in RESUME_RULES:
            raise ValueError(f"resume={resume!r}: one of {', '.join(RESUME_RULES)}")
        metadata["resume"] = resume
    return dataclasses.field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Validation helpers: each raises a ConfigError that names the field, the value and what's allowed


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


def option_name(name: str) -> str:
    """A field's command-line option: num_timesteps -> --num-timesteps."""
    return "--" + name.replace("_", "-")


def _require_bool(config: Any, name: str) -> None:
    flag = option_name(name)
    _require(
        config,
        name,
        isinstance(getattr(config, name), bool),
        f"True or False ({flag} / --no-{flag[2:]})",
    )


def _require_str(config: Any, name: str, allowed: str, empty_ok: bool = False) -> None:
    """A string; `empty_ok` for the optional paths, where "" means "not given"."""
    value = getattr(config, name)
    _require(config, name, isinstance(value, str) and (empty_ok or value != ""), allowed)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


# ---------------------------------------------------------------------------------------------
# Rules between options, and the parsers of option values (pure: strings and flags in)


def refuse_eps_at_zero_terminal_snr(
    prediction_type: str, zero_terminal_snr: bool, *, cli: bool = False
) -> None:
    """Raise ConfigError for eps-prediction on a schedule with zero terminal SNR (PAPER.md).

    x0_hat = (x_t - s_t eps_hat) / a_t, and zero terminal SNR makes a_{T-1} = 0. The callers
    reduce what they hold to the flag: a config's zero_terminal_snr, a schedule whose
    alphas_cumprod reaches 0, a batch whose a_t is 0. `cli` words the fix as command-line
    options instead of keyword arguments.
    """
    if prediction_type != "eps" or not zero_terminal_snr:
        return
    fix = (
        "pass --prediction-type v, or --no-zero-terminal-snr"
        if cli
        else 'pass prediction_type="v", or zero_terminal_snr=False'
    )
    raise ConfigError(
        "prediction_type 'eps' cannot be used with zero terminal SNR (zero_terminal_snr=True, or "
        "any zero-terminal-SNR schedule: alphas_cumprod reaches 0): at the last timestep "
        "a_t = sqrt(alpha_bar_t) = 0, so x0_hat = (x_t - s_t * eps_hat) / a_t divides by zero. "
        "Use prediction_type 'v' (the paper's choice) or 'x0', or a schedule without zero "
        f"terminal SNR: {fix}."
    )


def parse_layers(spec: str | Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """ "mid" | "mid:1,down2:0.5" | ["mid", "down2"] | {"mid": 1.0} -> {layer: weight}."""
    if isinstance(spec, Mapping):
        layers = {str(k): float(v) for k, v in spec.items()}
    else:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        layers = {}
        for item in (i.strip() for i in items):
            name, _, weight = item.partition(":")
            try:
                layers[name.strip()] = float(weight) if weight else 1.0
            except ValueError:
                raise ValueError(
                    f"layer weight {weight!r} in {item!r} is not a number; "
                    "write e.g. 'mid:1,down2:0.5'"
                ) from None
    if not layers or any(not name for name in layers):
        raise ValueError(f"no layer names in {spec!r}; write e.g. 'mid' or 'mid:1,down2:0.5'")
    if any(w < 0 for w in layers.values()):
        raise ValueError(f"layer weights must be >= 0, got {layers}")
    return layers


def parse_perceptual_on_t(
    spec: str | tuple[int, int] | None, num_timesteps: int
) -> tuple[int, int] | None:
    """ "all" (or None) | "LOW,HIGH" (inclusive) -> None (the self-perceptual loss at every
    online timestep, the paper) | (low, high): the loss only where LOW <= t <= HIGH."""
    if spec is None or spec == "all":
        return None
    try:
        low, high = (int(v) for v in (spec.split(",") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        raise ValueError(
            f"perceptual_on_t {spec!r} must be 'all' or a range 'LOW,HIGH' of online timesteps "
            "(e.g. 0,699: the self-perceptual loss there, MSE at the noisiest 30%)"
        ) from None
    if not 0 <= low <= high < num_timesteps:
        raise ValueError(
            f"perceptual_on_t range {spec!r} must satisfy 0 <= LOW <= HIGH < {num_timesteps}"
        )
    return low, high


def parse_perceptual_t(spec: str | tuple[int, int], num_timesteps: int) -> str | tuple[int, int]:
    """ "uniform" | "same" | "LOW,HIGH" (inclusive) -> "uniform" | "same" | (low, high)."""
    if isinstance(spec, str) and spec in PERCEPTUAL_T:
        return spec
    try:
        low, high = (int(v) for v in (spec.split(",") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        raise ValueError(
            f"perceptual_t {spec!r} must be 'uniform', 'same', or a range 'LOW,HIGH' of timesteps"
        ) from None
    if not 0 <= low <= high < num_timesteps:
        raise ValueError(
            f"perceptual_t range {spec!r} must satisfy 0 <= LOW <= HIGH < {num_timesteps}"
        )
    return low, high


# ---------------------------------------------------------------------------------------------
# The model: the UNet's architecture (fastsp.unet builds it) and its named shapes


@dataclass
class UNetConfig:
    """The shape of a `fastsp.unet.UNet`; validated on construction."""

    in_channels: int = option(
        3, "image/latent channels in, and predicted out (from the data, not an option)"
    )
    base_channels: int = option(64, "channels of level 0; the timestep embedding has 4x this")
    channel_mult: tuple[int, ...] = option(
        (1, 2, 2), "level i has base_channels * channel_mult[i] channels"
    )
    num_res_blocks: int = option(2, "ResBlocks per down level (up levels have one more)")
    attention_levels: tuple[int, ...] = option(
        (1, 2), "levels (0 = full resolution) with transformers"
    )
    head_dim: int = option(64, "channels per attention head; heads = level channels // head_dim")
    transformer_depth: int = option(1, "transformer blocks per transformer")
    context_dim: int = option(
        0, "0 = no cross-attention; > 0 = cross-attention to a context [B, L, context_dim]"
    )
    num_classes: int = option(
        0,
        "0 = unconditional; > 0 = class embedding, row num_classes = the null label (from the "
        "data, not an option)",
    )
    scale_shift_norm: bool = option(
        True, "ADM's timestep scale-shift of the second norm; off = SD's additive embedding"
    )
    norm_groups: int = option(32, "GroupNorm groups; must divide every level's channel count")
    dropout: float = option(0.0, "dropout inside ResBlocks, before the second conv")
    attention_backend: str = option(
        "auto", "attention kernels (fastsp.attention); auto picks per input", ATTENTION_BACKENDS
    )
    mid_attention: bool = option(True, "a transformer between the two mid-block ResBlocks")
    linear_projection: bool = option(
        True,
        "transformers' proj_in/proj_out: Linear (SD 2.x); off = 1x1 convolutions (SD 1.x)",
    )
    num_heads: tuple[int, ...] = option(
        (),
        "attention heads per level (SD 1.x: 8 at every level); empty = channels // head_dim",
    )

    def __post_init__(self):
        # Any sequence (JSON gives lists) becomes a tuple; a bare int or a string is refused below
        for name in ("channel_mult", "attention_levels", "num_heads"):
            if _is_sequence(getattr(self, name)):
                setattr(self, name, tuple(getattr(self, name)))
        for name in ("in_channels", "base_channels", "num_res_blocks", "head_dim"):
            _require_int(self, name, 1)
        _require_int(self, "transformer_depth", 1)
        _require_int(self, "context_dim", 0, note=" (0 = no cross-attention)")
        _require_int(self, "num_classes", 0, note=" (0 = unconditional)")
        _require_int(self, "norm_groups", 1)
        for name in ("scale_shift_norm", "mid_attention", "linear_projection"):
            _require_bool(self, name)
        _require(
            self,
            "channel_mult",
            isinstance(self.channel_mult, tuple)
            and len(self.channel_mult) > 0
            and all(is_int(m) and m >= 1 for m in self.channel_mult),
            "a non-empty tuple of integers >= 1, e.g. 1,2,4",
        )
        n = len(self.channel_mult)
        levels = self.attention_levels
        _require(
            self,
            "attention_levels",
            isinstance(levels, tuple)
            and all(is_int(lvl) and 0 <= lvl < n for lvl in levels)
            and len(set(levels)) == len(levels),
            f"a tuple of distinct level indices in 0..{n - 1}, e.g. {n - 1}",
        )
        for i, m in enumerate(self.channel_mult):
            ch = self.base_channels * m
            _require(
                self,
                "norm_groups",
                ch % self.norm_groups == 0,
                f"a divisor of every level's channels; level {i} has base_channels * "
                f"channel_mult[{i}] = {ch}",
            )
        attn_levels = set(levels)
        if self.mid_attention:
            attn_levels.add(n - 1)
        if self.num_heads != ():
            _require(
                self,
                "num_heads",
                isinstance(self.num_heads, tuple)
                and len(self.num_heads) == n
                and all(is_int(h) and h >= 1 for h in self.num_heads),
                f"empty (heads = channels // head_dim) or {n} integers >= 1, one per level",
            )
        for i in sorted(attn_levels):
            ch = self.base_channels * self.channel_mult[i]
            if self.num_heads != ():
                _require(
                    self,
                    "num_heads",
                    ch % self.num_heads[i] == 0,
                    "divisors of the channels of their levels; level "
                    f"{i} has {ch} channels and {self.num_heads[i]} heads",
                )
            else:
                _require(
                    self,
                    "head_dim",
                    ch % self.head_dim == 0,
                    "a divisor of the channels of every level with attention (and of the last "
                    f"level when mid_attention); level {i} has {ch}",
                )
        _require_number(self, "dropout", 0, 1, high_open=True)
        _require_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)

    def heads(self, level: int) -> int:
        """Attention heads of the transformers at `level` (the mid block is the last level)."""
        if self.num_heads != ():
            return self.num_heads[level]
        return self.base_channels * self.channel_mult[level] // self.head_dim


UNET_PRESETS: dict[str, UNetConfig] = {
    # Unit tests: forward + backward at batch 8, 16x16 in a few milliseconds.
    "tiny": UNetConfig(
        in_channels=1,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        head_dim=16,
        norm_groups=8,
        num_classes=10,
    ),
    # CPU demo on 16x16 (upsampled 8x8) digits, class-conditional (10% label dropout in training
    # makes CFG usable); set num_classes=0 for the unconditional variant. Sized by measurement to
    # train at batch 64 on two CPU cores: ~1.0M parameters, ~0.12-0.16 s per forward + backward.
    "digits": UNetConfig(
        in_channels=1,
        base_channels=16,
        channel_mult=(1, 2, 4),
        num_res_blocks=1,
        attention_levels=(1, 2),
        head_dim=16,
        norm_groups=8,
        num_classes=10,
    ),
    # Stable Diffusion 2.1-base's UNet shape (865,910,724 parameters); for GPU benchmarks.
    "sd21": UNetConfig(
        in_channels=4,
        base_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_levels=(0, 1, 2),
        head_dim=64,
        context_dim=1024,
        num_classes=0,
        scale_shift_norm=False,
        norm_groups=32,
    ),
}


@dataclass
class DiTConfig:
    """The shape of a `fastsp.dit.DiT` (a transformer over patches); validated on construction.

    in_channels, num_classes, context_dim and attention_backend mean what they mean in UNetConfig
    (and share its command-line options); the others are the DiT's own.
    """

    in_channels: int = option(
        4, "image/latent channels in, and predicted out (from the data, not an option)"
    )
    input_size: int = option(
        32,
        "input side the positional grid is laid out for (diffusers' sample_size); other sizes "
        "get the grid rescaled to it, as diffusers does",
    )
    patch_size: int = option(2, "side of the square patches that become tokens")
    hidden_size: int = option(1152, "token width D")
    depth: int = option(28, "transformer blocks; the 'mid' tap is the output of the first half")
    heads: int = option(16, "attention heads; hidden_size / heads channels each")
    mlp_ratio: int = option(4, "the MLP's hidden width is mlp_ratio * hidden_size")
    norm_eps: float = option(
        1e-6, "epsilon of the LayerNorm before each MLP (diffusers' norm_eps; DiT: 1e-6)"
    )
    context_dim: int = option(
        0, "0 = no cross-attention; > 0 = cross-attention to a context [B, L, context_dim]"
    )
    num_classes: int = option(
        0,
        "0 = unconditional; > 0 = class embedding, row num_classes = the null label (from the "
        "data, not an option)",
    )
    attention_backend: str = option(
        "auto", "attention kernels (fastsp.attention); auto picks per input", ATTENTION_BACKENDS
    )

    def __post_init__(self):
        for name in ("in_channels", "input_size", "patch_size", "heads", "mlp_ratio"):
            _require_int(self, name, 1)
        # "mid" is the output of the first depth // 2 blocks: at least one
        _require_int(self, "depth", 2, note=" (the 'mid' tap is the output of depth // 2 blocks)")
        _require_int(self, "context_dim", 0, note=" (0 = no cross-attention)")
        _require_int(self, "num_classes", 0, note=" (0 = unconditional)")
        _require_int(self, "hidden_size", 4)
        # the 2-D sin-cos positions give a quarter of the channels to each of sin, cos x row, col
        _require(self, "hidden_size", self.hidden_size % 4 == 0, "a multiple of 4")
        _require(
            self,
            "heads",
            self.hidden_size % self.heads == 0,
            f"a divisor of hidden_size {self.hidden_size}",
        )
        _require(
            self,
            "input_size",
            self.input_size % self.patch_size == 0,
            f"a multiple of patch_size {self.patch_size}",
        )
        _require_number(self, "norm_eps", 0, low_open=True)
        _require_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)


# The DiT paper's models (its Table 1: S, B, L, XL; patch 2) for 256x256 images as 32x32x4 latents
# and ImageNet's 1000 classes, and two small ones. Parameter counts (fastsp.dit.DiT, measured on
# the meta device by tests/test_dit.py) are in the README's DiT section.
DIT_PRESETS: dict[str, DiTConfig] = {
    # Unit tests: a few milliseconds per forward + backward at batch 8, 8x8.
    "dit_tiny": DiTConfig(
        in_channels=1, input_size=8, patch_size=2, hidden_size=32, depth=4, heads=2, num_classes=10
    ),
    # CPU demo on the 16x16 digits, class-conditional: 64 tokens of patch 2.
    "dit_digits": DiTConfig(
        in_channels=1,
        input_size=16,
        patch_size=2,
        hidden_size=128,
        depth=6,
        heads=4,
        num_classes=10,
    ),
    "dit_s2": DiTConfig(hidden_size=384, depth=12, heads=6, num_classes=1000),
    "dit_b2": DiTConfig(hidden_size=768, depth=12, heads=12, num_classes=1000),
    "dit_l2": DiTConfig(hidden_size=1024, depth=24, heads=16, num_classes=1000),
    "dit_xl2": DiTConfig(hidden_size=1152, depth=28, heads=16, num_classes=1000),
}
# Every model preset by name; a training preset (PRESETS) of the same name builds it.
MODEL_PRESETS: dict[str, UNetConfig | DiTConfig] = {**UNET_PRESETS, **DIT_PRESETS}
# The model kind recorded in config.json's model section ("kind"); a section without one is a UNet
# (config.json files written before the DiT).
MODEL_KINDS: dict[str, type] = {"unet": UNetConfig, "dit": DiTConfig}


def model_kind(model: UNetConfig | DiTConfig) -> str:
    return next(kind for kind, cls in MODEL_KINDS.items() if isinstance(model, cls))


# ---------------------------------------------------------------------------------------------
# diffusers' UNet2DConditionModel config <-> UNetConfig. Here, not in fastsp.diffusers_unet, so
# that `--init DIFFUSERS_FOLDER` resolves the model shape on the stdlib-only command-line path.

DIFFUSERS_UNET_CLASS = "UNet2DConditionModel"
# Bookkeeping fields, sample_size (only the pipelines' default image size), and
# addition_embed_type_num_heads (read only with an addition_embed_type, refused below).
_DIFFUSERS_IGNORED = (
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "sample_size",
    "addition_embed_type_num_heads",
)
# Fields whose value must be one of these for fastsp's UNet to compute the same function.
# upcast_attention only asks for fp32 attention scores, as every fastsp attention backend
# accumulates them.
_DIFFUSERS_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "dropout": (0.0,),
    "act_fn": ("silu",),
    "norm_eps": (1e-5,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "upcast_attention": (False, True),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None,),
    "cross_attention_norm": (None,),
}
# Fields that map onto UNetConfig (unet_config_from_diffusers reads them).
_DIFFUSERS_MAPPED = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "cross_attention_dim",
    "attention_head_dim",
    "use_linear_projection",
    "norm_num_groups",
    "transformer_layers_per_block",
    "resnet_time_scale_shift",
)
# diffusers' block type of a level, without and with transformers
_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
_TIME_SCALE_SHIFT = {"default": False, "scale_shift": True}  # -> scale_shift_norm


def _per_level(value: Any, n: int) -> list[Any] | None:
    """diffusers' "an int for every level, or one per level"; None if it is neither."""
    if _is_sequence(value):
        return list(value) if len(value) == n else None
    return [value] * n


def _all_false(value: Any) -> bool:
    return value is False or (_is_sequence(value) and all(v is False for v in value))


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """The UNetConfig of a diffusers UNet2DConditionModel config (its config.json as a dict).

    SD 1.x (1x1-conv projections, 8 heads at every level) and SD 2.x (linear projections,
    attention_head_dim = heads per level, 64 channels each) both map. A config fastsp's UNet cannot
    compute is refused with a ConfigError listing every such field with its value. diffusers'
    `attention_head_dim` is the number of heads (its `num_attention_heads` must be unset).
    """
    unsupported = []

    def refuse(name: str, allowed: str) -> None:
        unsupported.append(f"{name}={config.get(name)!r} ({allowed})")

    for name in sorted(config):
        if name in _DIFFUSERS_IGNORED or name in _DIFFUSERS_MAPPED:
            continue
        allowed = _DIFFUSERS_FIXED.get(name)
        if allowed is None:
            refuse(name, "a field fastsp does not know")
        elif name == "only_cross_attention":
            if not _all_false(config[name]):
                refuse(name, "supported: False")
        elif config[name] not in allowed:
            refuse(name, "supported: " + " or ".join(repr(a) for a in allowed))
    if config.get("_class_name", DIFFUSERS_UNET_CLASS) != DIFFUSERS_UNET_CLASS:
        refuse("_class_name", f"supported: {DIFFUSERS_UNET_CLASS!r}")

    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(channels)
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    levels = [i for i, kind in enumerate(down) if kind == _DOWN_BLOCKS[1]]
    if len(down) != n or any(kind not in _DOWN_BLOCKS for kind in down):
        refuse("down_block_types", f"{n} of {', '.join(_DOWN_BLOCKS)}")
    elif up != [_UP_BLOCKS[kind == _DOWN_BLOCKS[1]] for kind in reversed(down)]:
        refuse("up_block_types", "the down blocks' kinds in reverse order, as Up*Block2D")
    if not (n > 0 and all(is_int(c) and c % channels[0] == 0 for c in channels)):
        refuse("block_out_channels", "multiples of the first")
    in_channels = config.get("in_channels", 4)
    if config.get("out_channels", 4) != in_channels:
        refuse("out_channels", f"supported: in_channels = {in_channels}")
    if not is_int(config.get("layers_per_block", 2)):
        refuse("layers_per_block", "one integer for every level")
    depths = _per_level(config.get("transformer_layers_per_block", 1), n)
    if depths is None or len(set(depths)) != 1:
        refuse("transformer_layers_per_block", "the same integer at every level")
    heads = _per_level(config.get("attention_head_dim", 8), n)
    if heads is None or not all(is_int(h) and h >= 1 for h in heads):
        refuse("attention_head_dim", f"heads: one integer, or {n}")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in _TIME_SCALE_SHIFT:
        refuse("resnet_time_scale_shift", "supported: 'default' or 'scale_shift'")
    if not is_int(config.get("cross_attention_dim", 1280)):
        refuse("cross_attention_dim", "one integer")
    if unsupported:
        raise ConfigError(
            "this diffusers UNet config has fields fastsp's UNet does not support: "
            + "; ".join(unsupported)
        )

    # heads -> one head_dim when every level with transformers has the same one (SD 2.x),
    # else heads per level (SD 1.x).
    with_attention = sorted({*levels, n - 1})
    head_dims = {channels[i] // heads[i] for i in with_attention}
    same_dim = len(head_dims) == 1 and all(channels[i] % heads[i] == 0 for i in with_attention)
    try:
        return UNetConfig(
            in_channels=in_channels,
            base_channels=channels[0],
            channel_mult=tuple(c // channels[0] for c in channels),
            num_res_blocks=config.get("layers_per_block", 2),
            attention_levels=tuple(levels),
            head_dim=head_dims.pop() if same_dim else UNetConfig.head_dim,
            num_heads=() if same_dim else tuple(heads),
            transformer_depth=depths[0],
            context_dim=config.get("cross_attention_dim", 1280),
            num_classes=0,
            scale_shift_norm=_TIME_SCALE_SHIFT[shift],
            norm_groups=config.get("norm_num_groups", 32),
            mid_attention=True,
            linear_projection=bool(config.get("use_linear_projection", False)),
        )
    except ValueError as error:
        raise ConfigError(
            f"this diffusers UNet config does not map onto fastsp's: {error}"
        ) from None


def diffusers_config_from_unet(model: UNetConfig, sample_size: int | None = None) -> dict[str, Any]:
    """The diffusers UNet2DConditionModel config (without `_diffusers_version`) of a UNetConfig;
    a ConfigError lists what diffusers' UNet2DConditionModel cannot express."""
    n = len(model.channel_mult)
    unsupported = []
    if model.num_classes > 0:
        unsupported.append(f"num_classes={model.num_classes} (diffusers has no null-label row)")
    if not model.mid_attention:
        unsupported.append("mid_attention=False (UNetMidBlock2DCrossAttn has a transformer)")
    if model.context_dim == 0:
        unsupported.append("context_dim=0 (diffusers' transformers always cross-attend)")
    if model.dropout != 0:
        unsupported.append(f"dropout={model.dropout} (exported models run at 0)")
    if unsupported:
        raise ConfigError(
            "this fastsp UNet has no diffusers UNet2DConditionModel equivalent: "
            + "; ".join(unsupported)
        )
    attn = [i in model.attention_levels for i in range(n)]
    return {
        "_class_name": DIFFUSERS_UNET_CLASS,
        "sample_size": sample_size,
        "in_channels": model.in_channels,
        "out_channels": model.in_channels,
        "block_out_channels": [model.base_channels * m for m in model.channel_mult],
        "layers_per_block": model.num_res_blocks,
        "down_block_types": [_DOWN_BLOCKS[a] for a in attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": [_UP_BLOCKS[a] for a in reversed(attn)],
        "cross_attention_dim": model.context_dim,
        "attention_head_dim": [model.heads(i) for i in range(n)],
        "use_linear_projection": model.linear_projection,
        "norm_num_groups": model.norm_groups,
        "norm_eps": 1e-5,
        "transformer_layers_per_block": model.transformer_depth,
        "resnet_time_scale_shift": "scale_shift" if model.scale_shift_norm else "default",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
    }


def diffusers_unet_folder(path: str | Path) -> Path | None:
    """The diffusers UNet folder at `path`: the folder itself when its config.json names
    UNet2DConditionModel, or a pipeline folder's unet/; None for anything else (a fastsp
    checkpoint or run folder)."""
    root = Path(path)
    for folder in (root, root / "unet"):
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("_class_name") == DIFFUSERS_UNET_CLASS:
            return folder
    return None


def read_diffusers_config(folder: Path) -> dict[str, Any]:
    """config.json of a diffusers UNet folder, as a dict."""
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Training

# The presets. Each names its UNet shape (UNET_PRESETS above) and overrides TrainConfig's
# defaults. `digits` is the CPU demo and the default; `tiny` is for tests; `sd21` is the Stable
# Diffusion 2.1-base UNet for GPU benchmarks (synthetic latents and context unless --data is set).
DEFAULT_PRESET = "digits"
# What tiny and dit_tiny share: a run of a few seconds on the CPU, for tests.
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
    """Everything a training run needs, besides the model's shape (`UNetConfig` or `DiTConfig`)."""

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
    # diffusion (PAPER.md: scaled-linear betas, zero terminal SNR, v-prediction)
    beta_schedule: str = option(
        "scaled_linear",
        "the beta schedule (the paper: scaled_linear)",
        BETA_SCHEDULES,
        resume=SAME,
    )
    num_timesteps: int = option(1000, "diffusion timesteps T", resume=SAME)
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
    # objective (PAPER.md: stage 1 trains with mse, stage 2 with self_perceptual)
    objective: str = option(
        "mse",
        "the loss: mse (stage 1) or self_perceptual (stage 2, needs --init)",
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
            self,
            "init",
            "a checkpoint, run or diffusers UNet folder path, or '' for random weights",
            empty_ok=True,
        )
        _require_str(
            self,
            "perceptual_checkpoint",
            "a checkpoint, run or diffusers UNet folder path, or '' for the --init checkpoint",
            empty_ok=True,
        )
        _require_choice("perceptual_source", self.perceptual_source, PERCEPTUAL_SOURCES)
        self._check_perceptual_layers()
        _require_str(self, "perceptual_t", "'uniform', 'same' or 'LOW,HIGH'")
        _require_str(self, "perceptual_on_t", "'all' or 'LOW,HIGH'")
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
        if self.data_format in BUILTIN_DATA and self.data != self.data_format:
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
        if self.sample_cfg != 1 and self.cond == "none":
            # else the final grid would fail after every step of training
            raise ConfigError(
                f"--sample-cfg {self.sample_cfg} needs a conditional model (guidance contrasts "
                "the conditional and the unconditional prediction), but --cond none trains an "
                "unconditional one; pass --sample-cfg 1, or --cond class or --cond context"
            )
        try:
            parse_perceptual_t(self.perceptual_t, self.num_timesteps)
            parse_perceptual_on_t(self.perceptual_on_t, self.num_timesteps)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.perceptual_on_t != "all" and self.objective != "self_perceptual":
            raise ConfigError(
                f"--perceptual-on-t {self.perceptual_on_t} gates the self-perceptual loss, but "
                f"--objective is {self.objective}; pass --objective self_perceptual or drop it"
            )
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
        refuse_eps_at_zero_terminal_snr(self.prediction_type, self.zero_terminal_snr, cli=True)

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


def resolve(
    preset: str, train_overrides: dict[str, Any], model_overrides: dict[str, Any]
) -> tuple[TrainConfig, UNetConfig | DiTConfig]:
    """Preset defaults, then explicit overrides; both dataclasses validate on construction."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    try:
        train = TrainConfig(**{**PRESETS[preset], **train_overrides, "preset": preset})
        base = _init_model(train.init, model_overrides) or MODEL_PRESETS[preset]
        _check_model_options(preset, base, model_overrides)
        model = dataclasses.replace(base, **model_overrides)
    except ValueError as error:  # every refusal reads as a ConfigError
        raise ConfigError(str(error)) from None
    return train, model


def _check_model_options(preset: str, base: Any, model_overrides: dict[str, Any]) -> None:
    """Refuse the options of the other model kind (e.g. --depth with a UNet preset): the
    preset decides whether the run builds a UNet or a DiT."""
    fields = {f.name for f in dataclasses.fields(base)}
    foreign = [option_name(name) for name in model_overrides if name not in fields]
    if foreign:
        kind = "DiT" if isinstance(base, DiTConfig) else "UNet"
        other = "a UNet preset (tiny, digits, sd21)" if kind == "DiT" else "a dit_* preset"
        raise ConfigError(
            f"{', '.join(foreign)}: not an option of the {kind} that --preset {preset} builds; "
            f"drop it, or pick {other}"
        )


def _init_model(init: str, model_overrides: dict[str, Any]) -> UNetConfig | None:
    """With --init of a diffusers UNet (or pipeline) folder, the architecture is that folder's,
    and a model option that says otherwise is refused; None for any other --init."""
    folder = diffusers_unet_folder(init) if init else None
    if folder is None:
        return None
    model = unet_config_from_diffusers(read_diffusers_config(folder))
    differ = {k: v for k, v in model_overrides.items() if getattr(model, k) != v}
    if differ:
        details = ", ".join(
            f"{option_name(k)} {show_value(v)} vs {show_value(getattr(model, k))}"
            for k, v in differ.items()
        )
        raise ConfigError(
            f"--init {init} is a diffusers UNet whose config.json sets the architecture, and the "
            f"model options contradict it ({details}); drop those options"
        )
    return model


def model_to_dict(model: UNetConfig | DiTConfig) -> dict[str, Any]:
    """config.json's model section: the model's kind ("unet" or "dit") and its fields."""
    return {"kind": model_kind(model), **dataclasses.asdict(model)}


def to_dict(train: TrainConfig, model: UNetConfig | DiTConfig) -> dict[str, Any]:
    """The resolved configuration as written to config.json (tuples become lists)."""
    return {"train": dataclasses.asdict(train), "model": model_to_dict(model)}


def _from_dict(cls: type, values: Any, what: str, source: str = "config.json") -> Any:
    """A config dataclass from a config.json section. Every field must be there, nothing else,
    each of its type and range: a missing field is not filled with today's default (the file
    would then describe a run that never was), an unknown one is not ignored, and the
    dataclass's own validation names a mistyped one. One line, naming the file and the field."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: the {what} section is not a JSON object")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"{source} has unknown {what} fields {unknown}: from another version, or edited by "
            "hand? Remove them"
        )
    missing = [name for name in names if name not in values]
    if missing:
        raise ConfigError(
            f"{source} lacks the {what} fields {missing}: from another version, or edited by "
            "hand? Add them with the values the run used"
        )
    try:  # JSON has lists where the dataclasses have tuples
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except ValueError as error:  # a ConfigError naming the field, its value and what is allowed
        raise ConfigError(f"{source}: {error}") from None


def model_config_from_dict(
    values: dict[str, Any], source: str = "config.json"
) -> UNetConfig | DiTConfig:
    """The model config of config.json's model section; without a "kind" (config.json files
    written before the DiT) it is a UNet."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: the model section is not a JSON object")
    values = dict(values)
    kind = values.pop("kind", "unet")
    if kind not in MODEL_KINDS:
        raise ConfigError(
            f"{source} has an unknown model kind {kind!r}: choose one of "
            f"{', '.join(MODEL_KINDS)} (from another version?)"
        )
    return _from_dict(MODEL_KINDS[kind], values, "model", source)


def train_config_from_dict(values: Any, source: str = "config.json") -> TrainConfig:
    return _from_dict(TrainConfig, values, "training", source)


CONFIG_SECTIONS = ("train", "model")


def configs_from_dict(values: Any, source: str = "config.json") -> tuple[TrainConfig, Any]:
    """The one reader of a config.json (a run folder's or a checkpoint's): its {"train": ...,
    "model": ...} as validated configs (the model's class from its kind). Resuming, sampling and
    evaluating all read through it, so they accept and refuse the same files."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source} does not hold a JSON object with sections {CONFIG_SECTIONS}")
    unknown = sorted(set(values) - set(CONFIG_SECTIONS))
    missing = [name for name in CONFIG_SECTIONS if name not in values]
    if unknown or missing:
        raise ConfigError(
            f"{source} must hold exactly the sections {list(CONFIG_SECTIONS)}"
            + (f"; unknown: {unknown}" if unknown else "")
            + (f"; missing: {missing}" if missing else "")
        )
    return (
        train_config_from_dict(values["train"], source),
        model_config_from_dict(values["model"], source),
    )


def read_config_file(path: str | Path) -> tuple[TrainConfig, Any]:
    """A config.json file through `configs_from_dict`; an unreadable file is a ConfigError."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path} cannot be read: {error.strerror or error}") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path} is not valid JSON ({error})") from None
    return configs_from_dict(values, str(path))


def dumps(train: TrainConfig, model: UNetConfig | DiTConfig) -> str:
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


def show_value(value: Any) -> str:
    """A default as it is written on the command line."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "''" if value == "" else str(value)


def _help(f: dataclasses.Field, by_preset: dict[str, Any]) -> str:
    """The field's description, its allowed values, and its default: the default preset's
    value, followed by the other presets' values where they differ from it."""
    text = f.metadata["help"]
    if f.metadata["choices"]:
        text += f"; one of {', '.join(f.metadata['choices'])}"
    # the DiT's options have no value under the default (UNet) preset: their first preset's
    first = DEFAULT_PRESET if DEFAULT_PRESET in by_preset else next(iter(by_preset))
    default = by_preset[first]
    others = [f"{name}: {show_value(v)}" for name, v in by_preset.items() if v != default]
    where = "".join(f"; {other}" for other in others)
    where = f" with --preset {first}{where}" if others else ""
    return f"{text} (default: {show_value(default)}{where})".replace("%", "%%")


def _add_dataclass_options(
    parser: argparse.ArgumentParser, cls: type, skip: set[str], presets: dict[str, Any]
) -> None:
    """One option per field of `cls`; `presets` maps each preset name to its `cls` instance."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = _base_type(hints[f.name])
        dest = f"{cls.__name__}.{f.name}"
        help = _help(f, {name: getattr(c, f.name) for name, c in presets.items()})
        if kind is bool:
            parser.add_argument(
                option_name(f.name),
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help,
            )
        elif kind is tuple:
            parser.add_argument(
                option_name(f.name),
                dest=dest,
                type=_int_tuple,
                default=None,
                metavar="A,B,...",
                help=help,
            )
        else:
            parser.add_argument(
                option_name(f.name),
                dest=dest,
                type=kind,
                default=None,
                metavar=kind.__name__.upper(),
                help=help,
            )


def build_parser() -> argparse.ArgumentParser:
    """Every field of TrainConfig and UNetConfig as an option, with its description, allowed
    values and default in --help (allowed values are checked by the configs, not by argparse,
    so that a refusal reads the same from the command line and from Python)."""
    parser = _Parser(
        prog="fastsp/train.py",
        description="Train a diffusion model with the MSE or the self-perceptual objective. "
        "Every config field is an option; a preset supplies the defaults, and each option "
        f"shows its default under --preset {DEFAULT_PRESET} and where other presets differ.",
        allow_abbrev=False,
    )
    preset = next(f for f in dataclasses.fields(TrainConfig) if f.name == "preset")
    parser.add_argument(
        "--preset", default=DEFAULT_PRESET, help=_help(preset, {DEFAULT_PRESET: DEFAULT_PRESET})
    )
    train_presets = {name: TrainConfig(**values, preset=name) for name, values in PRESETS.items()}
    _add_dataclass_options(
        parser.add_argument_group("training options"), TrainConfig, {"preset"}, train_presets
    )
    # in_channels and num_classes come from the data set; the rest of the UNet shape is an option.
    _add_dataclass_options(
        parser.add_argument_group("UNet options"),
        UNetConfig,
        {"in_channels", "num_classes"},
        UNET_PRESETS,
    )
    # The DiT's own fields; the ones it shares with the UNet (--context-dim,
    # --attention-backend) are the UNet options above, and apply to whichever model the preset
    # builds.
    shared = {f.name for f in dataclasses.fields(UNetConfig)}
    _add_dataclass_options(
        parser.add_argument_group(
            "DiT options (with a dit_* preset; --context-dim and --attention-backend apply too)"
        ),
        DiTConfig,
        shared,
        DIT_PRESETS,
    )
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, UNetConfig | DiTConfig]:
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
        if k.startswith(("UNetConfig.", "DiTConfig.")) and v is not None
    }
    try:
        return resolve(args["preset"], train_overrides, model_overrides)
    except ConfigError as error:
        parser.error(str(error))
