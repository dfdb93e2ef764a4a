"""--perceptual-norm channel|energy: the self-perceptual loss on features normalised by the real
branch's statistics. The fast step against the reference step in float64 (DDPM and flow, one
layer and several, with the timestep gate, batched branches), the invariances each normalisation
exists for, the fused kernels underneath, and the step without host reads."""

import copy

import pytest
import torch
from test_step import LR, RES, B, FailOnHostSync, _batch, _models

import fastsp.perceptual as perceptual_module
from fastsp.config import TrainConfig
from fastsp.diffusion import NoiseSchedule
from fastsp.errors import ConfigError
from fastsp.feature_loss import feature_mse
from fastsp.flow import FlowProcess
from fastsp.perceptual import SelfPerceptualLoss, normalise_features
from fastsp.step import StepConfig, TrainStep

SEED, STEP = 3, 5


def _process(kind):
    return FlowProcess() if kind == "flow" else NoiseSchedule()


def _step(model, perceptual, process, reference_loss=False, loss_options=None, **options):
    loss = SelfPerceptualLoss(perceptual, process, **(loss_options or {}))
    config = StepConfig(
        seed=SEED, global_batch=B, shape=(1, RES, RES), num_classes=10,
        reference_loss=reference_loss, **options,
    )  # fmt: skip
    return TrainStep(
        config,
        model=model,
        online=model,
        ema=copy.deepcopy(model).requires_grad_(False),
        optimizer=torch.optim.AdamW(model.parameters(), lr=LR, fused=True),
        schedule=process,
        perceptual_loss=loss,
        device=torch.device("cpu"),
    )


# (process, loss options): each normalisation on one layer and on several, under both processes;
# with the timestep gate; with the branches as one forward
_CASES = [
    ("ddpm", {"feature_norm": "channel"}),
    ("ddpm", {"feature_norm": "energy", "layers": "mid:1,down1:0.5"}),
    ("flow", {"feature_norm": "energy"}),
    ("flow", {"feature_norm": "channel", "layers": "mid:1,down1:0.5"}),
    ("ddpm", {"feature_norm": "energy", "layers": "mid:1,down1:0.5", "perceptual_on_t": "0,699"}),
    ("flow", {"feature_norm": "channel", "perceptual_on_t": "0,500", "batched_branches": True}),
]


@pytest.mark.parametrize(("kind", "loss_options"), _CASES)
def test_fast_step_equals_the_reference_step_in_float64(kind, loss_options):
    # Same weights, batch, noise, t and t': the fast step (truncated forwards, features
    # normalised then the fused MSE) against fastsp.reference's (full forwards with hooks, the
    # normalisation written out); the same fused AdamW after both.
    dtype, process = torch.float64, _process(kind)
    model, perceptual = _models(dtype)
    ref_model = copy.deepcopy(model)
    steps = [
        _step(m, perceptual, process, reference, loss_options)
        for m, reference in ((model, False), (ref_model, True))
    ]
    batch = _batch(dtype)
    for step in steps:
        step.load(batch, STEP, LR, 0.1)
        step.compute(zero_grad=False)
    fast, ref = steps
    assert fast.loss_sum.item() == pytest.approx(ref.loss_sum.item(), rel=1e-12)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        scale = q.grad.abs().max().item() + 1e-30
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-12 * scale), name
        assert torch.allclose(p, q, rtol=0, atol=1e-12), name


def _loss_inputs(model, loss_fn):
    batch = _batch(torch.float64)
    noise = torch.randn(batch["x"].shape, generator=torch.Generator().manual_seed(4)).double()
    t = torch.arange(B) * 100
    x_t = loss_fn.process.add_noise(batch["x"], noise, t)
    output = model(x_t, t, labels=batch["label"])
    return (output, batch["x"], noise, t), {"cond": {"labels": batch["label"]}, "x_t": x_t}


def test_the_normalised_losses_differ_from_the_papers():
    # The option changes the loss (a normalisation that did nothing would pass the test above)
    model, perceptual = _models(torch.float64)
    losses = set()
    for norm in ("none", "channel", "energy"):
        loss_fn = SelfPerceptualLoss(perceptual, NoiseSchedule(), feature_norm=norm)
        args, kwargs = _loss_inputs(model, loss_fn)
        losses.add(round(loss_fn(*args, **kwargs, generator=torch.Generator()).item(), 9))
    assert len(losses) == 3, losses


def _features(seed, shape=(4, 6, 5, 3)):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(shape, generator=g, dtype=torch.float64)
    return real + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64), real


def _loss(predicted, real, norm):
    pred, real, factor = normalise_features(predicted, real, norm)
    return factor * feature_mse(pred, real)


