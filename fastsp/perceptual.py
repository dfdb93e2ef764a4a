"""The self-perceptual objective (PAPER.md, Algorithm 1) as a loss any trainer can call.

    loss_fn = SelfPerceptualLoss(frozen_unet, alphas_cumprod, layers="mid", prediction_type="v")
    loss = loss_fn(model_output, x0, noise, t, cond={"labels": y})

Per example: x_t = add_noise(x0, eps, t), the online prediction gives (x0_hat, eps_hat); a new,
independent t' re-noises both the data and the prediction,
    x_real = add_noise(x0,     eps,     t')   (no gradient)
    x_pred = add_noise(x0_hat, eps_hat, t')   (gradient flows into the online model)
and the loss is the distance between the frozen network's features of the two at the tapped
layers (the mid block by default). The process is DDPM's (a `NoiseSchedule`, or any
alphas_cumprod: add_noise = a_t x0 + s_t eps) or rectified flow's (a `fastsp.flow.FlowProcess`:
(1 - sigma) x0 + sigma eps, so x_pred - x_real = (t' - t)(v_hat - v) / T); the loss only calls
the process, so every option means the same in either's time.

Cost (PAPER.md, "Cost of one self-perceptual step"): the frozen network runs only up to the
deepest tapped layer, the real branch runs under no_grad, and the frozen network's parameters
never require gradients, so its backward computes input gradients only. For a fastsp model the
forward stops through its native `taps=` argument; for any other network (e.g. a diffusers
`UNet2DConditionModel`, layer "mid_block") forward hooks capture the named submodules' outputs and
stop the forward once the deepest one has run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastsp.config_fields import (
    DISTANCES,
    FEATURE_NORM_EPS,
    FEATURE_NORMS,
    PREDICTED_NOISE,
    parse_layers,
    parse_perceptual_on_t,
    parse_perceptual_t,
)
from fastsp.diffusion import NoiseSchedule
from fastsp.feature_loss import feature_mse, feature_mse_multi
from fastsp.flow import FlowProcess
from fastsp.models import is_native

# diffusers' names for the prediction types, accepted as aliases
_PREDICTION_ALIASES = {
    "v_prediction": "v",
    "epsilon": "eps",
    "sample": "x0",
    "v": "v",
    "eps": "eps",
    "x0": "x0",
}


def normalise_features(
    predicted: torch.Tensor, real: torch.Tensor, norm: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Both branches' features rescaled by statistics of the real branch alone (it carries no
    gradient), and the factor that turns the mean over an example's features into its loss.

    channel (LPL's "shared" normalisation): f -> (f - mu_real) / sigma_real per example and
        channel, over the spatial axes of [B, C, H, W] or the tokens of [B, L, D]. The mean
        cancels in f_pred - f_real, so both are only divided by sigma_real = sqrt(var_real +
        eps); factor 1.
    energy: ||f_pred - f_real||^2 / (||f_real||^2 + eps) per example, which is the squared
        distance of f / sqrt(||f_real||^2 + eps): both are scaled, and the mean over the
        example's N features times N (the factor) is the ratio.
    eps = FEATURE_NORM_EPS keeps a layer whose real features are all zero finite (no 0 / 0).
    A per-example scale keeps both cases on the fused kernels (feature_mse, feature_mse_multi),
    which reduce to one number or not at all: no per-example sum is needed. The features are
    scaled in fp32 (float64 stays float64): rounding each scaled bf16 feature on its own would
    lose the small differences the loss measures.
    """
    if norm == "none":
        return predicted, real, 1
    dtype = torch.promote_types(real.dtype, torch.float32)
    real = real.detach().to(dtype)
    if norm == "channel":
        if real.ndim not in (3, 4):
            raise ValueError(
                f"perceptual_norm 'channel' needs [B, C, H, W] or [B, L, D] features, got "
                f"{list(real.shape)}"
            )
        axes = (2, 3) if real.ndim == 4 else (1,)
        scale = (real.var(dim=axes, unbiased=False, keepdim=True) + FEATURE_NORM_EPS).rsqrt()
        return predicted.to(dtype) * scale, real * scale, 1
    energy = real.square().flatten(1).sum(1)
    scale = (energy + FEATURE_NORM_EPS).rsqrt().reshape((-1,) + (1,) * (real.ndim - 1))
    return predicted.to(dtype) * scale, real * scale, real[0].numel()


