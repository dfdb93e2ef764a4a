"""Tests for fastsp.diffusion: schedules, zero terminal SNR, conversions, samplers, CFG."""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fastsp.diffusion import (
    BETA_SCHEDULES,
    SAMPLERS,
    CoefficientTable,
    NoiseSchedule,
    guided_output,
    make_betas,
    rescale_zero_terminal_snr,
    sample,
    sampling_timesteps,
    split_prediction,
    training_target,
    v_target,
    x0_eps_from_eps,
    x0_eps_from_v,
    x0_eps_from_x0,
)
from fastsp.sampling import default_labels

T = 1000
_SHAPE = (3, 5, 7, 9)  # odd sizes
# (prediction_type, zero_terminal_snr): every combination the schedule accepts
_PRED_CONFIGS = [("v", True), ("x0", True), ("v", False), ("x0", False), ("eps", False)]


def _randn(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_zero_terminal_snr(schedule):
    plain = NoiseSchedule(schedule, zero_terminal_snr=False, prediction_type="v")
    zsnr = NoiseSchedule(schedule, zero_terminal_snr=True, prediction_type="v")
    assert zsnr.betas.dtype == zsnr.alphas_cumprod.dtype == zsnr.a.dtype == torch.float64
    assert zsnr.betas.shape == zsnr.a.shape == zsnr.s.shape == (T,)
    assert abs(zsnr.a[-1].item()) <= 1e-12
    assert zsnr.s[-1].item() == pytest.approx(1.0, abs=1e-12)
    assert plain.a[-1].item() > 0
    assert zsnr.a[0].item() == pytest.approx(plain.a[0].item(), rel=1e-12)
    assert torch.all(zsnr.alphas_cumprod[1:] < zsnr.alphas_cumprod[:-1])
    assert torch.all(zsnr.betas > 0) and torch.all(zsnr.betas <= 1)
    assert zsnr.betas[-1].item() == 1.0
    torch.testing.assert_close(zsnr.a**2 + zsnr.s**2, torch.ones(T, dtype=torch.float64))


def test_scaled_linear_values():
    sched = NoiseSchedule("scaled_linear", zero_terminal_snr=False, prediction_type="v")
    assert sched.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-14)
    assert sched.betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    # independent computation in Python floats
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    betas = [(lo + (hi - lo) * i / (T - 1)) ** 2 for i in range(T)]
    ab = []
    prod = 1.0
    for b in betas:
        prod *= 1 - b
        ab.append(prod)
    for i in (0, 1, 250, 500, 998, 999):
        assert sched.alphas_cumprod[i].item() == pytest.approx(ab[i], rel=1e-10)
    # zero terminal SNR by hand: shift and scale sqrt(alpha_bar)
    first, last = math.sqrt(ab[0]), math.sqrt(ab[-1])
    zsnr = NoiseSchedule("scaled_linear", zero_terminal_snr=True, prediction_type="v")
    for i in (0, 1, 250, 500, 998):
        expected = (math.sqrt(ab[i]) - last) * first / (first - last)
        assert zsnr.a[i].item() == pytest.approx(expected, rel=1e-10)
    # default schedule is the paper's
    default = NoiseSchedule()
    torch.testing.assert_close(default.betas, zsnr.betas, rtol=0, atol=0)
    assert default.prediction_type == "v"


