"""Tests of the naive reference (fastsp/reference.py), the oracle of the fast paths."""

import pytest
import torch
from torch import nn

from fastsp.model_config import UNET_PRESETS
from fastsp.reference import (
    coefficients,
    frozen_copy,
    make_reference_optimizer,
    mid_features,
    reference_mse_loss,
    reference_mse_step,
    reference_self_perceptual_loss,
    reference_self_perceptual_step,
)
from fastsp.unet import UNet

f64 = torch.float64
B = 4


def zsnr_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    """PAPER.md: scaled-linear betas 0.00085 -> 0.012, rescaled to zero terminal SNR."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=f64) ** 2
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    sqrt_ab = (sqrt_ab - sqrt_ab[-1]) * sqrt_ab[0] / (sqrt_ab[0] - sqrt_ab[-1])
    return sqrt_ab**2


def randomised_unet(seed: int = 0) -> UNet:
    """Tiny float64 UNet with every parameter (the zero-initialised ones included) perturbed."""
    torch.manual_seed(seed)
    model = UNet(UNET_PRESETS["tiny"]).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def setup():
    online = randomised_unet(0)
    perceptual = frozen_copy(online)
    with torch.no_grad():  # the online model has drifted from f_star
        for p in online.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(B, 1, 8, 8, generator=g, dtype=f64)
    noise = torch.randn(B, 1, 8, 8, generator=g, dtype=f64)
    t = torch.tensor([0, 250, 600, 999])
    t_prime = torch.tensor([999, 10, 300, 500])
    labels = torch.tensor([0, 3, 7, 10])  # 10 = the null label
    return online, perceptual, x0, noise, t, t_prime, labels, zsnr_alphas_cumprod()


class OracleV(nn.Module):
    """Returns the true v = a_t eps - s_t x0 for the fixed (x0, eps) it knows."""

    def __init__(self, x0, eps, alphas_cumprod):
        super().__init__()
        self.x0, self.eps, self.ac = x0, eps, alphas_cumprod

    def forward(self, x_t, t, labels=None, context=None):
        ab = self.ac[t].reshape(-1, 1, 1, 1)
        return ab.sqrt() * self.eps - (1 - ab).sqrt() * self.x0


def test_coefficients():
    ac = zsnr_alphas_cumprod()
    a, s = coefficients(ac, torch.tensor([0, 999, 500]), 4)
    assert a.shape == s.shape == (3, 1, 1, 1) and a.dtype == s.dtype == f64
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a))
    assert a[1].item() == 0.0 and s[1].item() == 1.0  # zero terminal SNR
    a32, _ = coefficients(ac.float(), torch.tensor([3]), 3)
    assert a32.shape == (1, 1, 1) and a32.dtype == torch.float32


def test_identity_t_prime_equal_t_gives_zero(setup):
    online, perceptual, x0, noise, t, t_prime, labels, ac = setup
    for pred in ("v", "x0"):
        loss = reference_self_perceptual_loss(
            online, perceptual, x0, noise, t, t, ac, labels, prediction_type=pred
        )
        assert loss.item() < 1e-20, pred
    t_eps = torch.tensor([0, 250, 600, 998])  # eps-prediction cannot use a_{T-1} = 0
    loss = reference_self_perceptual_loss(
        online, perceptual, x0, noise, t_eps, t_eps, ac, labels, prediction_type="eps"
    )
    assert loss.item() < 1e-20
    loss = reference_self_perceptual_loss(online, perceptual, x0, noise, t, t_prime, ac, labels)
    assert loss.item() > 1e-8


def test_oracle_online_model_gives_zero(setup):
    _, perceptual, x0, noise, t, t_prime, labels, ac = setup
    oracle = OracleV(x0, noise, ac)
    sp = reference_self_perceptual_loss(oracle, perceptual, x0, noise, t, t_prime, ac, labels)
    assert sp.item() < 1e-20
    assert reference_mse_loss(oracle, x0, noise, t, ac).item() < 1e-28


def test_eps_prediction_refuses_zero_terminal_snr(setup):
    online, perceptual, x0, noise, t, t_prime, labels, ac = setup
    with pytest.raises(ValueError, match="zero terminal SNR"):
        reference_self_perceptual_loss(
            online, perceptual, x0, noise, t, t_prime, ac, labels, prediction_type="eps"
        )
    with pytest.raises(ValueError, match="prediction_type"):
        reference_mse_loss(online, x0, noise, t, ac, prediction_type="sample")


def test_self_perceptual_step_grads_and_frozen_network(setup):
    online, perceptual, x0, noise, t, t_prime, labels, ac = setup
    frozen_before = [p.detach().clone() for p in perceptual.parameters()]
    online_before = [p.detach().clone() for p in online.parameters()]
    opt = make_reference_optimizer(online, lr=1e-3)
    loss = reference_self_perceptual_step(
        online, perceptual, opt, x0, noise, t, t_prime, ac, labels
    )
    assert loss > 0
    for name, p in online.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(
        not torch.equal(p, q) for p, q in zip(online.parameters(), online_before, strict=True)
    )
    for p, q in zip(perceptual.parameters(), frozen_before, strict=True):
        assert p.grad is None and not p.requires_grad
        assert torch.equal(p, q)
    assert not perceptual.training
    assert len(perceptual.mid._forward_hooks) == 0


def test_self_perceptual_loss_matches_hand_computation_with_taps(setup):
    """Cross-check against the UNet's own mid tap (used here in the test only)."""
    online, perceptual, x0, noise, t, t_prime, labels, ac = setup
    ab, ab2 = ac[t].reshape(-1, 1, 1, 1), ac[t_prime].reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    v = online(x_t, t, labels=labels)
    x0_hat = ab.sqrt() * x_t - (1 - ab).sqrt() * v
    eps_hat = (1 - ab).sqrt() * x_t + ab.sqrt() * v
    x_real = ab2.sqrt() * x0 + (1 - ab2).sqrt() * noise
    x_pred = ab2.sqrt() * x0_hat + (1 - ab2).sqrt() * eps_hat
    h_real = perceptual(x_real, t_prime, labels=labels, taps=["mid"])["mid"]
    h_pred = perceptual(x_pred, t_prime, labels=labels, taps=["mid"])["mid"]
    expected = ((h_pred - h_real) ** 2).mean()
    got = reference_self_perceptual_loss(online, perceptual, x0, noise, t, t_prime, ac, labels)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("pred", ["v", "eps", "x0"])
