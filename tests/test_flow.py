"""Rectified flow (fastsp.flow): the process, both objectives against the naive reference step,
capture safety, the sampler against diffusers' FlowMatchEulerDiscreteScheduler, the refusals."""

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from test_step import LR, RES, B, FailOnHostSync, _batch, _models

from fastsp import reference
from fastsp import train as train_cli
from fastsp.config import resolve
from fastsp.diffusion import NoiseSchedule
from fastsp.errors import ConfigError
from fastsp.flow import FlowProcess, flux_mu, image_seq_len, process_from_config, shift_sigmas
from fastsp.perceptual import SelfPerceptualLoss
from fastsp.step import StepConfig, TrainStep, step_randomness

# (process options, loss options): SD3's shifted logit-normal; Flux's resolution shift with a
# t' range; a logit-normal of other parameters with the timestep gate (--perceptual-on-t)
_PROCESSES = [
    ({"shift": 3.0, "t_sampling": "logit_normal"}, {}),
    ({"dynamic_shift": True, "resolution": RES}, {"perceptual_t": "100,900"}),
    ({"t_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 0.7}, {"on_t": "0,700"}),
]


def _flow_step(model, perceptual, objective, process, loss_options=None, **options):
    loss_options = dict(loss_options or {})
    perceptual_loss = None
    if objective == "self_perceptual":
        perceptual_loss = SelfPerceptualLoss(
            perceptual,
            process,
            perceptual_t=loss_options.get("perceptual_t", "uniform"),
            perceptual_on_t=loss_options.get("on_t", "all"),
            batched_branches=options.pop("batched_branches", False),
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    config = StepConfig(seed=3, global_batch=B, shape=(1, RES, RES), num_classes=10, **options)
    return TrainStep(
        config,
        model=model,
        online=model,
        ema=copy.deepcopy(model).requires_grad_(False),
        optimizer=optimizer,
        schedule=process,
        perceptual_loss=perceptual_loss,
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize(
    ("objective", "process_options", "loss_options"),
    [("mse", *_PROCESSES[0])] + [("self_perceptual", *case) for case in _PROCESSES],
)
def test_flow_fast_step_equals_the_reference_step(objective, process_options, loss_options):
    # float64: the fast step (process-agnostic, truncated perceptual forwards, fused AdamW)
    # against fastsp.reference's flow losses written out, same noise, t and t'.
    dtype = torch.float64
    process = FlowProcess(**process_options)
    model, perceptual = _models(dtype)
    ref_model = copy.deepcopy(model)
    batch = _batch(dtype)
    step = _flow_step(model, perceptual, objective, process, loss_options)
    step.load(batch, 5, LR, 0.1)
    step.compute(zero_grad=False)

    noise, t, _, t_prime = step_randomness(
        3, 5, B, (1, RES, RES), process, 0.0, torch.device("cpu"), step.perceptual_loss, dtype
    )
    assert t.dtype == torch.float32 and bool((t >= 0).all() and (t <= 1000).all())
    ref_optimizer = reference.make_reference_optimizer(ref_model, lr=LR)
    if objective == "mse":
        ref_loss = reference.reference_flow_mse_loss(
            ref_model, batch["x"], noise, t, labels=batch["label"]
        )
    else:
        on_t = (
            tuple(int(v) for v in loss_options["on_t"].split(","))
            if "on_t" in loss_options
            else None
        )
        ref_loss = reference.reference_flow_self_perceptual_loss(
            ref_model, perceptual, batch["x"], noise, t, t_prime, labels=batch["label"], on_t=on_t
        )
    ref_loss.backward()
    ref_optimizer.step()

    assert step.loss_sum.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        scale = q.grad.abs().max().item() + 1e-30
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-12 * scale), name
        # the fused AdamW's fp32 lr tensor is the one difference (see test_step)
        assert torch.allclose(p, q, rtol=0, atol=2 * LR * 2**-24), name


def test_flow_perceptual_inputs_differ_by_the_velocity_error():
    # x_t'_pred - x_t'_real = (t' - t)(v_hat - v) / T, and t' = t gives the same input twice
    process = FlowProcess()
    g = torch.Generator().manual_seed(0)
    x0, eps, v_hat = (torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64) for _ in range(3))
    t = process.sample_timesteps(4, generator=g).double()
    t_prime = process.timesteps_between(0, 1000, t, g).double()
    x_t = process.add_noise(x0, eps, t)
    x0_hat, eps_hat = process.split_prediction(v_hat, x_t, t)
    gap = process.add_noise(x0_hat, eps_hat, t_prime) - process.add_noise(x0, eps, t_prime)
    v = process.training_target(x0, eps, t)
    expected = ((t_prime - t) / 1000).view(-1, 1, 1, 1) * (v_hat - v)
    torch.testing.assert_close(gap, expected, rtol=0, atol=1e-13)
    same = process.add_noise(x0_hat, eps_hat, t) - x_t
    assert same.abs().max().item() < 1e-14


def test_flow_self_perceptual_loss_is_zero_at_t_prime_equal_t():
    model, perceptual = _models(torch.float64)
    loss_fn = SelfPerceptualLoss(perceptual, FlowProcess(shift=3.0), perceptual_t="same")
    batch = _batch(torch.float64)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn_like(batch["x"])
    t = loss_fn.process.sample_timesteps(B, generator=g)
    x_t = loss_fn.process.add_noise(batch["x"], noise, t)
    out = model(x_t, t, labels=batch["label"])
    loss = loss_fn(out, batch["x"], noise, t, cond={"labels": batch["label"]})
    assert loss.item() < 1e-25


def test_flow_timestep_sampling_and_shift():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    u = FlowProcess().sample_timesteps(n, generator=g) / 1000
    assert abs(u.mean().item() - 0.5) < 0.005 and u.min() >= 0 and u.max() < 1
    # logit-normal: logit(sigma) ~ N(mean, std) without a shift
    ln = FlowProcess(t_sampling="logit_normal", logit_mean=0.5, logit_std=0.7)
    logits = torch.logit(ln.sample_timesteps(n, generator=g).double() / 1000)
    assert abs(logits.mean().item() - 0.5) < 0.01 and abs(logits.std().item() - 0.7) < 0.01
    # the shift maps each quantile: P(sigma <= shift(q)) = q
    shifted = FlowProcess(shift=3.0).sample_timesteps(n, generator=g) / 1000
    assert abs((shifted <= shift_sigmas(0.25, 3.0)).double().mean().item() - 0.25) < 0.005
    # Flux: mu is diffusers' calculate_shift of the 2x2-patch sequence length
    for side in (16, 64, 128):
        assert flux_mu(image_seq_len(side, side)) == pytest.approx(
            calculate_shift(image_seq_len(side, side)), rel=1e-15
        )


@pytest.mark.parametrize(
    "objective, options, process_options",
    [
        ("mse", {}, {"shift": 3.0, "t_sampling": "logit_normal"}),
        ("self_perceptual", {"grad_accum": 2, "mse_weight": 1.0}, {"dynamic_shift": True}),
    ],
)
def test_the_flow_step_is_capture_safe(objective, options, process_options):
    process = FlowProcess(resolution=RES, **process_options)
    model, perceptual = _models()
    step = _flow_step(model, perceptual, objective, process, {"on_t": "0,700"}, **options)
    for i in range(2):
        step.load(_batch(seed=i), i, LR, 0.1)
        with FailOnHostSync():
            step.compute()
    assert step.good_steps.item() == 2


def _velocity(x, t):
    """A smooth stand-in for a velocity network; t [B] is sigma * 1000."""
    s = (t / 1000).view(-1, 1, 1, 1).to(x.dtype)
    return torch.sin(x) * (1 - s) - 0.3 * x + s


def _uncond_velocity(x, t):
    return 0.5 * torch.cos(x) - (t / 1000).view(-1, 1, 1, 1).to(x.dtype) * x


@pytest.mark.parametrize(
    "process, scheduler_options, side",
    [
        (FlowProcess(shift=3.0), {"shift": 3.0}, 8),
        (FlowProcess(), {}, 8),
        (
            FlowProcess(dynamic_shift=True, resolution=64),
            {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
            64,
        ),
    ],
    ids=["shift3", "no_shift", "flux_dynamic"],
)
@pytest.mark.parametrize("guidance", [(1.0, 0.0), (4.0, 0.0), (4.0, 0.7)])
def test_the_flow_sampler_equals_diffusers_step_for_step(
    process, scheduler_options, side, guidance
):
    # diffusers' FlowMatchEulerDiscreteScheduler beside ours: timesteps, sigmas and each step
    # from the same state, to 1e-6 in float64 (diffusers keeps sigmas and timesteps in float32
    # and casts the sample to float32 in `step`, which bounds the agreement).
    scale, rescale = guidance
    num_steps = 7
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_options)
    mu = calculate_shift(image_seq_len(side, side)) if process.dynamic_shift else None
    scheduler.set_timesteps(num_steps, mu=mu)
    sigmas = process.sampling_sigmas(num_steps, side, side)
    torch.testing.assert_close(sigmas, scheduler.sigmas.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sigmas[:-1] * 1000, scheduler.timesteps.double(), rtol=1e-6, atol=0)

    calls = []  # (x, t) of each model call of ours, the cond one first

    def model_fn(x, t):
        calls.append((x.clone(), t.clone()))
        return _velocity(x, t)

    noise = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0)).double()
    uncond = _uncond_velocity if scale != 1 else None
    ours = process.sample(
        model_fn,
        noise,
        num_steps,
        guidance_scale=scale,
        guidance_rescale=rescale,
        uncond_model_fn=uncond,
    )
    states = [x for x, _ in calls] + [ours]
    assert len(calls) == num_steps
    for i, timestep in enumerate(scheduler.timesteps):
        x, t = calls[i]
        assert torch.allclose(t, timestep.double().expand(2), rtol=1e-6, atol=0)
        v = _velocity(x, t)
        if scale != 1:  # the pipelines' CFG and diffusers' own rescale_noise_cfg
            v_uncond = _uncond_velocity(x, t)
            guided = v_uncond + scale * (v - v_uncond)
            v = rescale_noise_cfg(guided, v, guidance_rescale=rescale) if rescale else guided
        theirs = scheduler.step(v, timestep, x).prev_sample
        torch.testing.assert_close(theirs, states[i + 1], rtol=0, atol=1e-6)


