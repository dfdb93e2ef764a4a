"""The diffusion core: beta schedules, zero terminal SNR, prediction types, DDIM and Euler sampling.

Notation (as in /work/shared/PAPER.md): discrete timesteps t in {0, ..., T-1}; alpha_bar_t is the
cumulative product of (1 - beta_t);

    a_t = sqrt(alpha_bar_t)        (signal coefficient)
    s_t = sqrt(1 - alpha_bar_t)    (noise coefficient), a_t^2 + s_t^2 = 1
    x_t = a_t * x0 + s_t * eps,    eps ~ N(0, I)
    v   = a_t * eps - s_t * x0     (the v-prediction target)

With phi_t = atan2(s_t, a_t) we have a_t = cos(phi_t), s_t = sin(phi_t): x_t moves on a circle
from x0 (phi = 0) to eps (phi = pi/2, reached exactly with zero terminal SNR), and v = dx_t/dphi.

Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed")
shifts and scales sqrt(alpha_bar) so that a_{T-1} = 0 while a_0 is kept. The paper fastsp trains
(Lin & Yang 2024, self-perceptual loss) uses scaled-linear betas 0.00085 -> 0.012, zero terminal
SNR, v-prediction and DDIM with trailing timestep spacing: the defaults here.

The conversions between prediction types are plain functions of explicit (a, s) so callers with
their own schedule tensors can use them; `NoiseSchedule` wraps them with table lookups that are
safe inside CUDA-graph captured training steps (no host sync, no host-to-device copy per call).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fastsp.config_fields import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    SAMPLERS,
    refuse_eps_at_zero_terminal_snr,
)
from fastsp.errors import ConfigError

if TYPE_CHECKING:
    from fastsp.config import TrainConfig

_COSINE_S = 0.008
_COSINE_MAX_BETA = 0.999

Coef = torch.Tensor | float


def _check_choice(field: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; allowed values: {allowed}")


def _check_int(field: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an int >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def make_betas(
    schedule: str,
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> torch.Tensor:
    """Beta schedule, float64 [num_timesteps] on CPU.

    - "linear": ``torch.linspace(beta_start, beta_end, T)``.
    - "scaled_linear": ``torch.linspace(beta_start**0.5, beta_end**0.5, T) ** 2`` (Stable
      Diffusion's schedule).
    - "cosine": Nichol & Dhariwal 2021 (improved DDPM), alpha_bar(u) = cos((u + s)/(1 + s) * pi/2)^2
      with s = 0.008 and beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), 0.999);
      beta_start and beta_end are ignored.
    """
    _check_choice("beta_schedule", schedule, BETA_SCHEDULES)
    _check_int("num_timesteps", num_timesteps, 1)
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start!r}, "
            f"beta_end={beta_end!r}"
        )
    f64 = torch.float64
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=f64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=f64) ** 2
    # cosine: alpha_bar at u = i / T for i = 0..T
    u = torch.arange(num_timesteps + 1, dtype=f64) / num_timesteps
    alpha_bar = torch.cos((u + _COSINE_S) / (1 + _COSINE_S) * (math.pi / 2)) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=_COSINE_MAX_BETA)


# Lin et al. 2024: sqrt_ab' = (sqrt_ab - sqrt_ab[T-1]) sqrt_ab[0] / (sqrt_ab[0] - sqrt_ab[T-1])
def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas [T] so that alpha_bar_{T-1} = 0 and alpha_bar_0 is kept; float64 [T].

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged;
    betas are recovered from the ratios of consecutive alpha_bar (the last beta is exactly 1).
    """
    if betas.ndim != 1 or betas.numel() < 2:
        raise ValueError(
            f"betas must be 1-D with at least 2 entries, got shape {tuple(betas.shape)}"
        )
    betas = betas.detach().to(device="cpu", dtype=torch.float64)
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    if not bool(first > last):
        raise ValueError("betas must not all be zero: alpha_bar is constant and cannot be rescaled")
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


# ---------------------------------------------------------------------------------------------
# Conversions on explicit coefficients a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t)
# ---------------------------------------------------------------------------------------------


# v = a eps - s x0 (Salimans & Ho 2022, eq. in sec. 4)
def v_target(x0: torch.Tensor, eps: torch.Tensor, a: Coef, s: Coef) -> torch.Tensor:
    """v-prediction target; x0, eps [B, ...], a, s broadcastable to them. Returns [B, ...]."""
    return a * eps - s * x0