def test_mse_loss_matches_formula(setup, pred):
    online, _, x0, noise, t, _, labels, ac = setup
    ab = ac[t].reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = {"v": ab.sqrt() * noise - (1 - ab).sqrt() * x0, "eps": noise, "x0": x0}[pred]
    expected = ((online(x_t, t, labels=labels) - target) ** 2).mean()
    got = reference_mse_loss(online, x0, noise, t, ac, labels, prediction_type=pred)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_mse_step_updates_model(setup):
    online, _, x0, noise, t, _, labels, ac = setup
    opt = make_reference_optimizer(online)
    assert isinstance(opt, torch.optim.AdamW)
    defaults = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
    assert {k: v for k, v in opt.defaults.items() if k != "lr"} == {
        k: v for k, v in defaults.items() if k != "lr"
    }
    assert opt.defaults["lr"] == 1e-4
    before = online.conv_out.weight.detach().clone()
    loss = reference_mse_step(online, opt, x0, noise, t, ac, labels)
    assert loss > 0 and not torch.equal(online.conv_out.weight, before)


def test_mid_capture_matches_a_test_hook(setup):
    _, perceptual, x0, _, t, _, labels, _ = setup
    seen = []
    handle = perceptual.mid.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        got = mid_features(perceptual, x0, t, labels)
    finally:
        handle.remove()
    assert len(seen) == 1 and torch.equal(got, seen[0])
    assert len(perceptual.mid._forward_hooks) == 0
    # the hook is removed even when the forward raises (no cross-attention in "tiny")
    with pytest.raises(ValueError, match="context"):
        mid_features(perceptual, x0, t, labels, context=torch.zeros(B, 2, 8, dtype=f64))
    assert len(perceptual.mid._forward_hooks) == 0
