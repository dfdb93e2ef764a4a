"""--perceptual-on-t LOW,HIGH: the self-perceptual loss where the online t is in the range, MSE
elsewhere, per example; the fast step against the reference step in float64, on both branches."""

import copy
import dataclasses

import pytest
import torch

from fastsp import reference
from fastsp.config import TrainConfig
from fastsp.config_fields import parse_perceptual_on_t
from fastsp.diffusion import NoiseSchedule
from fastsp.errors import ConfigError
from fastsp.model_config import UNET_PRESETS
from fastsp.perceptual import SelfPerceptualLoss
from fastsp.step import StepConfig, TrainStep, step_randomness
from fastsp.unet import UNet

B, RES, LR, SEED, STEP = 8, 16, 1e-3, 3, 5
# t of the step below (seed 3, step 5): [695, 824, 2, 140, 457, 760, 172, 998]
_RANGES = {
    "mixed": (200, 700),  # both branches in one batch (2 inside; checked below)
    "all_inside": (0, 999),  # every example self-perceptual: the paper's loss
    "all_outside": (300, 400),  # every example MSE: stage 1's loss
}


def _models(dtype):
    config = dataclasses.replace(UNET_PRESETS["tiny"], num_classes=10)
    torch.manual_seed(0)
    model = UNet(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    perceptual = copy.deepcopy(model)
    with torch.no_grad():
        for p in perceptual.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, perceptual.eval().requires_grad_(False)


def _batch(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, RES, RES, generator=g).to(dtype)
    return {"x": x, "label": torch.randint(0, 10, (B,), generator=g)}


def _step(model, perceptual, on_t, **options):
    schedule = NoiseSchedule()
    loss = SelfPerceptualLoss(perceptual, schedule.alphas_cumprod, perceptual_on_t=on_t)
    config = StepConfig(seed=SEED, global_batch=B, shape=(1, RES, RES), num_classes=10, **options)
    return TrainStep(
        config,
        model=model,
        online=model,
        ema=copy.deepcopy(model).requires_grad_(False),
        optimizer=torch.optim.AdamW(model.parameters(), lr=LR, fused=True),
        schedule=schedule,
        perceptual_loss=loss,
        device=torch.device("cpu"),
    )


def _randomness(step, dtype):
    return step_randomness(
        SEED, STEP, B, (1, RES, RES), NoiseSchedule(), 0.0, torch.device("cpu"),
        step.perceptual_loss, dtype,
    )  # fmt: skip


@pytest.mark.parametrize("case", list(_RANGES))
def test_fast_step_equals_the_reference_step_in_float64(case):
    dtype, on_t = torch.float64, _RANGES[case]
    model, perceptual = _models(dtype)
    ref_model = copy.deepcopy(model)
    batch = _batch(dtype)
    step = _step(model, perceptual, f"{on_t[0]},{on_t[1]}")
    step.load(batch, STEP, LR, 0.1)
    step.compute(zero_grad=False)

    noise, t, _, t_prime = _randomness(step, dtype)
    inside = (t >= on_t[0]) & (t <= on_t[1])
    expected_inside = {"mixed": None, "all_inside": B, "all_outside": 0}[case]
    if expected_inside is None:
        assert 0 < inside.sum() < B, t  # both branches in this batch
    else:
        assert inside.sum() == expected_inside, t
    alphas = NoiseSchedule().alphas_cumprod.to(dtype)
    ref_optimizer = reference.make_reference_optimizer(ref_model, lr=LR)
    ref_loss = reference.reference_self_perceptual_step(
        ref_model, perceptual, ref_optimizer, batch["x"], noise, t, t_prime, alphas,
        labels=batch["label"], on_t=on_t,
    )  # fmt: skip
    assert step.loss_sum.item() == pytest.approx(ref_loss, rel=1e-12)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        scale = q.grad.abs().max().item() + 1e-30
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-12 * scale), name
        assert torch.allclose(p, q, rtol=0, atol=2 * LR * 2**-24), name  # see test_step.py

    # the two ends are the two losses it picks from, written independently
    with torch.no_grad():
        if case == "all_inside":
            paper = reference.reference_self_perceptual_loss(
                copy.deepcopy(ref_model).requires_grad_(False), perceptual, batch["x"], noise,
                t, t_prime, alphas, labels=batch["label"],
            )  # fmt: skip
            gated = reference.reference_self_perceptual_loss(
                copy.deepcopy(ref_model).requires_grad_(False), perceptual, batch["x"], noise,
                t, t_prime, alphas, labels=batch["label"], on_t=on_t,
            )  # fmt: skip
            assert gated.item() == pytest.approx(paper.item(), rel=1e-12)
        if case == "all_outside":
            model0, _ = _models(dtype)
            mse = reference.reference_mse_loss(
                model0, batch["x"], noise, t, alphas, labels=batch["label"]
            )
            assert ref_loss == pytest.approx(mse.item(), rel=1e-12)