def test_flow_options_mixed_with_ddpm_ones_are_refused_with_exit_2(tmp_path, capsys):
    cases = [
        (["--diffusion", "flow", "--no-zero-terminal-snr"], "--no-zero-terminal-snr"),
        (["--diffusion", "flow", "--prediction-type", "eps"], "--prediction-type eps"),
        (["--diffusion", "flow", "--beta-schedule", "linear"], "--beta-schedule linear"),
        (["--flow-shift", "3"], "--flow-shift 3"),
        (["--diffusion", "flow", "--flow-shift", "0"], "flow_shift"),
        (["--diffusion", "flow", "--flow-logit-std", "-1"], "flow_logit_std"),
    ]
    for argv, named in cases:
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            raise SystemExit(train_cli.main(["--preset", "tiny", *argv, "--out", str(out)]))
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and named in err, err
        assert len(err.splitlines()) <= 2, err  # the error, and where --help is
        assert not out.exists()


def test_a_flow_config_is_never_sampled_as_ddpm():
    flow, _ = resolve("tiny", {"diffusion": "flow", "flow_shift": 3.0}, {})
    with pytest.raises(ConfigError, match="--diffusion flow"):
        NoiseSchedule.from_config(flow)
    assert isinstance(process_from_config(flow), FlowProcess)
    assert process_from_config(flow).shift == 3.0
    ddpm, _ = resolve("tiny", {}, {})
    assert isinstance(process_from_config(ddpm), NoiseSchedule)


