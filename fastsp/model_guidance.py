"""Model guidance (MG; Tang et al., "Diffusion Models without Classifier-free Guidance", arXiv
2502.12154) as a training objective: the model regresses onto a guided target and is sampled
without CFG.

The paper, in eps-terms (its guided objective):

    eps' = eps + w * sg(eps_hat(x_t, c) - eps_hat(x_t, null)),   loss = |eps_theta(x_t, c) - eps'|^2

fastsp's models predict other things (`NoiseSchedule.training_target`, `FlowProcess`), and at a
fixed x_t each prediction type is an affine function of eps with a coefficient that depends on t
alone, so the guided target is the same combination in the model's own output space:

    DDPM v (PAPER.md): x0 = (x_t - s eps) / a, so v = a eps - s x0 = (eps - s x_t) / a, and
        eps_hat = s x_t + a v_hat: v' = v + w (eps_hat_c - eps_hat_null) / a = v + w (v_c - v_null)
    DDPM eps: the paper's equation as it stands
    DDPM x0: x0' = (x_t - s eps') / a = x0 - (s / a) w (eps_hat_c - eps_hat_null), and
        eps_hat = (x_t - a x0_hat) / s: x0' = x0 + w (x0_c - x0_null)
    flow: v = eps - x0 = (eps - x_t) / (1 - sigma) and eps_hat = x_t + (1 - sigma) v_hat:
        v' = v + w (v_c - v_null)

    target' = target + w * sg(f(x_t, c) - f(x_t, null))

with no division at all (a = 0 at zero terminal SNR's last step would make the eps-space route
divide by zero). What follows the authors' code (train.py of github.com/tzco/Diffusion-wo-CFG,
read in a public fork): the guidance term comes from the EMA model under no_grad (the paper's
stop-gradient, and its EMA for stability); examples whose condition CFG dropout replaced by the
null one train on the plain target (w = 0), so the model keeps an unconditional prediction to
guide with; guidance applies only where t / T <= t_max (their default 0.75: off at the noisiest
quarter of the timesteps); w is a constant (their default scale 1.45, i.e. w = 0.45). At its fixed
point (f_null = E[eps | x_t], f_c = E[eps | x_t, c] + w (f_c - f_null)) the conditional
prediction is CFG's with scale 1 / (1 - w), so w must stay below 1: w >= 1 has no fixed point.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# The authors' defaults (train.py: --mgw 1.45 gives w = 1.45 - 1, --mg-high 0.75)
DEFAULT_SCALE = 0.45
DEFAULT_T_MAX = 0.75


class ModelGuidance:
    """The guided target of model guidance (module docstring) for one process.

    Args:
        guide: the network whose predictions make the guidance term (the online model's EMA);
            called as `guide(x_t, t, **cond)`, never with gradients.
        num_timesteps: T of the process (t / T is the fraction of the process, flow: sigma).
        scale: w in [0, 1).
        t_max: guidance where t / T <= t_max; 1 guides every timestep.
    """

    def __init__(
        self,
        guide: nn.Module,
        num_timesteps: int,
        scale: float = DEFAULT_SCALE,
        t_max: float = DEFAULT_T_MAX,
    ):
        if not 0 <= scale < 1:
            raise ValueError(
                f"model guidance scale w={scale} must be in [0, 1): at the fixed point the "
                "prediction is CFG's with scale 1 / (1 - w)"
            )
        if not 0 <= t_max <= 1:
            raise ValueError(f"model guidance t_max={t_max} must be in [0, 1]")
        self.guide, self.scale, self.t_max = guide, scale, t_max
        self.num_timesteps = num_timesteps

    def guided_target(
        self,
        target: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: Mapping[str, torch.Tensor | None],
        null_cond: Mapping[str, torch.Tensor | None],
        guided: torch.Tensor,
    ) -> torch.Tensor:
        """target + w * sg(guide(x_t, c) - guide(x_t, null)) per example; w = 0 where `guided`
        [B] (bool: the rows CFG dropout kept) is False or t / T > t_max.

        The conditional and the unconditional prediction are one forward of batch 2B. On the
        device throughout: the per-example weight is a torch.where, not a Python branch.
        """
        batch = x_t.shape[0]
        both_cond = {
            k: None if v is None else torch.cat([v, null_cond[k]]) for k, v in cond.items()
        }
        with torch.no_grad():
            both = self.guide(torch.cat([x_t, x_t]), torch.cat([t, t]), **both_cond)
            difference = (both[:batch] - both[batch:]).to(target.dtype)
            on = guided & (t <= self.t_max * self.num_timesteps)
            w = self.scale * on.to(target.dtype)  # in the target's dtype (a float64 w in tests)
            return target + w.reshape((-1,) + (1,) * (target.ndim - 1)) * difference
