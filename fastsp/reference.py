"""The naive reference: one MSE step and one self-perceptual step, written the obvious way.

This file is the oracle for every optimisation of the trainer and the baseline of the
benchmarks. It is deliberately naive and independent of the fast code paths (from fastsp it
imports only the leaf fastsp.config_fields: the prediction types and the eps-prediction rule;
rectified flow's losses, `reference_flow_*`, follow the DDPM ones):
eager mode in the inputs' dtype (fp32, or float64 in tests), the schedule arithmetic written out
from PAPER.md, two separate *full* forwards of the frozen perceptual network with a forward hook
on its mid block (no `taps=`, so the decoder half runs and is thrown away), no
truncation, `F.mse_loss`, and torch's default AdamW.

Cost (PAPER.md "Cost of one self-perceptual step", F = one full UNet forward): the fast path needs
online F + 2F backward + F/2 real branch + F/2 forward and F/2 input-only backward on the
predicted branch = about 4.5F (1.5x an MSE step's 3F). Here both perceptual forwards are full
(F each instead of F/2; the predicted one also records the decoder's graph, which backward never
visits), so about 5.5F: roughly 1.8x an MSE step, and more activation memory.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fastsp.config_fields import PREDICTION_TYPES, refuse_eps_at_zero_terminal_snr


def coefficients(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int = 4):
    """a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t), shaped [B, 1, ...] (ndim dims).

    In alphas_cumprod's dtype and device: pass it in the model's dtype (float64 would promote x_t).
    """
    alpha_bar = alphas_cumprod[t.to(alphas_cumprod.device)]
    shape = (-1,) + (1,) * (ndim - 1)
    return alpha_bar.sqrt().reshape(shape), (1 - alpha_bar).sqrt().reshape(shape)


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )


def reference_mse_loss(
    model,
    x0,
    noise,
    t,
    alphas_cumprod,
    labels=None,
    context=None,
    prediction_type="v",
    **conditions,
) -> torch.Tensor:
    """Stage 1 (PAPER.md): mean((f(x_t, t, c) - target)^2). `conditions`: a diffusers family's
    other inputs (pooled, time_ids), passed to every call of a network."""
    _check_prediction_type(prediction_type)
    a, s = coefficients(alphas_cumprod, t, x0.ndim)
    x_t = a * x0 + s * noise  # x_t = a_t x0 + s_t eps
    target = {"v": a * noise - s * x0, "eps": noise, "x0": x0}[prediction_type]  # v = a eps - s x0
    return F.mse_loss(model(x_t, t, labels=labels, context=context, **conditions), target)


def mid_features(perceptual, x, t, labels=None, context=None, **conditions) -> torch.Tensor:
    """Full forward of `perceptual`; returns what a forward hook on `perceptual.mid` saw (a
    diffusers family's `mid_tap`: its module and which output holds the image tokens)."""
    stored = []
    module, index = perceptual.mid_tap if hasattr(perceptual, "mid_tap") else (perceptual.mid, None)
    handle = module.register_forward_hook(
        lambda module, args, out: stored.append(out if index is None else out[index])
    )
    try:
        perceptual(x, t, labels=labels, context=context, **conditions)  # the output is discarded
    finally:
        handle.remove()
    return stored[0]


def reference_self_perceptual_loss(
    model,
    perceptual,
    x0,
    noise,
    t,
    t_prime,
    alphas_cumprod,
    labels=None,
    context=None,
    prediction_type="v",
    on_t=None,
    **conditions,
) -> torch.Tensor:
    """Stage 2, PAPER.md Algorithm 1, literally. `perceptual` is frozen by the caller.

    on_t (low, high): per example, this loss where low <= t <= high and the MSE loss elsewhere
    (--perceptual-on-t); None: this loss everywhere (the paper)."""
    _check_prediction_type(prediction_type)
    a, s = coefficients(alphas_cumprod, t, x0.ndim)
    x_t = a * x0 + s * noise  # step 1: x_t = a_t x0 + s_t eps
    out = model(x_t, t, labels=labels, context=context, **conditions)  # step 2
    if prediction_type == "v":  # x0_hat = a x_t - s v_hat, eps_hat = s x_t + a v_hat
        x0_hat, eps_hat = a * x_t - s * out, s * x_t + a * out
    elif prediction_type == "eps":  # x0_hat = (x_t - s eps_hat) / a
        refuse_eps_at_zero_terminal_snr(prediction_type, bool((a == 0).any()))
        x0_hat, eps_hat = (x_t - s * out) / a, out
    else:  # eps_hat = (x_t - a x0_hat) / s
        if bool((s == 0).any()):
            raise ValueError("x0-prediction divides by s_t = 0")
        x0_hat, eps_hat = out, (x_t - a * out) / s
    a2, s2 = coefficients(alphas_cumprod, t_prime, x0.ndim)  # step 3: t' drawn by the caller
    with torch.no_grad():  # step 4-5, real branch: x_t'_real = a_t' x0 + s_t' eps
        x_real = a2 * x0 + s2 * noise
        h_real = mid_features(perceptual, x_real, t_prime, labels, context, **conditions)
    # step 4-5, predicted branch (with grad): x_t'_pred = a_t' x0_hat + s_t' eps_hat
    x_pred = a2 * x0_hat + s2 * eps_hat
    h_pred = mid_features(perceptual, x_pred, t_prime, labels, context, **conditions)
    if on_t is None:
        return F.mse_loss(h_pred, h_real)  # step 6: mean((h_pred - h_real)^2)
    # per example: the feature loss inside [low, high], the MSE loss against the target outside
    per_example_sp = F.mse_loss(h_pred, h_real, reduction="none").flatten(1).mean(1)
    target = {"v": a * noise - s * x0, "eps": noise, "x0": x0}[prediction_type]
    per_example_mse = F.mse_loss(out, target, reduction="none").flatten(1).mean(1)
    inside = (t >= on_t[0]) & (t <= on_t[1])
    return torch.where(inside, per_example_sp, per_example_mse).mean()


# Rectified flow (fastsp.flow), written out: the model sees t = sigma * T, sigma = t / T.
def flow_sigma(t: torch.Tensor, num_timesteps: int, like: torch.Tensor) -> torch.Tensor:
    """sigma = t / T shaped [B, 1, ...] in like's dtype."""
    return (t.to(like.dtype) / num_timesteps).reshape((-1,) + (1,) * (like.ndim - 1))


def reference_flow_mse_loss(
    model, x0, noise, t, num_timesteps=1000, labels=None, context=None, **conditions
) -> torch.Tensor:
    """Stage 1 under flow: mean((f(x_t, t, c) - (eps - x0))^2), x_t = (1 - sigma) x0 + sigma eps."""
    sigma = flow_sigma(t, num_timesteps, x0)
    x_t = (1 - sigma) * x0 + sigma * noise
    return F.mse_loss(model(x_t, t, labels=labels, context=context, **conditions), noise - x0)


def reference_flow_self_perceptual_loss(
    model,
    perceptual,
    x0,
    noise,
    t,
    t_prime,
    num_timesteps=1000,
    labels=None,
    context=None,
    on_t=None,
    **conditions,
) -> torch.Tensor:
    """Stage 2 under flow (Algorithm 1 with the flow process), literally; t, t' are sigma * T."""
    sigma = flow_sigma(t, num_timesteps, x0)
    x_t = (1 - sigma) * x0 + sigma * noise
    v_hat = model(x_t, t, labels=labels, context=context, **conditions)
    # x0_hat = x_t - sigma v_hat, eps_hat = x_t + (1 - sigma) v_hat
    x0_hat, eps_hat = x_t - sigma * v_hat, x_t + (1 - sigma) * v_hat
    sigma2 = flow_sigma(t_prime, num_timesteps, x0)
    with torch.no_grad():  # x_t'_real = (1 - sigma') x0 + sigma' eps
        x_real = (1 - sigma2) * x0 + sigma2 * noise
        h_real = mid_features(perceptual, x_real, t_prime, labels, context, **conditions)
    # x_t'_pred = (1 - sigma') x0_hat + sigma' eps_hat
    x_pred = (1 - sigma2) * x0_hat + sigma2 * eps_hat
    h_pred = mid_features(perceptual, x_pred, t_prime, labels, context, **conditions)
    if on_t is None:
        return F.mse_loss(h_pred, h_real)
    per_example_sp = F.mse_loss(h_pred, h_real, reduction="none").flatten(1).mean(1)
    per_example_mse = F.mse_loss(v_hat, noise - x0, reduction="none").flatten(1).mean(1)
    inside = (t >= on_t[0]) & (t <= on_t[1])
    return torch.where(inside, per_example_sp, per_example_mse).mean()


def reference_mse_step(
    model, optimizer, x0, noise, t, alphas_cumprod, labels=None, context=None, prediction_type="v"
) -> float:
    """One eager MSE training step; returns the loss."""
    optimizer.zero_grad()
    loss = reference_mse_loss(model, x0, noise, t, alphas_cumprod, labels, context, prediction_type)
    loss.backward()
    optimizer.step()
    return loss.item()


def reference_self_perceptual_step(
    model,
    perceptual,
    optimizer,
    x0,
    noise,
    t,
    t_prime,
    alphas_cumprod,
    labels=None,
    context=None,
    prediction_type="v",
    on_t=None,
) -> float:
    """One eager self-perceptual training step; returns the loss."""
    optimizer.zero_grad()
    loss = reference_self_perceptual_loss(
        model,
        perceptual,
        x0,
        noise,
        t,
        t_prime,
        alphas_cumprod,
        labels,
        context,
        prediction_type,
        on_t,
    )
    loss.backward()
    optimizer.step()
    return loss.item()


def make_reference_optimizer(model: nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    """torch.optim.AdamW with torch's defaults except lr."""
    return torch.optim.AdamW(model.parameters(), lr=lr)


def frozen_copy(model: nn.Module) -> nn.Module:
    """f_star from the stage-1 model: a deep copy in eval mode with no parameter gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)