# x0 = a x_t - s v ; eps = s x_t + a v (PAPER.md, "Notation")
def x0_eps_from_v(
    v: torch.Tensor, x_t: torch.Tensor, a: Coef, s: Coef
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) [B, ...] from a v prediction [B, ...] at x_t [B, ...]; no divisions."""
    return a * x_t - s * v, s * x_t + a * v


# x0 = (x_t - s eps) / a
def x0_eps_from_eps(
    eps: torch.Tensor, x_t: torch.Tensor, a: Coef, s: Coef
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) [B, ...] from an eps prediction [B, ...]; divides by a (0 at zsnr T-1)."""
    return (x_t - s * eps) / a, eps


# eps = (x_t - a x0) / s
def x0_eps_from_x0(
    x0: torch.Tensor, x_t: torch.Tensor, a: Coef, s: Coef
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) [B, ...] from an x0 prediction [B, ...]; divides by s (> 0 for every t)."""
    return x0, (x_t - a * x0) / s


_SPLITTERS = {"v": x0_eps_from_v, "eps": x0_eps_from_eps, "x0": x0_eps_from_x0}


def split_prediction(
    model_output: torch.Tensor, x_t: torch.Tensor, a: Coef, s: Coef, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat), each [B, ...], from a `prediction_type` model output [B, ...] at x_t."""
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    return _SPLITTERS[prediction_type](model_output, x_t, a, s)


def training_target(
    x0: torch.Tensor, eps: torch.Tensor, a: Coef, s: Coef, prediction_type: str
) -> torch.Tensor:
    """Regression target [B, ...] for `prediction_type` given clean x0 and noise eps [B, ...]."""
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "v":
        return v_target(x0, eps, a, s)
    return eps if prediction_type == "eps" else x0


# ---------------------------------------------------------------------------------------------
# NoiseSchedule
# ---------------------------------------------------------------------------------------------


