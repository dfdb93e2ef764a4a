"""The model configs: `UNetConfig` (fastsp.unet builds it), `DiTConfig` (fastsp.dit), their
named shapes, and the model kind config.json records.

A leaf module (the standard library, fastsp.errors and fastsp.config_fields only), so that a
checkpoint, the sampler or the command line reads and validates a model's shape without torch.
Each field is declared with `option(default, help, choices)`; both dataclasses validate on
construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fastsp.config_fields import (
    ATTENTION_BACKENDS,
    is_int,
    is_sequence,
    option,
    option_flag,
    require,
    require_bool,
    require_choice,
    require_int,
    require_number,
)
from fastsp.errors import ConfigError
from fastsp.family_config import DiffusersConfig


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
            if is_sequence(getattr(self, name)):
                setattr(self, name, tuple(getattr(self, name)))
        for name in ("in_channels", "base_channels", "num_res_blocks", "head_dim"):
            require_int(self, name, 1)
        require_int(self, "transformer_depth", 1)
        require_int(self, "context_dim", 0, note=" (0 = no cross-attention)")
        require_int(self, "num_classes", 0, note=" (0 = unconditional)")
        require_int(self, "norm_groups", 1)
        for name in ("scale_shift_norm", "mid_attention", "linear_projection"):
            require_bool(self, name)
        require(
            self,
            "channel_mult",
            isinstance(self.channel_mult, tuple)
            and len(self.channel_mult) > 0
            and all(is_int(m) and m >= 1 for m in self.channel_mult),
            "a non-empty tuple of integers >= 1, e.g. 1,2,4",
        )
        n = len(self.channel_mult)
        levels = self.attention_levels
        require(
            self,
            "attention_levels",
            isinstance(levels, tuple)
            and all(is_int(lvl) and 0 <= lvl < n for lvl in levels)
            and len(set(levels)) == len(levels),
            f"a tuple of distinct level indices in 0..{n - 1}, e.g. {n - 1}",
        )
        for i, m in enumerate(self.channel_mult):
            ch = self.base_channels * m
            require(
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
            require(
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
                require(
                    self,
                    "num_heads",
                    ch % self.num_heads[i] == 0,
                    "divisors of the channels of their levels; level "
                    f"{i} has {ch} channels and {self.num_heads[i]} heads",
                )
            else:
                require(
                    self,
                    "head_dim",
                    ch % self.head_dim == 0,
                    "a divisor of the channels of every level with attention (and of the last "
                    f"level when mid_attention); level {i} has {ch}",
                )
        require_number(self, "dropout", 0, 1, high_open=True)
        require_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)

    def heads(self, level: int) -> int:
        """Attention heads of the transformers at `level` (the mid block is the last level)."""
        if self.num_heads != ():
            return self.num_heads[level]
        return self.base_channels * self.channel_mult[level] // self.head_dim


UNET_PRESETS: dict[str, UNetConfig] = {
    # Unit tests: two levels, attention at the second and in the mid block, class labels.
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
    # makes CFG usable); set num_classes=0 for the unconditional variant. Sized to train at batch
    # 64 on a two-core CPU: 1,007,105 parameters.
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
            require_int(self, name, 1)
        # "mid" is the output of the first depth // 2 blocks: at least one
        require_int(self, "depth", 2, note=" (the 'mid' tap is the output of depth // 2 blocks)")
        require_int(self, "context_dim", 0, note=" (0 = no cross-attention)")
        require_int(self, "num_classes", 0, note=" (0 = unconditional)")
        require_int(self, "hidden_size", 4)
        # the 2-D sin-cos positions give a quarter of the channels to each of sin, cos x row, col
        require(self, "hidden_size", self.hidden_size % 4 == 0, "a multiple of 4")
        require(
            self,
            "heads",
            self.hidden_size % self.heads == 0,
            f"a divisor of hidden_size {self.hidden_size}",
        )
        require(
            self,
            "input_size",
            self.input_size % self.patch_size == 0,
            f"a multiple of patch_size {self.patch_size}",
        )
        require_number(self, "norm_eps", 0, low_open=True)
        require_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)


# The DiT paper's models (its Table 1: S, B, L, XL; patch 2) for 256x256 images as 32x32x4 latents
# and ImageNet's 1000 classes, and two small ones. Parameter counts (fastsp.dit.DiT, measured on
# the meta device by tests/test_dit.py) are in the README's DiT section.
DIT_PRESETS: dict[str, DiTConfig] = {
    # Unit tests: 4 blocks of width 32 on 8x8 inputs, class labels.
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
# Every model preset by name; the training preset of the same name (fastsp.config.PRESETS)
# builds it.
MODEL_PRESETS: dict[str, UNetConfig | DiTConfig] = {**UNET_PRESETS, **DIT_PRESETS}
# The model kind recorded in config.json's model section ("kind"); a section without one is a UNet
# (config.json files written before the DiT).
# "diffusers": a diffusers denoiser trained in place (fastsp.family_config, fastsp.families).
MODEL_KINDS: dict[str, type] = {"unet": UNetConfig, "dit": DiTConfig, "diffusers": DiffusersConfig}


def model_kind(model: UNetConfig | DiTConfig) -> str:
    return next(kind for kind, cls in MODEL_KINDS.items() if isinstance(model, cls))


def check_model_options(preset: str, base: Any, model_overrides: dict[str, Any]) -> None:
    """Refuse the options of the other model kind (e.g. --depth with a UNet preset): the
    preset decides whether the run builds a UNet or a DiT."""
    fields = {f.name for f in dataclasses.fields(base)}
    foreign = [option_flag(name) for name in model_overrides if name not in fields]
    if foreign:
        kind = "DiT" if isinstance(base, DiTConfig) else "UNet"
        other = "a UNet preset (tiny, digits, sd21)" if kind == "DiT" else "a dit_* preset"
        raise ConfigError(
            f"{', '.join(foreign)}: not an option of the {kind} that --preset {preset} builds; "
            f"drop it, or pick {other}"
        )
