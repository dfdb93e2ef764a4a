"""--objective model_guidance (arXiv 2502.12154): the guided target in each prediction type is the
paper's eps-space target; the fast step against the reference step in float64 (DDPM and flow,
class labels and context); w = 0 is the MSE loss; no host reads; the refusals; a CLI run."""

import copy
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import prefork
import pytest
import torch
from safetensors.torch import load_file
from test_step import LR, RES, B, FailOnHostSync, _batch, _models

from fastsp.config import TrainConfig
from fastsp.diffusion import NoiseSchedule
from fastsp.errors import ConfigError
from fastsp.flow import FlowProcess
from fastsp.model_config import UNET_PRESETS
from fastsp.model_guidance import ModelGuidance
from fastsp.step import StepConfig, TrainStep, step_randomness
from fastsp.unet import UNet

SEED, STEP = 3, 5
_PROCESSES = {
    "ddpm_v": lambda: NoiseSchedule(),
    "ddpm_eps": lambda: NoiseSchedule(prediction_type="eps", zero_terminal_snr=False),
    "ddpm_x0": lambda: NoiseSchedule(prediction_type="x0"),
    "flow": lambda: FlowProcess(),
}


@pytest.mark.parametrize("kind", list(_PROCESSES))
def test_the_guided_target_is_the_papers_eps_target(kind):
    # The module's derivation, checked through the processes' own conversions: the guided target
    # in the model's output space, turned into eps_hat by split_prediction, is
    # eps + w (eps_hat(x_t, c) - eps_hat(x_t, null)) where guided and t / T <= t_max, else eps.
    process = _PROCESSES[kind]()
    _, guide = _models(torch.float64)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, 1, RES, RES, generator=g, dtype=torch.float64)
    noise = torch.randn(B, 1, RES, RES, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 100, 300, 500, 700, 750, 800, 990])
    t = t.to(torch.float32) if kind == "flow" else t
    labels = torch.randint(0, 10, (B,), generator=g)
    null = {"labels": torch.full_like(labels, 10), "context": None}
    guided = torch.tensor([True, True, False, True, True, True, True, True])
    x_t = process.add_noise(x0, noise, t)
    mg = ModelGuidance(guide, process.num_timesteps, scale=0.3, t_max=0.75)
    target = process.training_target(x0, noise, t)
    cond = {"labels": labels, "context": None}
    guided_target = mg.guided_target(target, x_t, t, cond, null, guided)

    eps_guided = process.split_prediction(guided_target, x_t, t)[1]
    eps_cond = process.split_prediction(guide(x_t, t, labels=labels), x_t, t)[1]
    eps_null = process.split_prediction(guide(x_t, t, **null), x_t, t)[1]
    w = torch.tensor([0.3, 0.3, 0.0, 0.3, 0.3, 0.3, 0.0, 0.0], dtype=torch.float64)
    expected = noise + w.view(-1, 1, 1, 1) * (eps_cond - eps_null)
    assert torch.allclose(eps_guided, expected, rtol=0, atol=1e-9)
    assert (eps_cond - eps_null)[w > 0].abs().amax() > 1e-3  # the guidance term is not nothing
    assert not guided_target.requires_grad


def _context_models(dtype, length=5, dim=16):
    config = dataclasses.replace(UNET_PRESETS["tiny"], num_classes=0, context_dim=dim)
    torch.manual_seed(0)
    model = UNet(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _step(model, process, reference_loss=False, ema=None, guidance=None, context=None, **options):
    ema = ema if ema is not None else copy.deepcopy(model).requires_grad_(False)
    guidance = {"scale": 0.45, "t_max": 0.75} if guidance is None else guidance
    conditioning = {"num_classes": 10} if context is None else {"context_shape": context[0].shape}
    config = StepConfig(
        seed=SEED, global_batch=B, shape=(1, RES, RES), reference_loss=reference_loss,
        prediction_type=process.prediction_type, **conditioning, **options,
    )  # fmt: skip
    model_guidance = ModelGuidance(ema, process.num_timesteps, **guidance) if guidance else None
    return TrainStep(
        config,
        model=model,
        online=model,
        ema=ema,
        optimizer=torch.optim.AdamW(model.parameters(), lr=LR, fused=True),
        schedule=process,
        perceptual_loss=None,
        device=torch.device("cpu"),
        null_context=None if context is None else context[0],
        model_guidance=model_guidance,
    )


@pytest.mark.parametrize(
    ("kind", "guidance", "conditioning"),
    [
        ("ddpm_v", {"scale": 0.45, "t_max": 0.75}, "class"),
        ("flow", {"scale": 0.45, "t_max": 0.75}, "class"),
        ("ddpm_x0", {"scale": 0.8, "t_max": 1.0}, "class"),
        ("flow", {"scale": 0.3, "t_max": 1.0}, "context"),
    ],
)
def test_fast_step_equals_the_reference_step_in_float64(kind, guidance, conditioning):
    # Same weights, batch, noise, t and dropout: the fast step (one guide forward of batch 2B)
    # against fastsp.reference's (two guide forwards, the target written out); the guide is an
    # EMA that differs from the online model; the same fused AdamW after both.
    dtype, process = torch.float64, _PROCESSES[kind]()
    g = torch.Generator().manual_seed(7)
    context = None
    if conditioning == "class":
        model, ema = _models(dtype)
        batch = _batch(dtype)
    else:
        model = _context_models(dtype)
        ema = copy.deepcopy(model).requires_grad_(False)
        with torch.no_grad():
            for p in ema.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=dtype))
        context = (torch.randn(5, 16, generator=g, dtype=dtype),)
        batch = {"x": _batch(dtype)["x"], "context": torch.randn(B, 5, 16, generator=g).to(dtype)}
    ref_model, ref_ema = copy.deepcopy(model), copy.deepcopy(ema)
    steps = [
        _step(m, process, reference, e, guidance, context, label_dropout=0.5)
        for m, e, reference in ((model, ema, False), (ref_model, ref_ema, True))
    ]
    for step in steps:
        step.load(batch, STEP, LR, 0.1)
        step.compute(zero_grad=False)
    _, t, drop, _ = step_randomness(SEED, STEP, B, (1, RES, RES), process, 0.5, torch.device("cpu"))
    guided = ~drop & (t <= guidance["t_max"] * process.num_timesteps)
    assert 0 < int(guided.sum()) < B, (t, drop)  # guided and unguided rows in the batch
    fast, ref = steps
    assert fast.loss_sum.item() == pytest.approx(ref.loss_sum.item(), rel=1e-12)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        scale = q.grad.abs().max().item() + 1e-30
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-12 * scale), name
        assert torch.allclose(p, q, rtol=0, atol=1e-12), name