def test_mixed_batch_is_the_per_example_choice():
    # The loss of a mixed batch is the mean of each example's own loss: self-perceptual for
    # examples inside the range, MSE outside (each computed on that example alone).
    dtype, (low, high) = torch.float64, _RANGES["mixed"]
    model, perceptual = _models(dtype)
    batch = _batch(dtype)
    step = _step(model, perceptual, f"{low},{high}")
    noise, t, _, t_prime = _randomness(step, dtype)
    alphas = NoiseSchedule().alphas_cumprod.to(dtype)
    per_example = []
    with torch.no_grad():
        for i in range(B):
            one = slice(i, i + 1)
            x, y = batch["x"][one], batch["label"][one]
            if low <= int(t[i]) <= high:
                loss = reference.reference_self_perceptual_loss(
                    model, perceptual, x, noise[one], t[one], t_prime[one], alphas, labels=y
                )
            else:
                loss = reference.reference_mse_loss(model, x, noise[one], t[one], alphas, labels=y)
            per_example.append(loss.item())
        gated = reference.reference_self_perceptual_loss(
            model, perceptual, batch["x"], noise, t, t_prime, alphas, labels=batch["label"],
            on_t=(low, high),
        )  # fmt: skip
    assert gated.item() == pytest.approx(sum(per_example) / B, rel=1e-12)


@pytest.mark.parametrize("options", [{}, {"bf16": True, "grad_accum": 2, "mse_weight": 0.5}])
def test_the_gated_step_is_capture_safe(options):
    from test_step import FailOnHostSync  # the dispatch mode that fails on any host read

    model, perceptual = _models(torch.float32)
    step = _step(model, perceptual, "200,700", **options)
    for i in range(2):
        step.load(_batch(torch.float32, seed=i), i, LR, 0.1)
        with FailOnHostSync():
            step.compute()
    assert step.good_steps.item() == 2


def test_the_option_parses_and_is_validated():
    assert parse_perceptual_on_t("all", 1000) is None
    assert parse_perceptual_on_t("0,699", 1000) == (0, 699)
    assert parse_perceptual_on_t((5, 5), 10) == (5, 5)
    for bad in ("0,1000", "700,699", "-1,5", "noisiest", "1,2,3"):
        with pytest.raises(ValueError, match="perceptual_on_t"):
            parse_perceptual_on_t(bad, 1000)
    cfg = TrainConfig(objective="self_perceptual", init="runs/a", perceptual_on_t="0,699")
    assert cfg.perceptual_on_t == "0,699"
    with pytest.raises(ConfigError, match="--objective self_perceptual"):
        TrainConfig(perceptual_on_t="0,699")
    schedule = NoiseSchedule()
    _, perceptual = _models(torch.float32)
    loss = SelfPerceptualLoss(perceptual, schedule.alphas_cumprod, perceptual_on_t="0,699")
    assert loss.on_t == (0, 699)
    x = torch.randn(2, 1, RES, RES)
    t = torch.tensor([3, 900])
    with pytest.raises(ValueError, match="pass target"):
        loss(x, x, x, t, cond={"labels": torch.tensor([1, 2])})


@pytest.mark.slow  # five tiny training runs: about 25 s of CPU
def test_trainer_fast_and_reference_steps_gate_alike(tmp_path):
    # The option through the trainer: stage 2 with --perceptual-on-t, fast and reference step in
    # fp32 from the same stage 1, train the same weights (up to fused-vs-foreach AdamW rounding),
    # and other weights than the ungated loss.
    from safetensors.torch import load_file
    from test_step import ADAM_ATOL, _train

    common = ["--preset", "tiny", "--steps", "4", "--device", "cpu", "--precision", "fp32"]
    stage1 = _train([*common, "--out", str(tmp_path / "stage1")])
    stage2 = [*common, "--init", str(stage1), "--objective", "self_perceptual"]
    weights = {}
    for kind, gate in (("fast", "0,499"), ("reference", "0,499"), ("fast", "all")):
        out = tmp_path / f"{kind}_{gate}"
        argv = [*stage2, "--train-step", kind, "--perceptual-on-t", gate, "--out", str(out)]
        weights[kind, gate] = load_file(_train(argv) / "model.safetensors")
    gated, reference_gated = weights["fast", "0,499"], weights["reference", "0,499"]
    for name, fast in gated.items():
        assert torch.allclose(fast, reference_gated[name], rtol=1e-4, atol=ADAM_ATOL), name
    assert any(not torch.allclose(w, weights["fast", "all"][n]) for n, w in gated.items())
