"""The DiT backbone (fastsp.dit): taps, parameter counts, the fast step against the reference,
config round trips, the token layout of the fused feature MSE, and the real command line.

diffusers interop is in tests/test_dit_diffusers.py.
"""

import copy
import dataclasses
import json
import os
import sys
from pathlib import Path

import prefork
import pytest
import torch
from test_step import FailOnHostSync

from fastsp import config as config_lib
from fastsp import config_file, model_config, reference
from fastsp import evaluate as evaluate_cli
from fastsp import export as export_cli
from fastsp.config_cli import parse_args
from fastsp.diffusion import NoiseSchedule
from fastsp.dit import DiT
from fastsp.errors import ConfigError
from fastsp.feature_loss import feature_mse, feature_mse_multi
from fastsp.model_config import DIT_PRESETS, DiTConfig, UNetConfig
from fastsp.models import build_model
from fastsp.perceptual import SelfPerceptualLoss
from fastsp.step import StepConfig, TrainStep, step_randomness

REPO = Path(__file__).resolve().parents[1]
TINY = DIT_PRESETS["dit_tiny"]  # 1 channel, 8x8, patch 2 (16 tokens), D 32, 4 blocks, 10 classes
B, RES, LR = 6, 8, 1e-3


def _random_dit(config=TINY, seed=0, dtype=torch.float64):
    """Every weight random: the zero-initialised adaLN, cross-attention and output layers would
    make the blocks identities and the output 0, and hide mistakes."""
    torch.manual_seed(seed)
    model = DiT(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _inputs(config=TINY, batch=B, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, RES, RES, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    labels = torch.randint(0, config.num_classes + 1, (batch,), generator=g)  # some null labels
    return x, t, labels


# ---------------------------------------------------------------------------- taps


def test_truncated_forward_returns_exactly_the_taps_of_a_full_forward():
    model = _random_dit()
    x, t, labels = _inputs()
    seen = {}
    hooks = [
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"block{i}", out))
        for i, block in enumerate(model.blocks)
    ]
    with torch.no_grad():
        full = model(x, t, labels)
    for hook in hooks:
        hook.remove()
    assert full.shape == x.shape
    seen["mid"] = seen[f"block{TINY.depth // 2 - 1}"]
    assert set(model.tap_names) == set(seen)
    for name in model.tap_names:
        ran = []
        hooks = [
            block.register_forward_pre_hook(lambda m, a, i=i, ran=ran: ran.append(i))
            for i, block in enumerate(model.blocks)
        ]
        with torch.no_grad():
            out = model(x, t, labels, taps=[name])
        for hook in hooks:
            hook.remove()
        assert list(out) == [name]
        assert torch.equal(out[name], seen[name]), name
        assert out[name].shape == (B, (RES // TINY.patch_size) ** 2, TINY.hidden_size)
        assert ran == list(range(model.tap_block(name) + 1)), (name, ran)  # nothing after it
    with torch.no_grad():
        both = model(x, t, labels, taps=["block0", "mid"])
    assert set(both) == {"block0", "mid"} and torch.equal(both["mid"], seen["mid"])


def test_mid_is_the_output_of_the_first_half_of_the_blocks():
    for name in ("dit_tiny", "dit_digits", "dit_xl2"):
        config = DIT_PRESETS[name]
        with torch.device("meta"):
            model = DiT(config)
        assert model.tap_block("mid") == config.depth // 2 - 1
        assert model.mid is model.blocks[config.depth // 2 - 1]  # what the reference step hooks
    with pytest.raises(ValueError, match="unknown tap"):
        _random_dit()(*_inputs(), taps=["down0"])


def test_untrained_model_predicts_zero_and_labels_context_condition_it():
    # DiT's init: adaLN-Zero and the output layer are zero, so the model starts at 0.
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, context_dim=12)
    x, t, labels = _inputs(config, dtype=torch.float32)
    context = torch.randn(B, 5, 12)
    assert torch.equal(DiT(config)(x, t, labels, context), torch.zeros_like(x))
    model = _random_dit(config)
    x, t, labels, context = x.double(), t, labels, context.double()
    with torch.no_grad():
        out = model(x, t, labels, context)
        assert not torch.allclose(out, model(x, t, labels, torch.zeros_like(context)))
        null = model(x, t, torch.full_like(labels, config.num_classes), context)
        assert torch.equal(model(x, t, None, context), null)  # no labels = the null label
        other = (labels + 1) % config.num_classes
        assert not torch.allclose(model(x, t, other, context), out)
    with pytest.raises(ValueError, match="context .* is required"):
        model(x, t, labels)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(x[..., :7], t, labels, context)


def test_another_input_size_runs_with_a_rescaled_grid():
    model = _random_dit()
    x = torch.randn(2, 1, 12, 8, dtype=torch.float64)  # not the 8x8 input_size, not square
    with torch.no_grad():
        out = model(x, torch.tensor([3, 700]), torch.tensor([1, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all()


# ---------------------------------------------------------------------------- presets

# Parameters of fastsp's DiT, and of the DiT paper's code (models.py), which adds the sin-cos
# positions as a frozen nn.Parameter (N * D values) and a learned-sigma half of the output layer
# (D * p * p * C + p * p * C): the paper's 33M, 130M, 458M and 675M.
_PAPER_SHAPES = {
    "dit_s2": (32_858_896, 32_963_360, 33),
    "dit_b2": (130_303_504, 130_512_416, 130),
    "dit_l2": (457_824_272, 458_102_816, 458),
    "dit_xl2": (674_816_272, 675_129_632, 675),
}


@pytest.mark.parametrize("name", sorted(_PAPER_SHAPES))
def test_paper_shapes_have_the_papers_parameter_counts(name):
    config = DIT_PRESETS[name]
    assert (config.patch_size, config.input_size, config.in_channels) == (2, 32, 4)
    with torch.device("meta"):  # no memory is allocated
        model = build_model(config)
    ours, theirs, millions = _PAPER_SHAPES[name]
    assert sum(p.numel() for p in model.parameters()) == ours
    tokens = (config.input_size // config.patch_size) ** 2
    outputs = config.patch_size**2 * config.in_channels
    sigma = config.hidden_size * outputs + outputs
    assert ours + tokens * config.hidden_size + sigma == theirs
    assert abs(theirs / 1e6 - millions) < 0.6  # the paper's figures, rounded either way


def test_presets_select_the_dit_and_its_options():
    train, model = parse_args(["--preset", "dit_digits", "--depth", "8", "--context-dim", "0"])
    assert isinstance(model, DiTConfig) and model.depth == 8 and train.preset == "dit_digits"
    for argv, wrong in (
        (["--preset", "dit_tiny", "--base-channels", "32"], "--base-channels"),
        (["--preset", "tiny", "--depth", "3"], "--depth"),
    ):
        with pytest.raises(ConfigError, match=f"{wrong}: not an option of the"):
            config_lib.resolve(argv[1], {}, {argv[2][2:].replace("-", "_"): int(argv[3])})
    with pytest.raises(ConfigError, match="heads"):
        DiTConfig(hidden_size=32, heads=3)
    with pytest.raises(ConfigError, match="depth"):
        DiTConfig(depth=1)


def test_config_json_records_the_kind_and_old_files_are_unets():
    train, model = parse_args(["--preset", "dit_tiny"])
    saved = json.loads(config_file.dumps(train, model))
    assert saved["model"]["kind"] == "dit"
    assert config_file.model_config_from_dict(saved["model"]) == model
    unet = model_config.UNET_PRESETS["tiny"]
    old = dataclasses.asdict(unet)  # a config.json written before the kind existed
    assert "kind" not in old and config_file.model_config_from_dict(old) == unet
    assert isinstance(build_model(config_file.model_config_from_dict(old)), torch.nn.Module)
    with pytest.raises(ConfigError, match="unknown model kind"):
        config_file.model_config_from_dict({**saved["model"], "kind": "vit"})
    assert isinstance(config_file.model_config_from_dict(json.loads(json.dumps(old))), UNetConfig)


# ---------------------------------------------------------------------------- the step


def _fast_step(model, perceptual, objective):
    schedule = NoiseSchedule()
    perceptual_loss = (
        SelfPerceptualLoss(perceptual, schedule.alphas_cumprod)
        if objective == "self_perceptual"
        else None
    )
    config = StepConfig(seed=3, global_batch=B, shape=(1, RES, RES), num_classes=10)
    return TrainStep(
        config,
        model=model,
        online=model,
        ema=copy.deepcopy(model).requires_grad_(False),
        optimizer=torch.optim.AdamW(model.parameters(), lr=LR, fused=True),
        schedule=schedule,
        perceptual_loss=perceptual_loss,
        device=torch.device("cpu"),
    )


def _models():
    model = _random_dit().train()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.25)  # tamer activations: AdamW's update is then far from its epsilon
    perceptual = copy.deepcopy(model)
    with torch.no_grad():
        for p in perceptual.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, perceptual.eval().requires_grad_(False)


@pytest.mark.parametrize("objective", ["mse", "self_perceptual"])
def test_fast_step_equals_the_reference_step_in_float64(objective):
    # tests/test_step.py's equality on the DiT: the fast step (perceptual pass cut after "mid",
    # fused feature loss on [B, N, D] tokens, fused AdamW) against fastsp.reference's naive step
    # (two full perceptual forwards, a hook on model.mid, F.mse_loss, torch's AdamW).
    model, perceptual = _models()
    ref_model = copy.deepcopy(model)
    x, _, labels = _inputs()
    labels = labels % 10
    batch = {"x": x, "label": labels}
    step = _fast_step(model, perceptual, objective)
    step.load(batch, 5, LR, 0.1)
    with FailOnHostSync():  # and nothing in the step reads a tensor on the host
        step.compute(zero_grad=False)

    schedule = NoiseSchedule()
    noise, t, _, t_prime = step_randomness(
        3,
        5,
        B,
        (1, RES, RES),
        schedule,
        0.0,
        torch.device("cpu"),
        step.perceptual_loss,
        torch.float64,
    )
    alphas = schedule.alphas_cumprod.double()
    ref_optimizer = reference.make_reference_optimizer(ref_model, lr=LR)
    if objective == "mse":
        ref_loss = reference.reference_mse_step(
            ref_model, ref_optimizer, x, noise, t, alphas, labels=labels
        )
    else:
        ref_loss = reference.reference_self_perceptual_step(
            ref_model, perceptual, ref_optimizer, x, noise, t, t_prime, alphas, labels=labels
        )
    assert ref_loss > 0
    assert step.loss_sum.item() == pytest.approx(ref_loss, rel=1e-12)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        scale = q.grad.abs().max().item() + 1e-30
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-12 * scale), name
        # the fast step's lr is an fp32 device tensor: its rounding is the only difference
        assert torch.allclose(p, q, rtol=0, atol=2 * LR * 2**-24), (name, (p - q).abs().max())


# ---------------------------------------------------------------------------- feature MSE

# Token features [B, N, D] of odd sizes: contiguous, a transposed [B, D, N] view made contiguous
# the other way (strides (N D, 1, N)), and a slice of a wider tensor (strides with a gap).
_TOKEN_SHAPES = [(3, 17, 40), (2, 65, 24)]


def _layouts(shape, g):
    b, n, d = shape
    yield torch.randn(shape, generator=g)
    yield torch.randn(b, d, n, generator=g).transpose(1, 2)
    yield torch.randn(b, n, d + 7, generator=g)[..., 3 : 3 + d]


@pytest.mark.parametrize("shape", _TOKEN_SHAPES)
def test_fused_feature_mse_takes_token_features(shape):
    # On CPU the Triton kernels run in the interpreter (tests/conftest.py); backend="triton"
    # forces them. Values and gradients against float64, with grad_output != 1.
    g = torch.Generator().manual_seed(0)
    for x in _layouts(shape, g):
        for y in _layouts(shape, g):
            x = x.detach().requires_grad_(True)
            loss = feature_mse(x, y, backend="triton")
            (2.5 * loss).backward()
            expected = torch.nn.functional.mse_loss(x.detach().double(), y.double())
            assert loss.item() == pytest.approx(expected.item(), rel=2e-6)
            grad = 2.5 * 2 * (x.detach().double() - y.double()) / x.numel()
            assert torch.allclose(x.grad.double(), grad, rtol=1e-5, atol=1e-9)
    xs = [torch.randn(s, generator=g).requires_grad_(True) for s in _TOKEN_SHAPES]
    ys = [
        torch.randn(s, generator=g).transpose(1, 2).contiguous().transpose(1, 2)
        for s in _TOKEN_SHAPES
    ]
    multi = feature_mse_multi(xs, ys, [1.0, 0.5], backend="triton")
    ref = sum(
        w * torch.nn.functional.mse_loss(x.double(), y.double())
        for x, y, w in zip(xs, ys, [1.0, 0.5], strict=True)
    )
    assert multi.item() == pytest.approx(ref.item(), rel=2e-6)


# ---------------------------------------------------------------------------- the command line


def _run(*argv):
    # the suite's own environment, so that the runs fork from the server the other tests use
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = prefork.run([sys.executable, *argv], env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_train_resume_stage2_and_sample_through_the_cli(tmp_path):
    # Stage 1 (MSE) for 4 steps; stage 2 (self-perceptual from it) to step 2, then resumed to 4;
    # a grid sampled from the stage-2 checkpoint. Every checkpoint records the DiT.
    train = str(REPO / "fastsp" / "train.py")
    common = ["--preset", "dit_tiny", "--batch-size", "4", "--log-every", "1"]
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    _run(train, *common, "--steps", "4", "--out", str(stage1))
    stage2_args = [*common, "--objective", "self_perceptual", "--init", str(stage1)]
    _run(train, *stage2_args, "--steps", "2", "--checkpoint-every", "2", "--out", str(stage2))
    _run(train, *stage2_args, "--steps", "4", "--out", str(stage2), "--resume")
    lines = (stage2 / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [1, 2, 3, 4]
    saved = json.loads((stage2 / "checkpoints" / "step_00000004" / "config.json").read_text())
    assert saved["model"]["kind"] == "dit" and saved["train"]["objective"] == "self_perceptual"
    grid = tmp_path / "grid.png"
    _run(
        "-m",
        "fastsp.sample",
        "--checkpoint",
        str(stage2),
        "--num",
        "4",
        "--steps",
        "2",
        "--out",
        str(grid),
    )
    assert grid.stat().st_size > 0
    # evaluation reads the DiT checkpoint like a UNet's (digits classifier, FID, accuracy)
    report = tmp_path / "eval.json"
    assert (
        evaluate_cli.main(
            ["--checkpoint", str(stage2), "--num", "16", "--steps", "1", "--out", str(report)]
        )
        == 0
    )
    scores = json.loads(report.read_text())
    assert scores["generated_images"] == 16 and scores["metrics"]["fid"] > 0
    # the stage-2 DiT as a diffusers DiTTransformer2DModel folder, through the export command
    assert (
        export_cli.main(["--checkpoint", str(stage2), "--to-diffusers", str(tmp_path / "hf")]) == 0
    )
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["_class_name"] == (
        "DiTTransformer2DModel"
    )