def test_no_guidance_is_the_mse_loss():
    # w = 0 leaves the target exactly as it is: the MSE step's loss, to the bit
    losses = []
    for guidance in ({"scale": 0.0, "t_max": 1.0}, {}):
        model, _ = _models(torch.float64)
        step = _step(model, NoiseSchedule(), guidance=guidance, label_dropout=0.1)
        step.load(_batch(torch.float64), STEP, LR, 0.1)
        step.compute()
        losses.append(step.loss_sum.item())
    assert losses[0] == losses[1]


@pytest.mark.parametrize(
    ("kind", "options", "conditioning"),
    [
        ("ddpm_v", {"grad_accum": 2, "bf16": True, "grad_clip": 1.0}, "class"),
        ("flow", {"channels_last": True}, "context"),
    ],
)
def test_the_guided_step_is_capture_safe(kind, options, conditioning):
    context = None
    if conditioning == "class":
        model, _ = _models()
        batch = [_batch(seed=i) for i in range(2)]
    else:
        model = _context_models(torch.float32)
        context = (torch.randn(5, 16),)
        batch = [{"x": _batch(seed=i)["x"], "context": torch.randn(B, 5, 16)} for i in range(2)]
    if options.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    step = _step(model, _PROCESSES[kind](), context=context, label_dropout=0.3, **options)
    for i in range(2):
        step.load(batch[i], i, LR, 0.1)
        with FailOnHostSync():
            step.compute()
    assert step.good_steps.item() == 2


def test_the_refusals():
    with pytest.raises(ConfigError, match="--cond class or --cond context"):
        TrainConfig(objective="model_guidance", cond="none")
    with pytest.raises(ConfigError, match="--label-dropout above 0"):
        TrainConfig(objective="model_guidance", label_dropout=0.0)
    with pytest.raises(ConfigError, match="no fixed point"):
        TrainConfig(objective="model_guidance", mg_scale=1.0)
    with pytest.raises(ConfigError, match="--mg-scale 0.3 is an option of --objective"):
        TrainConfig(mg_scale=0.3)
    with pytest.raises(ConfigError, match="mg_t_max"):
        TrainConfig(objective="model_guidance", mg_t_max=1.5)
    assert TrainConfig(objective="model_guidance", mg_scale=0.2, mg_t_max=1.0).mg_scale == 0.2
    with pytest.raises(ValueError, match="scale"):
        ModelGuidance(torch.nn.Identity(), 1000, scale=-0.1)


@pytest.mark.slow
def test_a_short_model_guidance_run_of_the_digits_preset_trains(tmp_path):
    # The command line, end to end: a few steps of --objective model_guidance on the digits
    # preset (from random weights) exit 0, say what they train, log finite losses, and move the
    # weights away from their EMA.
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "mg"
    argv = [
        sys.executable, str(repo / "fastsp" / "train.py"), "--preset", "digits", "--device",
        "cpu", "--objective", "model_guidance", "--mg-scale", "0.3", "--steps", "4",
        "--batch-size", "16", "--log-every", "2", "--sample-every", "0", "--sample-num", "4",
        "--sample-steps", "2", "--checkpoint-every", "0", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = prefork.run(argv, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "objective: model guidance, w = 0.3 where t / T <= 0.75" in result.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), lines
    checkpoint = next((out / "checkpoints").iterdir())
    model = load_file(checkpoint / "model.safetensors")
    ema = load_file(checkpoint / "ema.safetensors")
    assert any(not torch.equal(model[name], ema[name]) for name in model)
