"""The one place a model is built from its config: `build_model(UNetConfig | DiTConfig |
DiffusersConfig)`.

The trainer, checkpoints, the interop modules and the tests build through it, so that a model
kind added here (and in fastsp.config's MODEL_KINDS) works everywhere the UNet does.
"""

from __future__ import annotations

from torch import nn

from fastsp.dit import DiT
from fastsp.families import DiffusersDenoiser
from fastsp.family_config import DiffusersConfig
from fastsp.model_config import DiTConfig, UNetConfig
from fastsp.unet import UNet


def build_model(config: UNetConfig | DiTConfig | DiffusersConfig) -> nn.Module:
    """A UNet for a UNetConfig, a DiT for a DiTConfig, the diffusers module of a DiffusersConfig
    (fastsp.families; freshly initialised, on the CPU)."""
    if isinstance(config, DiffusersConfig):
        return DiffusersDenoiser(config)
    if isinstance(config, DiTConfig):
        return DiT(config)
    if isinstance(config, UNetConfig):
        return UNet(config)
    raise TypeError(f"build_model takes a model config, not {type(config).__name__}")


def is_native(network: nn.Module) -> bool:
    """A fastsp model: `forward(..., taps=)` and `tap_names` (not a diffusers module)."""
    return isinstance(network, (UNet, DiT))