def test_channel_norm_is_invariant_to_a_per_channel_affine_map():
    # LPL's point: channels of very different scales and offsets weigh the same. Any
    # k_bc f + b_bc applied to both branches (per example and channel) leaves the loss as it
    # is, up to the epsilon in the variance (relative 1e-6 here).
    predicted, real = _features(0)
    g = torch.Generator().manual_seed(1)
    k = torch.rand(4, 6, 1, 1, generator=g, dtype=torch.float64) * 9 + 0.5
    b = torch.randn(4, 6, 1, 1, generator=g, dtype=torch.float64) * 5
    before = _loss(predicted, real, "channel")
    assert _loss(k * predicted + b, k * real + b, "channel").item() == pytest.approx(
        before.item(), rel=1e-5
    )
    assert _loss(k * predicted + b, k * real + b, "none").item() != pytest.approx(before.item())
    # tokens [B, L, D]: the channels are the last axis, the statistics over the tokens
    tokens_pred, tokens_real = predicted.flatten(2).transpose(1, 2), real.flatten(2).transpose(1, 2)
    k_tokens, b_tokens = k.flatten(2).transpose(1, 2), b.flatten(2).transpose(1, 2)
    mapped = _loss(k_tokens * tokens_pred + b_tokens, k_tokens * tokens_real + b_tokens, "channel")
    assert mapped.item() == pytest.approx(_loss(tokens_pred, tokens_real, "channel").item(), 1e-5)


def test_energy_norm_is_the_relative_error_per_example():
    # ||f_pred - f_real||^2 / ||f_real||^2 per example, then the batch mean (up to the epsilon
    # in the energy, relative 1e-8 here): the same under any per-example scale of both branches
    predicted, real = _features(2)
    expected = ((predicted - real) ** 2).flatten(1).sum(1) / (real**2).flatten(1).sum(1)
    assert _loss(predicted, real, "energy").item() == pytest.approx(expected.mean().item(), 1e-7)
    scale = torch.tensor([0.05, 1.0, 40.0, 1e3], dtype=torch.float64).view(4, 1, 1, 1)
    scaled = _loss(scale * predicted, scale * real, "energy")
    assert scaled.item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_the_real_branch_carries_no_gradient_into_the_statistics():
    predicted, real = _features(3)
    predicted.requires_grad_(True)
    real.requires_grad_(True)
    for norm in ("channel", "energy"):
        _, real_out, _ = normalise_features(predicted, real, norm)
        assert not real_out.requires_grad


@pytest.mark.parametrize(
    ("norm", "layers", "kernel"),
    [("channel", "mid", "feature_mse"), ("energy", "mid:1,down1:0.5", "feature_mse_multi")],
)
def test_the_normalised_loss_goes_through_the_fused_kernels(monkeypatch, norm, layers, kernel):
    # The normalisations are per-example scales of the features, so the loss stays on
    # fastsp.feature_mse (one layer) or feature_mse_multi (several), with weight x N for energy.
    calls = []
    original = getattr(perceptual_module, kernel)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(perceptual_module, kernel, spy)
    model, perceptual = _models(torch.float64)
    loss_fn = SelfPerceptualLoss(perceptual, NoiseSchedule(), layers=layers, feature_norm=norm)
    args, kwargs = _loss_inputs(model, loss_fn)
    loss_fn(*args, **kwargs)
    assert len(calls) == 1
    if kernel == "feature_mse_multi":
        features = perceptual(kwargs["x_t"], args[3], **kwargs["cond"], taps=["mid", "down1"])
        sizes = [features[name][0].numel() for name in ("mid", "down1")]
        assert calls[0][0][2] == [1.0 * sizes[0], 0.5 * sizes[1]]


@pytest.mark.parametrize(
    ("kind", "loss_options", "options"),
    [
        pytest.param(  # feature_mse_multi in Triton's interpreter, twice per step
            "ddpm",
            {"feature_norm": "energy", "layers": "mid:1,down1:0.5"},
            {"grad_accum": 2},
            marks=pytest.mark.slow,
        ),  # fmt: skip
        ("ddpm", {"feature_norm": "channel", "batched_branches": True}, {"bf16": True}),
        ("flow", {"feature_norm": "energy", "perceptual_on_t": "0,500"}, {"label_dropout": 0.1}),
        ("flow", {"feature_norm": "channel", "layers": "mid:1,down1:0.5"}, {"mse_weight": 1.0}),
    ],
)
def test_the_normalised_step_is_capture_safe(kind, loss_options, options):
    model, perceptual = _models()
    step = _step(model, perceptual, _process(kind), False, loss_options, **options)
    for i in range(2):
        step.load(_batch(seed=i), i, LR, 0.1)
        with FailOnHostSync():
            step.compute()
    assert step.good_steps.item() == 2


def test_the_option_is_refused_without_the_self_perceptual_loss():
    with pytest.raises(ConfigError, match="--perceptual-norm energy is an option of --objective"):
        TrainConfig(perceptual_norm="energy")
    with pytest.raises(ConfigError, match="perceptual_norm"):
        TrainConfig(objective="self_perceptual", init="x", perceptual_norm="layer")
    assert TrainConfig(objective="self_perceptual", init="x", perceptual_norm="channel")
    with pytest.raises(ValueError, match="feature_norm"):
        SelfPerceptualLoss(_models()[1], NoiseSchedule(), feature_norm="batch")