class _StopForward(Exception):
    """Raised by a feature hook once the deepest requested layer has run."""


def _tensor_of(output: Any) -> torch.Tensor:
    # diffusers blocks return tuples (hidden, residuals) or output objects with .sample
    if isinstance(output, (tuple, list)):
        output = output[0]
    return getattr(output, "sample", output)


class FeatureExtractor:
    """Outputs of named layers of a network, computed by a forward that stops after the deepest.

    `network(x, t, **cond)` must be its call. A fastsp `UNet` or `DiT` uses its tap names ("mid",
    "down0", "block3", ...); a network with `feature_taps(layers)` (fastsp.families) says which
    module and which of its outputs each tap is; any other module uses submodule names from
    `named_modules()`.
    """

    def __init__(
        self,
        network: nn.Module,
        layers: Sequence[str],
        context: Callable[[], AbstractContextManager] = nullcontext,
    ):
        self.network = network
        self.layers = list(layers)
        self.context = context  # entered around every forward (see SelfPerceptualLoss)
        self.native = is_native(network)
        # Which output of each hooked module is the feature: None for its first (_tensor_of)
        self.output_index: dict[str, int | None] = dict.fromkeys(self.layers)
        if hasattr(network, "feature_taps"):  # a diffusers family (fastsp.families) names its own
            taps = network.feature_taps(self.layers)
            self.modules = {name: module for name, (module, _) in taps.items()}
            self.output_index = {name: index for name, (_, index) in taps.items()}
            return
        valid = (
            network.tap_names if self.native else tuple(n for n, _ in network.named_modules() if n)
        )
        unknown = [name for name in self.layers if name not in valid]
        if unknown:
            shown = valid if len(valid) <= 40 else tuple(n for n in valid if n.count(".") <= 1)
            raise ValueError(
                f"unknown perceptual layer(s) {unknown}; valid names: {', '.join(shown)}"
            )
        if not self.native:
            modules = dict(network.named_modules())
            self.modules = {name: modules[name] for name in self.layers}

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        with self.context():
            return self._forward(x, t, cond)

    def _forward(self, x, t, cond) -> dict[str, torch.Tensor]:
        if self.native:
            return self.network(x, t, **cond, taps=self.layers)
        captured: dict[str, torch.Tensor] = {}

        def hook_for(name):
            index = self.output_index[name]

            def hook(module, inputs, output):
                captured[name] = _tensor_of(output) if index is None else output[index]
                if len(captured) == len(self.layers):  # the deepest requested layer has run
                    raise _StopForward

            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in self.modules.items()]
        try:
            self.network(x, t, **cond)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return captured


