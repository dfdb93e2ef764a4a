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

from fastsp.config_fields import (
    FEATURE_NORM_EPS,
    PREDICTION_TYPES,
    refuse_eps_at_zero_terminal_snr,
)


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
    pooled embeddings and time ids (fastsp.families), passed to the model as they are."""
    _check_prediction_type(prediction_type)
    a, s = coefficients(alphas_cumprod, t, x0.ndim)
    x_t = a * x0 + s * noise  # x_t = a_t x0 + s_t eps
    target = {"v": a * noise - s * x0, "eps": noise, "x0": x0}[prediction_type]  # v = a eps - s x0
    return F.mse_loss(model(x_t, t, labels=labels, context=context, **conditions), target)


def mid_features(perceptual, x, t, labels=None, context=None, **conditions) -> torch.Tensor:
    """Full forward of `perceptual`; returns what a forward hook on `perceptual.mid` saw."""
    return tapped_features(perceptual, x, t, ["mid"], labels, context, **conditions)["mid"]


def tapped_features(perceptual, x, t, names, labels=None, context=None, **conditions) -> dict:
    """Full forward of the UNet `perceptual`; {name: what a forward hook on that level saw}, for
    the names of its taps: "mid" is `perceptual.mid`, "down1" `perceptual.down[1]`, "up0"
    `perceptual.up[0]`. A diffusers family's "mid" is its `mid_tap`: the module and which of its
    outputs holds the image tokens (fastsp.families)."""
    stored = {}
    handles = []
    for name in names:
        index = None
        if name == "mid" and hasattr(perceptual, "mid_tap"):
            module, index = perceptual.mid_tap
        else:
            level = name.rstrip("0123456789")
            module = getattr(perceptual, level)
            if level != name:
                module = module[int(name[len(level) :])]

        def hook(module, args, out, key=name, index=index) -> None:  # None: output unchanged
            stored.setdefault(key, out if index is None else out[index])

        handles.append(module.register_forward_hook(hook))
    try:
        perceptual(x, t, labels=labels, context=context, **conditions)  # the output is discarded
    finally:
        for handle in handles:
            handle.remove()
    return stored


def feature_loss_per_example(h_pred, h_real, norm="none") -> torch.Tensor:
    """[B]: one layer's squared feature distance per example, the features normalised by the
    real branch's statistics (norm: none, the paper; channel; energy), written out."""
    if norm == "channel":  # (f - mu_real) / sigma_real per example and channel
        axes = (2, 3) if h_real.ndim == 4 else (1,)
        mu = h_real.mean(dim=axes, keepdim=True)
        sigma = (((h_real - mu) ** 2).mean(dim=axes, keepdim=True) + FEATURE_NORM_EPS).sqrt()
        h_pred, h_real = (h_pred - mu) / sigma, (h_real - mu) / sigma
    squared = ((h_pred - h_real) ** 2).flatten(1)
    if norm == "energy":  # ||f_pred - f_real||^2 / (||f_real||^2 + eps)
        return squared.sum(1) / ((h_real**2).flatten(1).sum(1) + FEATURE_NORM_EPS)
    return squared.mean(1)


