"""The one place a model is built from its config: `build_model(UNetConfig | DiTConfig)`.

The trainer, checkpoints, the interop modules and the tests build through it, so that a model
kind added here (and in fastsp.config's MODEL_KINDS) works everywhere the UNet does.
"""

from __future__ import annotations

from torch import nn

from fastsp.dit import DiT
from fastsp.model_config import DiTConfig, UNetConfig
from fastsp.unet import UNet


def build_model(config: UNetConfig | DiTConfig) -> nn.Module:
    """A UNet for a UNetConfig, a DiT for a DiTConfig (freshly initialised, on the CPU)."""
    if isinstance(config, DiTConfig):
        return DiT(config)
    if isinstance(config, UNetConfig):
        return UNet(config)
    raise TypeError(f"build_model takes a UNetConfig or a DiTConfig, not {type(config).__name__}")


def is_native(network: nn.Module) -> bool:
    """A fastsp model: `forward(..., taps=)` and `tap_names` (not a diffusers module)."""
    return isinstance(network, (UNet, DiT))