def test_linear_and_cosine_values():
    lin = make_betas("linear", 10, 0.001, 0.01)
    torch.testing.assert_close(lin, torch.tensor([0.001 + 0.001 * i for i in range(10)]).double())
    betas = make_betas("cosine", T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert betas.max().item() == pytest.approx(0.999)  # clipped at the end

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    ab = torch.cumprod(1 - betas, dim=0)
    for i in (0, 100, 500, 900):
        assert ab[i].item() == pytest.approx(f((i + 1) / T) / f(0.0), rel=1e-10)


def test_rescale_accepts_float32_and_rejects_constant():
    betas = make_betas("linear", 50).float()
    out = rescale_zero_terminal_snr(betas)
    assert out.dtype == torch.float64 and out[-1].item() == 1.0
    with pytest.raises(ValueError, match="1-D"):
        rescale_zero_terminal_snr(torch.zeros(1))
    with pytest.raises(ValueError, match="zero"):
        rescale_zero_terminal_snr(torch.zeros(5))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def test_eps_with_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError) as info:
        NoiseSchedule(prediction_type="eps", zero_terminal_snr=True)
    msg = str(info.value)
    assert "divides by zero" in msg
    assert 'prediction_type="v"' in msg and "zero_terminal_snr=False" in msg
    NoiseSchedule(prediction_type="eps", zero_terminal_snr=False)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"beta_schedule": "quadratic"}, "beta_schedule"),
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"num_timesteps": 1}, "num_timesteps"),
        ({"num_timesteps": 10.0}, "num_timesteps"),
        ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start"),
        ({"beta_end": 1.0}, "beta_end"),
        ({"zero_terminal_snr": "yes"}, "zero_terminal_snr"),
    ],
)
def test_invalid_schedule_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NoiseSchedule(**kwargs)


def test_invalid_names_elsewhere():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="'v', 'eps', 'x0'"):
        split_prediction(x, x, 1.0, 0.0, "epsilon")
    with pytest.raises(ValueError, match="prediction_type"):
        training_target(x, x, 1.0, 0.0, "velocity")
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas("sigmoid")
    with pytest.raises(ValueError, match="sampler"):
        sample(lambda x, t: x, NoiseSchedule(), x, 2, sampler="heun")
    with pytest.raises(ValueError, match="num_steps"):
        sampling_timesteps(10, 11)
    with pytest.raises(ValueError, match="num_steps"):
        sampling_timesteps(10, 0)


# ---------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------


def test_conversion_formulas_by_hand():
    x0, eps = _randn(4, 6, seed=1), _randn(4, 6, seed=2)
    a, s = 0.6, 0.8
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    torch.testing.assert_close(v_target(x0, eps, a, s), v)
    for out, fn in ((v, x0_eps_from_v), (eps, x0_eps_from_eps), (x0, x0_eps_from_x0)):
        x0_hat, eps_hat = fn(out, x_t, a, s)
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-14)
        torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-14)


@pytest.mark.parametrize("prediction_type, zsnr", _PRED_CONFIGS)
def test_conversions_round_trip_float64(prediction_type, zsnr):
    sched = NoiseSchedule(zero_terminal_snr=zsnr, prediction_type=prediction_type)
    x0, eps = _randn(*_SHAPE, seed=3), _randn(*_SHAPE, seed=4)
    t = torch.tensor([0, 500, T - 1])
    x_t = sched.add_noise(x0, eps, t)
    target = sched.training_target(x0, eps, t)
    x0_hat, eps_hat = sched.split_prediction(target, x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-10)
    # to_v gives the true v from any prediction type
    a, s = sched.coefficients(t, x0)
    torch.testing.assert_close(sched.to_v(target, x_t, t), a * eps - s * x0, rtol=0, atol=1e-10)
    # the module-level functions agree with the methods
    torch.testing.assert_close(training_target(x0, eps, a, s, prediction_type), target)
    # the paper's identity: re-noising (x0_hat, eps_hat) at the same t gives back x_t, for any
    # model output (a^2 + s^2 = 1)
    out = _randn(*_SHAPE, seed=5)
    x0_hat, eps_hat = sched.split_prediction(out, x_t, t)
    torch.testing.assert_close(sched.add_noise(x0_hat, eps_hat, t), x_t, rtol=0, atol=1e-9)