class SelfPerceptualLoss:
    """PAPER.md's self-perceptual loss against a frozen perceptual network.

    Args:
        perceptual: the frozen network f_star (a stage-1 model). It is put in eval mode with
            requires_grad False; its weights are never changed.
        process: the process the online model trains under: a `NoiseSchedule`, a
            `fastsp.flow.FlowProcess`, or DDPM's alpha_bar [T] (any float dtype, any device).
        layers: layer names (or {name: weight}); default the mid block ("mid", or e.g.
            "mid_block" for a diffusers UNet).
        prediction_type: what the online model predicts: "v" | "eps" | "x0" (diffusers'
            "v_prediction" | "epsilon" | "sample" are accepted); default "v", or the process's.
        perceptual_t: "uniform" (the paper) | "same" (t' = t: the loss is identically zero, a
            test) | (low, high) inclusive range of the process's timesteps (flow: sigma * T).
        predicted_noise: "eps_hat" (the paper) re-noises x0_hat with the predicted noise, "eps"
            with the true noise (the paper's ablation).
        distance: "l2" (mean squared error, the paper) | "l1".
        feature_norm: "none" (the paper) | "channel" | "energy": both branches' features
            normalised by the real branch's statistics before the distance
            (`normalise_features`); with "energy" and l2 each example's loss is
            ||f_pred - f_real||^2 / ||f_real||^2 per layer, then weighted and averaged.
        batched_branches: run the real and predicted branches as one forward of batch 2B (fewer,
            larger kernels; but backward then runs over all 2B rows) instead of two of batch B.
        perceptual_on_t: "all" (the paper) | (low, high) inclusive range of the ONLINE timestep
            t: each example with t in the range gets the self-perceptual loss, every other one
            the MSE loss against `target` (PixelGen and LPL switch perceptual losses off at the
            noisiest timesteps). Both are computed for every example and one is picked per
            example on the device (torch.where), so the step reads nothing on the host.
        perceptual_context: a callable giving the context inside which `perceptual` is the
            frozen network, for a `perceptual` that is the online model itself (LoRA: its
            adapters off, fastsp.lora.adapters_off); it is then left trainable here.
    """

    def __init__(
        self,
        perceptual: nn.Module,
        process: NoiseSchedule | FlowProcess | torch.Tensor,
        layers: str | Sequence[str] | Mapping[str, float] = "mid",
        prediction_type: str | None = None,
        perceptual_t: str | tuple[int, int] = "uniform",
        predicted_noise: str = "eps_hat",
        distance: str = "l2",
        batched_branches: bool = False,
        perceptual_on_t: str | tuple[int, int] | None = "all",
        perceptual_context: Callable[[], AbstractContextManager] | None = None,
        feature_norm: str = "none",
    ):
        if prediction_type is not None and prediction_type not in _PREDICTION_ALIASES:
            raise ValueError(
                f"prediction_type {prediction_type!r} must be one of {sorted(_PREDICTION_ALIASES)}"
            )
        if predicted_noise not in PREDICTED_NOISE:
            raise ValueError(
                f"predicted_noise {predicted_noise!r} must be one of {PREDICTED_NOISE}"
            )
        if distance not in DISTANCES:
            raise ValueError(f"distance {distance!r} must be one of {DISTANCES}")
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm {feature_norm!r} must be one of {FEATURE_NORMS}")
        self.feature_norm = feature_norm
        prediction_type = _PREDICTION_ALIASES[prediction_type] if prediction_type else None
        if isinstance(process, torch.Tensor):
            # the eps-at-zero-terminal-SNR rule is checked here once, on the host
            process = NoiseSchedule.from_alphas_cumprod(process, prediction_type or "v")
        elif prediction_type not in (None, process.prediction_type):
            raise ValueError(
                f"prediction_type {prediction_type!r} differs from the process's "
                f"{process.prediction_type!r}"
            )
        self.process = process
        self.prediction_type = process.prediction_type
        count = process.max_timestep + 1  # the parsers take the number of integer timesteps
        self.perceptual_t = parse_perceptual_t(perceptual_t, count)
        self.on_t = parse_perceptual_on_t(perceptual_on_t, count)  # None: every t
        self.predicted_noise = predicted_noise
        self.distance = distance
        self.batched_branches = batched_branches
        self.layers = parse_layers(layers)
        if perceptual_context is None:
            perceptual_context = nullcontext
            perceptual.eval().requires_grad_(False)
        self.perceptual = perceptual
        self.features = FeatureExtractor(perceptual, list(self.layers), perceptual_context)

    def sample_t_prime(
        self, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """t' per example: a new, independent draw (uniform or in a range), or t itself."""
        if self.perceptual_t == "same":
            return t
        uniform = (0, self.process.max_timestep)
        low, high = uniform if self.perceptual_t == "uniform" else self.perceptual_t
        return self.process.timesteps_between(low, high, t, generator)

    def _distance_per_example(
        self, predicted: dict[str, torch.Tensor], real: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """[B]: sum over layers of weight x mean over one example's (normalised) features of the
        distance (x N for energy); its batch mean is `_distance`'s value (every example has as
        many features)."""
        per_element = F.l1_loss if self.distance == "l1" else feature_mse
        # bf16 features (autocast) are averaged in fp32; float64 stays float64
        dtype = torch.promote_types(predicted[next(iter(self.layers))].dtype, torch.float32)
        total = 0
        for name, weight in self.layers.items():
            pred, real_n, factor = normalise_features(
                predicted[name], real[name], self.feature_norm
            )
            mean = per_element(pred, real_n, reduction="none").flatten(1).to(dtype).mean(1)
            total = total + weight * factor * mean
        return total

    # Timestep-gated loss (issue 16): per example, the self-perceptual loss where LOW <= t <= HIGH,
    # the MSE loss |f(x_t, t, c) - target|^2 (mean over the example) elsewhere; then the mean.
    def _gated(self, perceptual, model_output, target, t) -> torch.Tensor:
        low, high = self.on_t
        mse = feature_mse(model_output, target.to(model_output.dtype), reduction="none")
        mse = mse.flatten(1).to(perceptual.dtype).mean(1)
        return torch.where((t >= low) & (t <= high), perceptual, mse).mean()

    def _distance(
        self, predicted: dict[str, torch.Tensor], real: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        names = list(self.layers)
        # --perceptual-norm rescales the features (none: as they are), then the same kernels
        normalised = {
            n: normalise_features(predicted[n], real[n], self.feature_norm) for n in names
        }
        predicted = {n: pair[0] for n, pair in normalised.items()}
        real = {n: pair[1] for n, pair in normalised.items()}
        weights = {n: self.layers[n] * pair[2] for n, pair in normalised.items()}
        if self.distance == "l1":
            loss = sum(weights[n] * F.l1_loss(predicted[n], real[n]) for n in names)
        elif len(names) == 1:  # the paper's case: one fused kernel over the mid-block features
            loss = weights[names[0]] * feature_mse(predicted[names[0]], real[names[0]])
        else:
            loss = feature_mse_multi(
                [predicted[n] for n in names], [real[n] for n in names], [weights[n] for n in names]
            )
        # features may be bf16 under autocast; the loss is at least fp32 (float64 stays float64)
        return loss.to(torch.promote_types(loss.dtype, torch.float32))

    def __call__(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        t_prime: torch.Tensor | None = None,
        cond: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        x_t: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss for one batch.

        Args:
            model_output: [B, ...] the online model's prediction at x_t = add_noise(x0, noise, t).
            x0, noise: [B, ...] the clean data and the noise that made x_t.
            t: [B] timesteps of x_t (the process's: long for DDPM, sigma * T for flow).
            t_prime: [B] perceptual timesteps; drawn with `generator` when None.
            cond: keyword arguments of the perceptual network's call (the same condition the
                online model saw), e.g. {"labels": y} or {"encoder_hidden_states": c}.
            x_t: the noisy input the online model saw, if the caller has it (else recomputed).
            target: [B, ...] the MSE target of model_output (the schedule's training target);
                needed, and only read, when perceptual_on_t gates the loss.
        Returns: a 0-d float32 loss.
        """
        if self.on_t is not None and target is None:
            raise ValueError(
                "perceptual_on_t gates the loss with MSE outside its range; pass target (the "
                "schedule's training target of model_output)"
            )
        cond = dict(cond or {})
        if t_prime is None:
            t_prime = self.sample_t_prime(t, generator)
        process = self.process
        if x_t is None:
            x_t = process.add_noise(x0, noise, t)
        x0_hat, eps_hat = process.split_prediction(model_output.to(x0.dtype), x_t, t)
        renoise = eps_hat if self.predicted_noise == "eps_hat" else noise
        # real branch: x_t'_real = add_noise(x0, eps, t') (DDPM a_t' x0 + s_t' eps), no gradient
        # predicted branch: x_t'_pred = add_noise(x0_hat, eps_hat, t'), gradient into the model
        if self.batched_branches:
            with torch.no_grad():
                x_real = process.add_noise(x0, noise, t_prime)
            x_pred = process.add_noise(x0_hat, renoise, t_prime)
            both_cond = {k: None if v is None else torch.cat([v, v]) for k, v in cond.items()}
            x_both, t_both = torch.cat([x_real, x_pred]), torch.cat([t_prime, t_prime])
            both = self.features(x_both, t_both, both_cond)
            batch = x0.shape[0]
            real = {name: h[:batch].detach() for name, h in both.items()}
            predicted = {name: h[batch:] for name, h in both.items()}
        else:
            with torch.no_grad():
                real = self.features(process.add_noise(x0, noise, t_prime), t_prime, cond)
            predicted = self.features(process.add_noise(x0_hat, renoise, t_prime), t_prime, cond)
        if self.on_t is not None:
            return self._gated(self._distance_per_example(predicted, real), model_output, target, t)
        return self._distance(predicted, real)