def _perceptual_loss(
    perceptual,
    x_real,
    x_pred,
    t_prime,
    labels,
    context,
    layers,
    norm,
    on_t,
    t,
    mse_per_example,
    conditions,
):
    """Steps 5-6 of Algorithm 1 on the two re-noised inputs: the real branch without gradient,
    the feature loss per example summed over `layers` {name: weight} (None: the mid block, the
    paper), then its mean; or, with on_t (low, high), per example this loss where
    low <= t <= high and `mse_per_example` elsewhere (--perceptual-on-t)."""
    layers = layers or {"mid": 1.0}
    with torch.no_grad():
        h_real = tapped_features(
            perceptual, x_real, t_prime, list(layers), labels, context, **conditions
        )
    h_pred = tapped_features(
        perceptual, x_pred, t_prime, list(layers), labels, context, **conditions
    )
    if on_t is None and norm == "none" and list(layers) == ["mid"]:
        return layers["mid"] * F.mse_loss(h_pred["mid"], h_real["mid"])  # mean((h_pred - h_real)^2)
    per_example = sum(
        w * feature_loss_per_example(h_pred[n], h_real[n], norm) for n, w in layers.items()
    )
    if on_t is None:
        return per_example.mean()
    inside = (t >= on_t[0]) & (t <= on_t[1])
    return torch.where(inside, per_example, mse_per_example).mean()


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
    layers=None,
    norm="none",
    **conditions,
) -> torch.Tensor:
    """Stage 2, PAPER.md Algorithm 1, literally. `perceptual` is frozen by the caller.

    on_t (low, high): per example, this loss where low <= t <= high and the MSE loss elsewhere
    (--perceptual-on-t); None: this loss everywhere (the paper). layers {name: weight} (None: the
    mid block) and norm (--perceptual-norm): see `_perceptual_loss`."""
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
    # step 4: x_t'_real = a_t' x0 + s_t' eps, x_t'_pred = a_t' x0_hat + s_t' eps_hat
    target = {"v": a * noise - s * x0, "eps": noise, "x0": x0}[prediction_type]
    mse = F.mse_loss(out, target, reduction="none").flatten(1).mean(1)
    x_real, x_pred = a2 * x0 + s2 * noise, a2 * x0_hat + s2 * eps_hat
    return _perceptual_loss(
        perceptual, x_real, x_pred, t_prime, labels, context, layers, norm, on_t, t, mse, conditions
    )


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
    layers=None,
    norm="none",
    **conditions,
) -> torch.Tensor:
    """Stage 2 under flow (Algorithm 1 with the flow process), literally; t, t' are sigma * T."""
    sigma = flow_sigma(t, num_timesteps, x0)
    x_t = (1 - sigma) * x0 + sigma * noise
    v_hat = model(x_t, t, labels=labels, context=context, **conditions)
    # x0_hat = x_t - sigma v_hat, eps_hat = x_t + (1 - sigma) v_hat
    x0_hat, eps_hat = x_t - sigma * v_hat, x_t + (1 - sigma) * v_hat
    sigma2 = flow_sigma(t_prime, num_timesteps, x0)
    # x_t'_real = (1 - sigma') x0 + sigma' eps, x_t'_pred = (1 - sigma') x0_hat + sigma' eps_hat
    x_real, x_pred = (1 - sigma2) * x0 + sigma2 * noise, (1 - sigma2) * x0_hat + sigma2 * eps_hat
    mse = F.mse_loss(v_hat, noise - x0, reduction="none").flatten(1).mean(1)
    return _perceptual_loss(
        perceptual, x_real, x_pred, t_prime, labels, context, layers, norm, on_t, t, mse, conditions
    )


# Model guidance (fastsp.model_guidance), written out in the model's output space.
def reference_model_guidance_loss(
    model,
    guide,
    x0,
    noise,
    t,
    cond,
    null_cond,
    guided,
    scale,
    t_max,
    alphas_cumprod=None,
    num_timesteps=1000,
    prediction_type="v",
) -> torch.Tensor:
    """mean((f(x_t, t, c) - target')^2), target' = target + w (guide(x_t, c) - guide(x_t, null))
    without gradient, w = scale where `guided` [B] and t / T <= t_max, else 0 (arXiv 2502.12154's
    eps' = eps + w sg(eps_hat_c - eps_hat_null), in v, eps or x0: fastsp.model_guidance).
    cond, null_cond: {"labels": ..., "context": ...}. DDPM with alphas_cumprod, rectified flow
    (t = sigma T, T = num_timesteps) without."""
    if alphas_cumprod is None:  # flow: x_t = (1 - sigma) x0 + sigma eps, target v = eps - x0
        sigma = flow_sigma(t, num_timesteps, x0)
        x_t, target = (1 - sigma) * x0 + sigma * noise, noise - x0
    else:
        _check_prediction_type(prediction_type)
        num_timesteps = alphas_cumprod.shape[0]
        a, s = coefficients(alphas_cumprod, t, x0.ndim)
        x_t = a * x0 + s * noise
        target = {"v": a * noise - s * x0, "eps": noise, "x0": x0}[prediction_type]
    with torch.no_grad():
        f_cond = guide(x_t, t, **cond)
        f_null = guide(x_t, t, **null_cond)
    on = guided & (t <= t_max * num_timesteps)
    w = (scale * on.to(x0.dtype)).reshape((-1,) + (1,) * (x0.ndim - 1))
    guided_target = target + w * (f_cond - f_null)
    return F.mse_loss(model(x_t, t, **cond), guided_target)


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