def test_v_at_terminal_step_with_zero_terminal_snr():
    sched = NoiseSchedule()
    x0, eps = _randn(2, 3, seed=6), _randn(2, 3, seed=7)
    t = torch.full((2,), T - 1)
    x_t = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, eps, rtol=0, atol=1e-12)  # pure noise
    torch.testing.assert_close(sched.training_target(x0, eps, t), -x0, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# coefficients, add_noise under torch.compile, timestep sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_coefficients_shape_dtype_device(dtype):
    sched = NoiseSchedule()
    t = torch.tensor([0, 7, 999])
    for like in (torch.zeros(3, 4, 5, 6, dtype=dtype), torch.zeros(3, 2, dtype=dtype)):
        a, s = sched.coefficients(t, like)
        shape = (3,) + (1,) * (like.ndim - 1)
        assert a.shape == s.shape == shape
        assert a.dtype == s.dtype == dtype and a.device == like.device
        torch.testing.assert_close(a.flatten(), sched.a[t].to(dtype))
        torch.testing.assert_close(s.flatten(), sched.s[t].to(dtype))


def test_coefficient_table_matches_the_schedule():
    """One (a, s) lookup, shared by NoiseSchedule and SelfPerceptualLoss (fastsp.perceptual)."""
    sched = NoiseSchedule()
    table = CoefficientTable(sched.alphas_cumprod.float())  # any dtype in: float64 tables
    assert table.a.dtype == table.s.dtype == torch.float64
    t = torch.tensor([999, 0, 321])
    like = torch.zeros(3, 2, 4, dtype=torch.float32)
    for got, want in zip(table(t, like), sched.coefficients(t, like), strict=True):
        assert got.shape == (3, 1, 1)
        torch.testing.assert_close(got, want)
    assert table(t, like)[0][0].item() == 0.0  # zero terminal SNR: a_{T-1} = 0


def test_default_labels_serve_every_caller():
    # the sampling CLI (a fixed label or cycling), the trainer's and the pipeline's grids (cycling)
    assert default_labels(5, 3).tolist() == [0, 1, 2, 0, 1]
    assert torch.equal(default_labels(5, 3), torch.arange(5) % 3)
    assert default_labels(4, 10, 7).tolist() == [7] * 4
    assert default_labels(4, 10, None).dtype == torch.long
    assert default_labels(4, 0) is None and default_labels(4, 0, None) is None


def test_add_noise_and_split_compile_fullgraph():
    sched = NoiseSchedule().prepare("cpu", torch.float32)

    def step(x0, eps, t, out):
        x_t = sched.add_noise(x0, eps, t)
        x0_hat, eps_hat = sched.split_prediction(out, x_t, t)
        return x_t, x0_hat, eps_hat, sched.training_target(x0, eps, t)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    x0, eps, out = (_randn(4, 3, 5, seed=k, dtype=torch.float32) for k in (8, 9, 10))
    for t in (torch.tensor([0, 1, 500, 999]), torch.tensor([3, 2, 1, 0])):
        for got, want in zip(compiled(x0, eps, t, out), step(x0, eps, t, out), strict=True):
            torch.testing.assert_close(got, want)
    assert counter.frame_count == 1  # prepared table: no recompile for new t values


@pytest.mark.cuda
def test_training_step_ops_capture_in_cuda_graph():
    # Capture fails on a host sync or a pageable host-to-device copy, so this checks both.
    sched = NoiseSchedule().prepare("cuda", torch.float32)
    x0 = torch.randn(4, 3, 8, 8, device="cuda")
    eps, out = torch.randn_like(x0), torch.randn_like(x0)
    t = torch.tensor([0, 1, 500, 999], device="cuda")

    def step():
        x_t = sched.add_noise(x0, eps, t)
        x0_hat, eps_hat = sched.split_prediction(out, x_t, t)
        return x0_hat + eps_hat + sched.training_target(x0, eps, t) + sched.to_v(out, x_t, t)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    t.copy_(torch.tensor([7, 8, 998, 2], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(result, step())


def test_sample_timesteps():
    sched = NoiseSchedule(num_timesteps=10)
    t = sched.sample_timesteps(4000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (4000,) and t.device.type == "cpu"
    assert t.min().item() == 0 and t.max().item() == 9
    counts = torch.bincount(t, minlength=10).double()
    assert (counts - 400).abs().max().item() < 80  # ~4 sigma of Binomial(4000, 0.1)
    again = sched.sample_timesteps(4000, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def test_sampling_timesteps_trailing():
    torch.testing.assert_close(sampling_timesteps(1000, 10), torch.arange(999, 0, -100))
    assert sampling_timesteps(1000, 3).tolist() == [999, 666, 332]
    assert sampling_timesteps(1000, 1).tolist() == [999]
    assert sampling_timesteps(10, 10).tolist() == list(range(9, -1, -1))
    for steps in (1, 7, 50, 333, 999):
        ts = sampling_timesteps(1000, steps)
        assert ts.dtype == torch.long and ts.shape == (steps,)
        assert ts[0].item() == 999 and ts[-1].item() >= 0
        assert torch.all(ts[1:] < ts[:-1])


def _oracle(sched, x0):
    """A model that knows x0: returns the exact target for the current x_t."""

    def model_fn(x_t, t):
        a, s = sched.coefficients(t, x_t)
        eps = (x_t - a * x0) / s
        return training_target(x0, eps, a, s, sched.prediction_type)

    return model_fn


def _gaussian_model(sched, mu, sd):
    """Exact model for data x0 ~ N(mu, sd^2) (per element): the posterior mean is linear."""

    def model_fn(x_t, t):
        a, s = sched.coefficients(t, x_t)
        x0_hat = mu + a * sd**2 * (x_t - a * mu) / (a**2 * sd**2 + s**2)
        eps_hat = (x_t - a * x0_hat) / s
        return training_target(x0_hat, eps_hat, a, s, sched.prediction_type)

    return model_fn


@pytest.mark.parametrize("prediction_type, zsnr", _PRED_CONFIGS)
@pytest.mark.parametrize("num_steps", [1, 10, 50])
def test_ddim_oracle_recovers_x0(prediction_type, zsnr, num_steps):
    sched = NoiseSchedule(zero_terminal_snr=zsnr, prediction_type=prediction_type)
    x0, noise = _randn(*_SHAPE, seed=11), _randn(*_SHAPE, seed=12)
    out = sample(_oracle(sched, x0), sched, noise, num_steps, "ddim")
    assert out.shape == noise.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("prediction_type, zsnr", _PRED_CONFIGS)
def test_euler_oracle_converges(prediction_type, zsnr):
    # Euler is first order in phi: the error of the oracle run shrinks like 1/num_steps.
    sched = NoiseSchedule(zero_terminal_snr=zsnr, prediction_type=prediction_type)
    x0, noise = _randn(*_SHAPE, seed=13), _randn(*_SHAPE, seed=14)
    errors = []
    for steps in (10, 50, 250):
        out = sample(_oracle(sched, x0), sched, noise, steps, "euler")
        errors.append((out - x0).abs().max().item())
        assert errors[-1] < 3.5 / steps, errors
    assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3, errors


@pytest.mark.parametrize("prediction_type, zsnr", [("v", True), ("x0", True), ("eps", False)])
def test_samplers_converge_to_gaussian_ode_solution(prediction_type, zsnr):
    # For x0 ~ N(mu, sd^2) the probability-flow ODE keeps (x_t - a_t mu) / sqrt(a_t^2 sd^2 + s_t^2)
    # constant, so the exact sample from x_{T-1} = noise is known in closed form.
    sched = NoiseSchedule(zero_terminal_snr=zsnr, prediction_type=prediction_type)
    mu = _randn(1, *_SHAPE[1:], seed=15)
    sd = 0.3 + torch.rand(1, *_SHAPE[1:], generator=torch.Generator().manual_seed(16)).double()
    noise = _randn(*_SHAPE, seed=17)
    a_last, s_last = sched.a[-1].item(), sched.s[-1].item()
    exact = mu + sd * (noise - a_last * mu) / torch.sqrt(a_last**2 * sd**2 + s_last**2)
    model_fn = _gaussian_model(sched, mu, sd)
    errors = {name: [] for name in SAMPLERS}
    gaps = []
    for steps in (10, 50, 250):
        outs = {name: sample(model_fn, sched, noise, steps, name) for name in SAMPLERS}
        for name in SAMPLERS:
            errors[name].append((outs[name] - exact).abs().max().item())
        gaps.append((outs["ddim"] - outs["euler"]).abs().max().item())
    for name in SAMPLERS:
        assert errors[name][0] > errors[name][1] > errors[name][2], (name, errors[name])
        assert errors[name][2] < 0.05, (name, errors[name])
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.05, gaps


def test_sample_float32_and_guidance_paths():
    sched = NoiseSchedule()
    noise = _randn(2, 3, 4, seed=18, dtype=torch.float32)
    x0 = _randn(2, 3, 4, seed=19, dtype=torch.float32)
    oracle = _oracle(sched, x0)
    plain = sample(oracle, sched, noise, 5)
    assert plain.dtype == torch.float32 and plain.shape == noise.shape
    torch.testing.assert_close(plain, x0, rtol=0, atol=1e-5)
    # guidance with an identical unconditional model changes nothing
    guided = sample(oracle, sched, noise, 5, guidance_scale=7.5, guidance_rescale=0.7,
                    uncond_model_fn=oracle)  # fmt: skip
    torch.testing.assert_close(guided, plain, rtol=0, atol=1e-5)
    # bf16 noise is sampled in float32
    assert sample(oracle, sched, noise.bfloat16(), 2, "euler").dtype == torch.float32


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prediction_type, zsnr", _PRED_CONFIGS)
def test_guidance_with_two_oracles_samples_the_guided_x0(sampler, prediction_type, zsnr):
    # Every prediction type is affine in x0 at a fixed x_t, so guiding an oracle of x0_c with an
    # oracle of x0_u is the oracle of x0_u + w (x0_c - x0_u): both runs take the same steps, and
    # DDIM (exact for an oracle) lands on that x0.
    sched = NoiseSchedule(zero_terminal_snr=zsnr, prediction_type=prediction_type)
    x0_c, x0_u = _randn(*_SHAPE, seed=22), _randn(*_SHAPE, seed=23)
    noise = _randn(*_SHAPE, seed=24)
    w = 3.0
    guided_x0 = x0_u + w * (x0_c - x0_u)
    guided = sample(
        _oracle(sched, x0_c), sched, noise, 20, sampler, w, uncond_model_fn=_oracle(sched, x0_u)
    )
    direct = sample(_oracle(sched, guided_x0), sched, noise, 20, sampler)
    torch.testing.assert_close(guided, direct, rtol=0, atol=1e-10)
    if sampler == "ddim":
        torch.testing.assert_close(guided, guided_x0, rtol=0, atol=1e-10)
    # CFG rescale (phi = 1) scales each model output to the conditional output's std: the run
    # differs from plain guidance, and stays finite.
    rescaled = sample(
        _oracle(sched, x0_c),
        sched,
        noise,
        20,
        sampler,
        w,
        guidance_rescale=1.0,
        uncond_model_fn=_oracle(sched, x0_u),
    )
    assert torch.isfinite(rescaled).all() and (rescaled - guided).abs().max() > 1e-3


def test_sample_guidance_needs_uncond_model():
    sched = NoiseSchedule()
    noise = torch.randn(2, 3)
    with pytest.raises(ValueError, match="uncond_model_fn"):
        sample(lambda x, t: x, sched, noise, 2, guidance_scale=3.0)
    # guidance_scale = 1 needs no unconditional model
    sample(lambda x, t: torch.zeros_like(x), sched, noise, 2, guidance_scale=1.0)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------


def test_guided_output():
    cond, uncond = _randn(*_SHAPE, seed=20), _randn(*_SHAPE, seed=21)
    assert guided_output(cond, uncond, 1.0, 0.7) is cond
    cfg = uncond + 7.5 * (cond - uncond)
    torch.testing.assert_close(guided_output(cond, uncond, 7.5), cfg)
    torch.testing.assert_close(guided_output(cond, uncond, 7.5, 0.0), cfg)
    full = guided_output(cond, uncond, 7.5, 1.0)
    torch.testing.assert_close(full.flatten(1).std(dim=1), cond.flatten(1).std(dim=1))
    # by hand, sample by sample
    got = guided_output(cond, uncond, 7.5, 0.7)
    for b in range(cond.shape[0]):
        x_cfg = uncond[b] + 7.5 * (cond[b] - uncond[b])
        x_res = x_cfg * (cond[b].std() / x_cfg.std())
        torch.testing.assert_close(got[b], 0.7 * x_res + 0.3 * x_cfg)