def test_a_ddpm_run_resumed_as_flow_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli.main(["--preset", "tiny", "--steps", "1", "--out", str(run)]) == 0
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    argv = ["--preset", "tiny", "--steps", "2", "--resume", "--diffusion", "flow"]
    assert train_cli.main([*argv, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--diffusion flow (checkpoint: ddpm)" in err, err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    # and its checkpoint as --init of a flow run (stage 2 from a DDPM stage 1)
    argv = ["--preset", "tiny", "--diffusion", "flow", "--objective", "self_perceptual"]
    assert train_cli.main([*argv, "--init", str(run), "--out", str(tmp_path / "s2")]) == 2
    assert "was trained with --diffusion ddpm" in capsys.readouterr().err
    assert not (tmp_path / "s2").exists()


# ---- export: the scheduler config samples the exported model as fastsp does ----------------

_EXPORT_RUNS = {
    "unet": [
        *("--preset", "tiny", "--data", "synthetic", "--cond", "context", "--channels", "4"),
        *("--resolution", "16", "--context-dim", "32", "--context-len", "5", "--flow-shift", "3"),
    ],
    "dit": ["--preset", "dit_tiny", "--flow-dynamic-shift"],
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(_EXPORT_RUNS))
def test_an_exported_flow_model_samples_the_same_in_diffusers(tmp_path, kind):
    import diffusers

    from fastsp import checkpoint, export

    run, out = tmp_path / "run", tmp_path / "exported"
    argv = [*_EXPORT_RUNS[kind], "--diffusion", "flow", "--steps", "1", "--device", "cpu"]
    assert train_cli.main([*argv, "--out", str(run)]) == 0
    assert export.main(["--checkpoint", str(run), "--to-diffusers", str(out)]) == 0

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out)
    loaded = checkpoint.load_model(run, "ema")
    ours, process = loaded.model.double(), process_from_config(loaded.train_config)
    assert scheduler.config.shift == process.shift
    assert scheduler.config.use_dynamic_shifting == process.dynamic_shift
    config = ours.config
    side = loaded.train_config.resolution
    num, steps, scale = 3, 5, 2.0
    shape = (config.in_channels, side, side)
    g = torch.Generator().manual_seed(7)
    if kind == "unet":
        theirs = diffusers.UNet2DConditionModel.from_pretrained(out, torch_dtype=torch.float64)
        context = torch.randn(num, 5, config.context_dim, generator=g, dtype=torch.float64)
        conditions = {"context": context}
        cond, uncond = (
            {"encoder_hidden_states": context},
            {"encoder_hidden_states": torch.zeros_like(context)},
        )
    else:
        theirs = diffusers.DiTTransformer2DModel.from_pretrained(out, torch_dtype=torch.float64)
        labels = torch.tensor([1, 4, 7])
        conditions = {"labels": labels}
        cond = {"class_labels": labels}
        uncond = {"class_labels": torch.full_like(labels, config.num_classes)}
    # fastsp's sampler on the same starting noise as fastsp.sampling.generate's, in float64
    noise = torch.randn((num, *shape), generator=torch.Generator().manual_seed(0)).double()
    null = {
        k: torch.zeros_like(v) if k == "context" else torch.full_like(v, config.num_classes)
        for k, v in conditions.items()
    }
    images = process.sample(
        lambda x, t: ours(x, t, **conditions),
        noise,
        steps,
        guidance_scale=scale,
        uncond_model_fn=lambda x, t: ours(x, t, **null),
    ).clamp(-1, 1)

    # diffusers: its scheduler (mu from the image sequence length under the dynamic shift), the
    # pipelines' CFG, the same starting noise as fastsp.sampling.generate's
    mu = calculate_shift(image_seq_len(side, side)) if process.dynamic_shift else None
    scheduler.set_timesteps(steps, mu=mu)
    x = noise
    theirs.eval()
    with torch.no_grad():
        for t in scheduler.timesteps:
            t_batch = t.expand(num)
            v_cond = theirs(x, t_batch, **cond).sample
            v_uncond = theirs(x, t_batch, **uncond).sample
            x = scheduler.step(v_uncond + scale * (v_cond - v_uncond), t, x).prev_sample
    assert images.abs().max() > 0.1
    # diffusers holds timesteps in float32 and casts the sample to float32 in each step
    torch.testing.assert_close(images, x.clamp(-1, 1), rtol=0, atol=1e-5)


def test_the_ddpm_scheduler_config_is_fastsps_ddim():
    # the DDIMScheduler that export writes for a DDPM run: fastsp's alpha_bar, trailing
    # timesteps, and its DDIM steps (the last to alpha_bar = 1)
    from diffusers import DDIMScheduler

    from fastsp.diffusion import sample, sampling_timesteps
    from fastsp.flow import scheduler_config

    for options in ({}, {"beta_schedule": "cosine", "prediction_type": "x0"}):
        cfg, _ = resolve("tiny", options, {})
        ddim = DDIMScheduler.from_config(scheduler_config(cfg))
        schedule = NoiseSchedule.from_config(cfg)
        torch.testing.assert_close(
            ddim.alphas_cumprod.double(), schedule.alphas_cumprod, rtol=0, atol=1e-6
        )
        ddim.set_timesteps(10)
        assert ddim.timesteps.tolist() == sampling_timesteps(cfg.num_timesteps, 10).tolist()
        noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).double()
        ours = sample(lambda x, t: _velocity(x, t.double()), schedule, noise, 10)
        x = noise
        for t in ddim.timesteps:
            x = ddim.step(_velocity(x, t.double().expand(2)), t, x).prev_sample
        torch.testing.assert_close(ours, x.double(), rtol=0, atol=1e-5)
    flow_cfg, _ = resolve("tiny", {"diffusion": "flow", "flow_shift": 3.0}, {})
    flow = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config(flow_cfg))
    assert flow.config.shift == 3.0 and not flow.config.use_dynamic_shifting


@pytest.mark.slow
def test_the_pipeline_runs_both_stages_under_flow_on_letters(tmp_path, capsys):
    import json

    from fastsp import pipeline

    out = tmp_path / "pipeline"
    argv = [
        *("--preset", "tiny", "--out", str(out), "--stage1-steps", "4", "--stage2-steps", "2"),
        *("--compare-num", "4", "--compare-steps", "3", "--diffusion", "flow"),
        *("--flow-shift", "3", "--flow-t-sampling", "logit_normal", "--data", "letters"),
    ]
    assert pipeline.main(argv) == 0
    assert "comparison (no CFG)" in capsys.readouterr().out
    for run in ("stage1_mse", "stage2_self_perceptual", "stage2_mse"):
        train = json.loads((out / run / "config.json").read_text())["train"]
        assert (train["diffusion"], train["flow_shift"], train["data"]) == ("flow", 3.0, "letters")
        lines = (out / run / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
        assert losses and all(0 < loss < 100 for loss in losses), (run, losses)
    assert (out / "comparison.png").is_file()
