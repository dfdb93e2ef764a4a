"""fastsp: performance-first diffusion training with the self-perceptual objective.

The public surface: the fused feature-space MSE (`feature_mse`, `FeatureMSELoss`,
`feature_mse_multi`), the self-perceptual loss for any trainer (`SelfPerceptualLoss`), the
diffusion core (`NoiseSchedule`), the UNet (`UNet`, `UNetConfig`) and `load_unet` (a diffusers
UNet or pipeline folder, or a fastsp checkpoint), the transformer (`DiT`, `DiTConfig`, `load_dit`:
a diffusers DiTTransformer2DModel folder) and `build_model` (either, from its config).

The names are imported on first use (PEP 562), so `import fastsp.checkpoint` or
`import fastsp.config` does not import the training objective or register its Triton kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "DiT": "fastsp.dit",
    "DiTConfig": "fastsp.config",
    "FeatureMSELoss": "fastsp.feature_loss",
    "FlowProcess": "fastsp.flow",
    "NoiseSchedule": "fastsp.diffusion",
    "SelfPerceptualLoss": "fastsp.perceptual",
    "TritonUnavailableError": "fastsp.feature_loss",
    "UNet": "fastsp.unet",
    "UNetConfig": "fastsp.config",
    "build_model": "fastsp.models",
    "feature_mse": "fastsp.feature_loss",
    "feature_mse_multi": "fastsp.feature_loss",
    "load_dit": "fastsp.dit_diffusers",
    "load_unet": "fastsp.diffusers_unet",
}

__all__ = [
    "DiT",
    "DiTConfig",
    "FeatureMSELoss",
    "FlowProcess",
    "NoiseSchedule",
    "SelfPerceptualLoss",
    "TritonUnavailableError",
    "UNet",
    "UNetConfig",
    "__version__",
    "build_model",
    "feature_mse",
    "feature_mse_multi",
    "load_dit",
    "load_unet",
]

if TYPE_CHECKING:
    from fastsp.diffusers_unet import load_unet
    from fastsp.diffusion import NoiseSchedule
    from fastsp.dit import DiT
    from fastsp.dit_diffusers import load_dit
    from fastsp.feature_loss import (
        FeatureMSELoss,
        TritonUnavailableError,
        feature_mse,
        feature_mse_multi,
    )
    from fastsp.flow import FlowProcess
    from fastsp.model_config import DiTConfig, UNetConfig
    from fastsp.models import build_model
    from fastsp.perceptual import SelfPerceptualLoss
    from fastsp.unet import UNet


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastsp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
