"""The loss of one micro-batch for each objective, on the step's inputs: `training_loss` (the
fast path: MSE, the self-perceptual loss of PAPER.md Algorithm 1, model guidance) and
`reference_training_loss` (the same through fastsp.reference's naive oracle).
`fastsp.step.TrainStep` calls one of them per micro-batch; the randomness and the buffers are the
step's.
"""

from __future__ import annotations

import torch

from fastsp import reference
from fastsp.diffusion import NoiseSchedule
from fastsp.feature_loss import feature_mse
from fastsp.flow import FlowProcess
from fastsp.model_guidance import ModelGuidance
from fastsp.perceptual import SelfPerceptualLoss


def training_loss(
    model: torch.nn.Module,
    schedule: NoiseSchedule | FlowProcess,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, torch.Tensor | None],
    perceptual_loss: SelfPerceptualLoss | None = None,
    t_prime: torch.Tensor | None = None,
    mse_weight: float = 0.0,
    model_guidance: ModelGuidance | None = None,
    null_cond: dict[str, torch.Tensor | None] | None = None,
    guided: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 1 (perceptual_loss None): mean((f(x_t, t, c) - target)^2), target v = a eps - s x0
    (flow: v = eps - x0); `schedule` is the process, a NoiseSchedule or a FlowProcess. With
    `model_guidance`, the target is its guided one (fastsp.model_guidance), from the null
    condition `null_cond` and the rows CFG dropout kept, `guided` [B].

    Stage 2: PAPER.md Algorithm 1 through `perceptual_loss`, plus mse_weight x the MSE loss.
    Both squared errors go through `fastsp.feature_mse` (one fused pass on CUDA); the loss is
    returned in fp32 (or float64 for float64 models).
    """
    x_t = schedule.add_noise(x0, noise, t)
    prediction = model(x_t, t, **cond)
    loss_dtype = torch.promote_types(prediction.dtype, torch.float32)  # bf16 -> fp32
    if perceptual_loss is None:
        target = schedule.training_target(x0, noise, t)
        if model_guidance is not None:
            target = model_guidance.guided_target(target, x_t, t, cond, null_cond, guided)
        return feature_mse(prediction, target.to(prediction.dtype)).to(loss_dtype)
    target = None  # the MSE target, when an MSE term needs it (a static choice, not the data's)
    if mse_weight > 0 or perceptual_loss.on_t is not None:
        target = schedule.training_target(x0, noise, t).to(prediction.dtype)
    loss = perceptual_loss(prediction, x0, noise, t, t_prime, cond, x_t=x_t, target=target)
    if mse_weight > 0:
        loss = loss + mse_weight * feature_mse(prediction, target).to(loss_dtype)
    return loss


def reference_training_loss(
    model: torch.nn.Module,
    schedule: NoiseSchedule | FlowProcess,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, torch.Tensor | None],
    perceptual_loss: SelfPerceptualLoss | None = None,
    t_prime: torch.Tensor | None = None,
    prediction_type: str = "v",
    model_guidance: ModelGuidance | None = None,
    null_cond: dict[str, torch.Tensor | None] | None = None,
    guided: torch.Tensor | None = None,
) -> torch.Tensor:
    """The naive oracle's loss (fastsp.reference) on the same inputs as `training_loss`."""
    flow, T = schedule.name == "flow", schedule.num_timesteps
    alphas = None if flow else schedule.alphas_cumprod.to(x0.device, x0.dtype)
    if model_guidance is not None:
        args = (model_guidance.guide, x0, noise, t, cond, null_cond, guided)
        return reference.reference_model_guidance_loss(
            model, *args, model_guidance.scale, model_guidance.t_max, alphas, T, prediction_type
        )
    on_t = perceptual_loss.on_t if perceptual_loss is not None else None
    if perceptual_loss is not None:  # the taps and normalisation of the fast loss
        options = {"layers": perceptual_loss.layers, "norm": perceptual_loss.feature_norm}
    if flow:
        if perceptual_loss is None:
            return reference.reference_flow_mse_loss(model, x0, noise, t, T, **cond)
        perceptual = perceptual_loss.perceptual
        return reference.reference_flow_self_perceptual_loss(
            model, perceptual, x0, noise, t, t_prime, T, on_t=on_t, **options, **cond
        )
    if perceptual_loss is None:
        return reference.reference_mse_loss(
            model, x0, noise, t, alphas, prediction_type=prediction_type, **cond
        )
    return reference.reference_self_perceptual_loss(
        model,
        perceptual_loss.perceptual,
        x0,
        noise,
        t,
        t_prime,
        alphas,
        prediction_type=prediction_type,
        on_t=on_t,
        **options,
        **cond,
    )