class CoefficientTable:
    """(a_t, s_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) looked up on the device.

    a, s: float64 [T] on CPU. The [2, T] table is cached per (device, dtype), so after the first
    call per device and dtype a lookup needs no host sync and no host-to-device copy: it can be
    captured in a CUDA graph. `NoiseSchedule` and `fastsp.perceptual.SelfPerceptualLoss` share it.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = alphas_cumprod.detach().to(device="cpu", dtype=torch.float64)
        self.a = alphas_cumprod.sqrt()
        self.s = (1 - alphas_cumprod).sqrt()
        # (device, dtype) -> [2, T] table of (a, s); filled on first use per device and dtype.
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def prepare(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
        """Build the table for (device, dtype) now (a bare "cuda" means the current device)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self._table(device, dtype)

    def _table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        table = self._tables.get(key)
        if table is None:
            table = torch.stack([self.a, self.s]).to(device=device, dtype=dtype)
            self._tables[key] = table
        return table

    def __call__(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) for integer timesteps t [B] on like.device, each [B, 1, ..., 1] to broadcast
        against `like` [B, ...], in like.dtype."""
        table = self._table(like.device, like.dtype)
        shape = (t.shape[0],) + (1,) * (like.ndim - 1)
        coef = table[:, t]  # [2, B]
        return coef[0].view(shape), coef[1].view(shape)


class NoiseSchedule:
    """Discrete diffusion schedule with table lookups for training and sampling.

    Attributes (float64 [T] on CPU): betas, alphas_cumprod, a = sqrt(alphas_cumprod),
    s = sqrt(1 - alphas_cumprod); plus num_timesteps, prediction_type, beta_schedule,
    zero_terminal_snr. Timesteps are integers (long tensors) in [0, max_timestep].
    `fastsp.flow.FlowProcess` has the same interface for rectified flow.
    """

    name = "ddpm"

    def __init__(
        self,
        beta_schedule: str = "scaled_linear",
        num_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = True,
        prediction_type: str = "v",
    ):
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_int("num_timesteps", num_timesteps, 2)
        if not isinstance(zero_terminal_snr, bool):
            raise ValueError(f"zero_terminal_snr must be a bool, got {zero_terminal_snr!r}")
        refuse_eps_at_zero_terminal_snr(prediction_type, zero_terminal_snr)
        betas = make_betas(beta_schedule, num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.beta_schedule = beta_schedule
        self.num_timesteps = num_timesteps
        self.zero_terminal_snr = zero_terminal_snr
        self.prediction_type = prediction_type
        self.betas = betas
        self._set_alphas_cumprod(torch.cumprod(1 - betas, dim=0))

    def _set_alphas_cumprod(self, alphas_cumprod: torch.Tensor) -> None:
        self.alphas_cumprod = alphas_cumprod
        self.max_timestep = self.num_timesteps - 1
        self._coefficients = CoefficientTable(alphas_cumprod)
        self.a, self.s = self._coefficients.a, self._coefficients.s

    @classmethod
    def from_alphas_cumprod(
        cls, alphas_cumprod: torch.Tensor, prediction_type: str = "v"
    ) -> NoiseSchedule:
        """The schedule of a given alpha_bar [T] (any float dtype and device; e.g. a diffusers
        scheduler's `alphas_cumprod`); beta_schedule is None."""
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        alphas_cumprod = alphas_cumprod.detach().to(device="cpu", dtype=torch.float64)
        zero_terminal_snr = bool(alphas_cumprod.min() <= 0)  # on the host, once
        refuse_eps_at_zero_terminal_snr(prediction_type, zero_terminal_snr)
        schedule = cls.__new__(cls)
        schedule.beta_schedule, schedule.num_timesteps = None, alphas_cumprod.shape[0]
        schedule.zero_terminal_snr, schedule.prediction_type = zero_terminal_snr, prediction_type
        ratios = alphas_cumprod[1:] / alphas_cumprod[:-1]
        schedule.betas = 1 - torch.cat([alphas_cumprod[:1], ratios])
        schedule._set_alphas_cumprod(alphas_cumprod)
        return schedule

    @classmethod
    def from_config(cls, train: TrainConfig) -> NoiseSchedule:
        """The schedule a run trains with (and its checkpoints sample with): the schedule fields
        of its TrainConfig. A flow run's config is refused (`fastsp.flow.process_from_config`
        builds the process of any run)."""
        if train.diffusion != "ddpm":
            raise ConfigError(
                f"this run trains with --diffusion {train.diffusion}, not DDPM: its checkpoints "
                "sample with its own process (fastsp.flow.process_from_config)"
            )
        return cls(
            beta_schedule=train.beta_schedule,
            num_timesteps=train.num_timesteps,
            beta_start=train.beta_start,
            beta_end=train.beta_end,
            zero_terminal_snr=train.zero_terminal_snr,
            prediction_type=train.prediction_type,
        )

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(beta_schedule={self.beta_schedule!r}, "
            f"num_timesteps={self.num_timesteps}, zero_terminal_snr={self.zero_terminal_snr}, "
            f"prediction_type={self.prediction_type!r})"
        )

    def prepare(
        self, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> NoiseSchedule:
        """Build the cached (a, s) table for (device, dtype) now; returns self.

        Call it before compiling or CUDA-graph capturing a step that uses this schedule, so the
        one host-to-device copy happens outside the captured region and torch.compile does not
        recompile once the cache is filled.
        """
        self._coefficients.prepare(device, dtype)
        return self

    def coefficients(
        self, t: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) for integer timesteps t [B] on like.device, each shaped [B, 1, ..., 1] to
        broadcast against `like` [B, ...], in like.dtype on like.device.

        The (a, s) tables are cached per (device, dtype) and indexed on the device: no host sync
        and no host-to-device copy after the first call, so it can be captured in a CUDA graph.
        """
        return self._coefficients(t, like)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = a_t x0 + s_t eps; x0, eps [B, ...], t long [B]. Returns [B, ...]."""
        a, s = self.coefficients(t, x0)
        return a * x0 + s * eps

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Target [B, ...] for self.prediction_type; x0, eps [B, ...], t long [B]."""
        if self.prediction_type != "v":
            return eps if self.prediction_type == "eps" else x0
        a, s = self.coefficients(t, x0)
        return v_target(x0, eps, a, s)

    def split_prediction(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) [B, ...] from a model output [B, ...] at x_t [B, ...], t long [B]."""
        a, s = self.coefficients(t, x_t)
        return _SPLITTERS[self.prediction_type](model_output, x_t, a, s)

    def to_v(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v_hat [B, ...] from a self.prediction_type model output [B, ...] at x_t, t long [B]."""
        if self.prediction_type == "v":
            return model_output
        a, s = self.coefficients(t, x_t)
        x0_hat, eps_hat = _SPLITTERS[self.prediction_type](model_output, x_t, a, s)
        return v_target(x0_hat, eps_hat, a, s)

    def sample_timesteps(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Timesteps long [batch_size], uniform over {0, ..., T-1}, drawn on `device` with
        `generator` (which must live on that device)."""
        return torch.randint(
            0, self.num_timesteps, (batch_size,), device=device, generator=generator
        )

    def timesteps_between(
        self, low: int, high: int, like: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Timesteps long, uniform over {low, ..., high}, shaped as `like`, on its device."""
        return torch.randint(low, high + 1, like.shape, generator=generator, device=like.device)

    def sample(self, model_fn, noise: torch.Tensor, **options) -> torch.Tensor:
        """`sample(model_fn, self, noise, **options)`: x0 from the probability-flow ODE."""
        return sample(model_fn, self, noise, **options)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def sampling_timesteps(num_timesteps: int, num_steps: int) -> torch.Tensor:
    """Trailing timestep spacing (Lin et al. 2024, table 2): long [num_steps], descending, first
    element T-1. t_i = round(T - i * T / num_steps) - 1; e.g. T=1000, 10 steps -> 999, 899, ..., 99.
    """
    _check_int("num_timesteps", num_timesteps, 1)
    _check_int("num_steps", num_steps, 1)
    if num_steps > num_timesteps:
        raise ValueError(f"num_steps={num_steps} exceeds num_timesteps={num_timesteps}")
    ratio = num_timesteps / num_steps
    return torch.tensor(
        [round(num_timesteps - i * ratio) - 1 for i in range(num_steps)], dtype=torch.long
    )


# x_cfg = x_u + w (x_c - x_u); x_res = x_cfg std(x_c)/std(x_cfg); x = phi x_res + (1-phi) x_cfg
def guided_output(
    cond_out: torch.Tensor,
    uncond_out: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Classifier-free guidance with CFG rescale (PAPER.md, "Sampling"); inputs and output [B, ...].

    The std is taken per sample over all non-batch dimensions. guidance_scale = 1 returns cond_out.
    """
    if guidance_scale == 1.0:
        return cond_out
    cfg = uncond_out + guidance_scale * (cond_out - uncond_out)
    if guidance_rescale == 0.0:
        return cfg
    dims = tuple(range(1, cond_out.ndim))
    # clamp: a constant guided output (std 0) would otherwise turn the sample into NaN
    cfg_std = cfg.std(dim=dims, keepdim=True).clamp_min(torch.finfo(cfg.dtype).tiny)
    rescaled = cfg * (cond_out.std(dim=dims, keepdim=True) / cfg_std)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * cfg


@torch.no_grad()
def sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    num_steps: int = 50,
    sampler: str = "ddim",
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    uncond_model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Draw x0 [B, ...] from the probability-flow ODE started at `noise` [B, ...] (any device).

    model_fn(x_t [B, ...], t long [B]) returns the output in schedule.prediction_type;
    uncond_model_fn has the same signature and is required iff guidance_scale != 1 (it is not
    called otherwise). Timesteps are trailing-spaced (first t = T-1).

    - "ddim" (eta = 0): x_next = a_next x0_hat + s_next eps_hat; the last step goes to the clean
      sample (alpha_bar = 1), i.e. returns x0_hat of the last model call.
    - "euler": Euler steps in phi = atan2(s, a) on dx/dphi = v: x_next = x + (phi_next - phi) v_hat,
      the last step to phi = 0. Well defined at zero terminal SNR (phi = pi/2).

    Returns float (noise.dtype if float32/float64, else float32), same shape and device as noise.
    """
    _check_choice("sampler", sampler, SAMPLERS)
    if guidance_scale != 1.0 and uncond_model_fn is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs uncond_model_fn (the unconditional model); "
            "pass it, or use guidance_scale=1.0 for no guidance"
        )
    dtype = noise.dtype if noise.dtype in (torch.float32, torch.float64) else torch.float32
    x = noise.to(dtype)
    batch = x.shape[0]
    ts = sampling_timesteps(schedule.num_timesteps, num_steps).tolist()
    # Python floats from the CPU float64 tables: no device round trips while sampling.
    a_tab, s_tab = schedule.a.tolist(), schedule.s.tolist()

    def predict(t: int) -> torch.Tensor:
        t_batch = torch.full((batch,), t, dtype=torch.long, device=x.device)
        out = model_fn(x, t_batch)
        if guidance_scale != 1.0:
            out = guided_output(out, uncond_model_fn(x, t_batch), guidance_scale, guidance_rescale)
        return out.to(dtype)

    for i, t in enumerate(ts):
        a, s = a_tab[t], s_tab[t]
        last = i + 1 == len(ts)
        a_next, s_next = (1.0, 0.0) if last else (a_tab[ts[i + 1]], s_tab[ts[i + 1]])
        out = predict(t)
        if sampler == "ddim":
            x0_hat, eps_hat = split_prediction(out, x, a, s, schedule.prediction_type)
            x = x0_hat if last else a_next * x0_hat + s_next * eps_hat
        else:
            # DDIM in these coordinates is a rotation: with d = phi_next - phi,
            # a_next x0_hat + s_next eps_hat = cos(d) x + sin(d) v_hat. Euler replaces it by its
            # first-order Taylor expansion x + d v_hat, so one step differs from DDIM by O(d^2);
            # over N steps (d ~ 1/N) the difference is O(1/N) and both converge to the solution
            # of the same probability-flow ODE as steps grow.
            if schedule.prediction_type == "v":
                v_hat = out
            else:
                x0_hat, eps_hat = split_prediction(out, x, a, s, schedule.prediction_type)
                v_hat = v_target(x0_hat, eps_hat, a, s)
            d_phi = math.atan2(s_next, a_next) - math.atan2(s, a)
            x = x + d_phi * v_hat
    return x
