"""Rectified flow (flow matching): the process of Stable Diffusion 3, Flux and SiT, beside DDPM.

Flow time sigma in [0, 1] runs from data to noise on a straight line (Liu et al. 2022; Esser et
al. 2024, "Scaling Rectified Flow Transformers"):

    x_t = (1 - sigma) x0 + sigma eps,      v = dx_t/dsigma = eps - x0   (the network's target)
    x0_hat = x_t - sigma v_hat,            eps_hat = x_t + (1 - sigma) v_hat   (no division)

The network sees t = sigma * T (T = num_timesteps, 1000) as diffusers' flow models do
(`FlowMatchEulerDiscreteScheduler.timesteps`), so weights move between fastsp and diffusers
unchanged. Every timestep tensor of this process holds t = sigma * T as a float; the step, the
self-perceptual loss (x_t'_pred = add_noise(x0_hat, eps_hat, t') = x_t + (t' - t) v_hat / T) and
the samplers call `FlowProcess` through the interface `fastsp.diffusion.NoiseSchedule` has
(add_noise, training_target, split_prediction, sample_timesteps, timesteps_between, sample), so
they do not branch on the process. `process_from_config` builds the process of a run, and
`scheduler_config` the diffusers scheduler config that samples its export as fastsp does.

Training draws u per example, uniform or logit-normal (SD3's default: mean 0, std 1), and shifts
it: sigma = s u / (1 + (s - 1) u) (SD3: s = 3). Flux's resolution-dependent shift is the same map
with s = exp(mu), mu linear in the image sequence length (diffusers' `calculate_shift`).
Sampling is diffusers' `FlowMatchEulerDiscreteScheduler` step for step (`sampling_sigmas`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from fastsp.config_fields import FLOW_T_SAMPLING, SAMPLERS
from fastsp.diffusion import NoiseSchedule, guided_output
from fastsp.errors import ConfigError

if TYPE_CHECKING:
    from fastsp.config import TrainConfig

# Flux.1's scheduler config (diffusers' FlowMatchEulerDiscreteScheduler with use_dynamic_shifting)
FLUX_BASE_SEQ_LEN, FLUX_MAX_SEQ_LEN = 256, 4096
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15


def image_seq_len(height: int, width: int) -> int:
    """Flux's image sequence length of a latent [C, height, width]: its 2x2 patches."""
    return (height // 2) * (width // 2)


# mu = m L + b on the line through (256, 0.5) and (4096, 1.15) (diffusers' calculate_shift)
def flux_mu(seq_len: int) -> float:
    """Flux's mu (the log of its shift) for an image of `seq_len` tokens."""
    m = (FLUX_MAX_SHIFT - FLUX_BASE_SHIFT) / (FLUX_MAX_SEQ_LEN - FLUX_BASE_SEQ_LEN)
    return seq_len * m + (FLUX_BASE_SHIFT - m * FLUX_BASE_SEQ_LEN)


# SD3 eq. 23: sigma' = s sigma / (1 + (s - 1) sigma); Flux's exp(mu) / (exp(mu) + 1/sigma - 1) is
# the same map with s = exp(mu)
def shift_sigmas(sigma, shift: float):
    """The timestep shift of `sigma` (a tensor or float in [0, 1]); shift 1 is the identity."""
    return shift * sigma / (1 + (shift - 1) * sigma)


class FlowProcess:
    """The rectified-flow process of a run; timesteps are t = sigma * num_timesteps (floats).

    Args:
        num_timesteps: T, the model's time scale (diffusers' num_train_timesteps).
        shift: the fixed timestep shift s > 0 (1: none; SD3: 3).
        dynamic_shift: Flux's resolution-dependent shift instead (s = exp(flux_mu(L)), L the
            image sequence length of the training or sampled resolution); needs shift 1.
        resolution: the training side length (the dynamic shift's L at training time).
        t_sampling: how training draws u before the shift: "uniform" or "logit_normal".
        logit_mean, logit_std: the logit-normal's u = sigmoid(mean + std n), n ~ N(0, 1).
    """

    name = "flow"
    prediction_type = "v"  # the velocity eps - x0

    def __init__(
        self,
        num_timesteps: int = 1000,
        shift: float = 1.0,
        dynamic_shift: bool = False,
        resolution: int | None = None,
        t_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ):
        # TrainConfig refuses these by option (fastsp.config_fields.check_process_options);
        # here for a FlowProcess built by hand
        if not (math.isfinite(shift) and shift > 0):
            raise ConfigError(f"shift (--flow-shift) must be a finite number > 0, got {shift!r}")
        if not (math.isfinite(logit_std) and logit_std > 0):
            raise ConfigError(f"logit_std must be a finite number > 0, got {logit_std!r}")
        if not math.isfinite(logit_mean):
            raise ConfigError(f"logit_mean must be finite, got {logit_mean!r}")
        if t_sampling not in FLOW_T_SAMPLING:
            raise ConfigError(f"t_sampling: choose one of {', '.join(FLOW_T_SAMPLING)}")
        if dynamic_shift and shift != 1.0:
            raise ConfigError(
                f"dynamic_shift sets the shift from the resolution; drop shift={shift}"
            )
        if dynamic_shift and resolution is None:
            raise ValueError("dynamic_shift needs the training resolution")
        self.num_timesteps = num_timesteps
        self.max_timestep = num_timesteps  # t' ranges and --perceptual-on-t reach sigma = 1
        self.shift, self.dynamic_shift, self.resolution = shift, dynamic_shift, resolution
        self.t_sampling, self.logit_mean, self.logit_std = t_sampling, logit_mean, logit_std
        self.training_shift = self.shift_for(resolution, resolution) if dynamic_shift else shift

    @classmethod
    def from_config(cls, train: TrainConfig) -> FlowProcess:
        """The process a flow run trains with (and its checkpoints sample with)."""
        return cls(
            num_timesteps=train.num_timesteps,
            shift=train.flow_shift,
            dynamic_shift=train.flow_dynamic_shift,
            resolution=train.resolution,
            t_sampling=train.flow_t_sampling,
            logit_mean=train.flow_logit_mean,
            logit_std=train.flow_logit_std,
        )

    def __repr__(self) -> str:
        shift = "dynamic (Flux)" if self.dynamic_shift else self.shift
        return (
            f"FlowProcess(num_timesteps={self.num_timesteps}, shift={shift}, "
            f"t_sampling={self.t_sampling!r})"
        )

    def shift_for(self, height: int, width: int) -> float:
        """The shift at an image of height x width: Flux's exp(mu) or the fixed one."""
        return math.exp(flux_mu(image_seq_len(height, width))) if self.dynamic_shift else self.shift

    def prepare(
        self, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> FlowProcess:
        """Nothing to build: sigma = t / T is arithmetic on the device (NoiseSchedule's API)."""
        return self

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sigma = t / T [B, 1, ..., 1] in like.dtype, to broadcast against `like` [B, ...]."""
        shape = (t.shape[0],) + (1,) * (like.ndim - 1)
        return (t.to(like.dtype) / self.num_timesteps).view(shape)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma eps; x0, eps [B, ...], t [B]. Returns [B, ...]."""
        sigma = self.sigma(t, x0)
        return (1 - sigma) * x0 + sigma * eps

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity v = eps - x0 [B, ...]."""
        return eps - x0

    # x0 = x_t - sigma v ; eps = x_t + (1 - sigma) v
    def split_prediction(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) [B, ...] from a velocity [B, ...] at x_t [B, ...], t [B]."""
        sigma = self.sigma(t, x_t)
        return x_t - sigma * model_output, x_t + (1 - sigma) * model_output

    def sample_timesteps(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """t = T shift(u) float32 [batch_size], u uniform in [0, 1) or logit-normal, drawn on
        `device` with `generator`."""
        if self.t_sampling == "uniform":
            u = torch.rand(batch_size, device=device, generator=generator)
        else:
            n = torch.randn(batch_size, device=device, generator=generator)
            u = torch.sigmoid(self.logit_mean + self.logit_std * n)
        return shift_sigmas(u, self.training_shift) * self.num_timesteps

    def timesteps_between(
        self, low: float, high: float, like: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """t uniform in [low, high] (model time), float32 shaped as `like`, on its device."""
        u = torch.rand(like.shape, generator=generator, device=like.device)
        return low + (high - low) * u

    def sampling_sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """float64 [num_steps + 1]: diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps
        sigmas, the last 0. Its grid runs linearly from 1 to sigma_min = shift(1/T) (1/T under
        the dynamic shift, whose shift needs the resolution) and is then shifted."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        sigma_min = 1 / self.num_timesteps
        if not self.dynamic_shift:
            sigma_min = shift_sigmas(sigma_min, self.shift)
        grid = torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64)
        sigmas = shift_sigmas(grid, self.shift_for(height, width))
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    @torch.no_grad()
    def sample(
        self,
        model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise: torch.Tensor,
        num_steps: int = 50,
        sampler: str = "ddim",
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        uncond_model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x0 [B, ...] from the flow ODE dx/dsigma = v started at `noise` [B, C, H, W].

        Euler steps x <- x + (sigma_next - sigma) v_hat on `sampling_sigmas`, the model called at
        t = sigma T (diffusers' FlowMatchEulerDiscreteScheduler). Both samplers take this step:
        DDIM's (1 - sigma_next) x0_hat + sigma_next eps_hat is the same expression in x and
        v_hat. Guidance and its rescale act on v_hat (`fastsp.diffusion.guided_output`).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is not supported; allowed values: {SAMPLERS}")
        if guidance_scale != 1.0 and uncond_model_fn is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs uncond_model_fn")
        dtype = noise.dtype if noise.dtype in (torch.float32, torch.float64) else torch.float32
        x = noise.to(dtype)
        sigmas = self.sampling_sigmas(num_steps, x.shape[-2], x.shape[-1]).tolist()
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            t = torch.full((x.shape[0],), sigma * self.num_timesteps, dtype=dtype, device=x.device)
            v_hat = model_fn(x, t)
            if guidance_scale != 1.0:
                v_hat = guided_output(
                    v_hat, uncond_model_fn(x, t), guidance_scale, guidance_rescale
                )
            x = x + (sigma_next - sigma) * v_hat.to(dtype)
        return x


def process_from_config(train: TrainConfig) -> NoiseSchedule | FlowProcess:
    """The process a run of `train` trains with and its checkpoints sample with (--diffusion)."""
    if train.diffusion == "flow":
        return FlowProcess.from_config(train)
    return NoiseSchedule.from_config(train)


# fastsp's names -> diffusers' (DDIMScheduler's beta_schedule and prediction_type)
_DIFFUSERS_BETA_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",  # the same alpha_bar (s = 0.008) and 0.999 cap
}
_DIFFUSERS_PREDICTION_TYPES = {"v": "v_prediction", "eps": "epsilon", "x0": "sample"}


def scheduler_config(train: TrainConfig) -> dict[str, Any]:
    """The diffusers scheduler config that samples a run of `train` as fastsp does: what
    `python -m fastsp.export` writes as scheduler_config.json.

    DDPM: DDIMScheduler with the run's betas, T, prediction type, zero terminal SNR
    (rescale_betas_zero_snr) and fastsp's trailing timestep spacing, whose last step goes to
    alpha_bar = 1 (set_alpha_to_one) and returns x0_hat, as fastsp's DDIM does. Flow:
    FlowMatchEulerDiscreteScheduler with the run's shift, or Flux's dynamic shift (the pipeline
    passes mu = calculate_shift(image sequence length), fastsp.flow.flux_mu)."""
    if train.diffusion == "flow":
        return {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": train.num_timesteps,
            "shift": train.flow_shift,
            "use_dynamic_shifting": train.flow_dynamic_shift,
            "base_shift": FLUX_BASE_SHIFT,
            "max_shift": FLUX_MAX_SHIFT,
            "base_image_seq_len": FLUX_BASE_SEQ_LEN,
            "max_image_seq_len": FLUX_MAX_SEQ_LEN,
        }
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": train.num_timesteps,
        "beta_schedule": _DIFFUSERS_BETA_SCHEDULES[train.beta_schedule],
        "beta_start": train.beta_start,
        "beta_end": train.beta_end,
        "prediction_type": _DIFFUSERS_PREDICTION_TYPES[train.prediction_type],
        "rescale_betas_zero_snr": train.zero_terminal_snr,
        "timestep_spacing": "trailing",
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "clip_sample": False,
        "thresholding": False,
    }
