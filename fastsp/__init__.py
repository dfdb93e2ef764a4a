"""fastsp: performance-first diffusion training with the self-perceptual objective.

The public surface: the fused feature-space MSE (`feature_mse`, `FeatureMSELoss`,
`feature_mse_multi`), the self-perceptual loss for any trainer (`SelfPerceptualLoss`), the
diffusion core (`NoiseSchedule`) and the UNet (`UNet`, `UNetConfig`).
"""

from fastsp.diffusion import NoiseSchedule
from fastsp.feature_loss import (
    FeatureMSELoss,
    TritonUnavailableError,
    feature_mse,
    feature_mse_multi,
)
from fastsp.perceptual import SelfPerceptualLoss
from fastsp.unet import UNet, UNetConfig

__version__ = "0.1.0"

__all__ = [
    "FeatureMSELoss",
    "NoiseSchedule",
    "SelfPerceptualLoss",
    "TritonUnavailableError",
    "UNet",
    "UNetConfig",
    "__version__",
    "feature_mse",
    "feature_mse_multi",
]
