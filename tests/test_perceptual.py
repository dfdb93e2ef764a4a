"""The self-perceptual objective: PAPER.md's identities, the oracle equality, isolation, errors."""

import copy
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from sd_tiny import SD21_SCHEDULER_CONFIG

from fastsp import config, reference
from fastsp import train as train_cli
from fastsp.diffusion import NoiseSchedule
from fastsp.model_config import UNET_PRESETS
from fastsp.objectives import training_loss
from fastsp.perceptual import FeatureExtractor, SelfPerceptualLoss, parse_layers
from fastsp.training.assembly import build_perceptual_loss
from fastsp.training.plan import plan_run
from fastsp.unet import UNet

REPO = Path(__file__).resolve().parents[1]
B = 4


def _random_unet(seed=0, **overrides):
    """The tiny UNet in float64 with every weight randomised (its output layers start at zero)."""
    torch.manual_seed(seed)
    model = UNet(dataclasses.replace(UNET_PRESETS["tiny"], **overrides)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 317, 640, 999])
    t_prime = torch.tensor([999, 12, 500, 700])
    labels = torch.tensor([1, 4, 10, 7])  # 10 is the null label
    return x0, noise, t, t_prime, labels


def _schedule(prediction_type="v"):
    return NoiseSchedule(
        prediction_type=prediction_type, zero_terminal_snr=prediction_type != "eps"
    )


def test_same_t_with_eps_hat_gives_zero_loss():
    # PAPER.md: with t' = t, a_t x0_hat + s_t eps_hat = x_t exactly, so the features coincide.
    online, perceptual = _random_unet(0), reference.frozen_copy(_random_unet(1))
    x0, noise, t, _, labels = _batch()
    schedule = _schedule()
    cond = {"labels": labels, "context": None}
    same = SelfPerceptualLoss(perceptual, schedule.alphas_cumprod, perceptual_t="same")
    loss = training_loss(online, schedule, x0, noise, t, cond, same, same.sample_t_prime(t))
    assert loss.item() < 1e-20
    true_noise = SelfPerceptualLoss(
        perceptual, schedule.alphas_cumprod, perceptual_t="same", predicted_noise="eps"
    )
    assert training_loss(online, schedule, x0, noise, t, cond, true_noise, t).item() > 1e-6


def test_oracle_online_model_gives_zero_loss():
    perceptual = reference.frozen_copy(_random_unet(1))
    x0, noise, t, t_prime, labels = _batch()
    schedule = _schedule()
    a, s = schedule.coefficients(t, x0)
    true_v = a * noise - s * x0
    loss_fn = SelfPerceptualLoss(perceptual, schedule.alphas_cumprod)
    assert loss_fn(true_v, x0, noise, t, t_prime, {"labels": labels}).item() < 1e-20
    assert loss_fn(true_v + 0.1, x0, noise, t, t_prime, {"labels": labels}).item() > 1e-6


CONDITIONING = {
    # name: (UNet overrides, conditioning inputs for a batch of B)
    "class": ({}, lambda g: {"labels": torch.tensor([1, 4, 10, 7]), "context": None}),
    "none": ({"num_classes": 0}, lambda g: {"labels": None, "context": None}),
    "context": (
        {"num_classes": 0, "context_dim": 12},
        lambda g: {"labels": None, "context": torch.randn(B, 5, 12, generator=g).double()},
    ),
}


@pytest.mark.parametrize("conditioning", sorted(CONDITIONING))
@pytest.mark.parametrize("prediction_type", ["v", "eps", "x0"])
def test_objective_equals_the_naive_reference_in_float64(prediction_type, conditioning):
    """Loss and every gradient of fastsp's objective == fastsp/reference.py, same noise and t,
    for each prediction type and each way of conditioning (none, class labels, context)."""
    overrides, make_cond = CONDITIONING[conditioning]
    online = _random_unet(0, **overrides)
    perceptual = reference.frozen_copy(_random_unet(1, **overrides))
    twin = copy.deepcopy(online)
    x0, noise, t, t_prime, _ = _batch()
    cond = make_cond(torch.Generator().manual_seed(2))
    if prediction_type == "eps":  # eps needs a_t > 0: no zero terminal SNR, and t < T-1 anyway
        t = t.clamp(max=998)
    schedule = _schedule(prediction_type)
    loss_fn = SelfPerceptualLoss(
        perceptual, schedule.alphas_cumprod, prediction_type=prediction_type
    )
    ours = training_loss(online, schedule, x0, noise, t, cond, loss_fn, t_prime)
    ours.backward()
    theirs = reference.reference_self_perceptual_loss(
        twin,
        perceptual,
        x0,
        noise,
        t,
        t_prime,
        schedule.alphas_cumprod.double(),
        **cond,
        prediction_type=prediction_type,
    )
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0)
    assert ours.item() > 0
    for (name, p), q in zip(online.named_parameters(), twin.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-14, msg=name)
    assert all(p.grad is None for p in perceptual.parameters())


def test_mse_weight_adds_the_ordinary_loss():
    """loss = self-perceptual + mse_weight * MSE (the --mse-weight option), checked in float64."""
    online, perceptual = _random_unet(0), reference.frozen_copy(_random_unet(1))
    x0, noise, t, t_prime, labels = _batch()
    schedule = _schedule()
    cond = {"labels": labels, "context": None}
    loss_fn = SelfPerceptualLoss(perceptual, schedule.alphas_cumprod)
    perceptual_only = training_loss(online, schedule, x0, noise, t, cond, loss_fn, t_prime)
    mse_only = training_loss(online, schedule, x0, noise, t, cond)
    both = training_loss(online, schedule, x0, noise, t, cond, loss_fn, t_prime, mse_weight=0.25)
    torch.testing.assert_close(both, perceptual_only + 0.25 * mse_only, rtol=1e-12, atol=0)
    assert mse_only.item() > 0 and perceptual_only.item() > 0


def test_eps_prediction_with_zero_terminal_snr_is_refused_by_the_loss():
    perceptual = reference.frozen_copy(_random_unet(1))
    zero_snr = NoiseSchedule(prediction_type="v", zero_terminal_snr=True).alphas_cumprod
    with pytest.raises(ValueError, match="prediction_type 'v'.*or 'x0'"):
        SelfPerceptualLoss(perceptual, zero_snr, prediction_type="eps")
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        SelfPerceptualLoss(perceptual, zero_snr, prediction_type="epsilon")  # diffusers' name
    SelfPerceptualLoss(perceptual, _schedule("eps").alphas_cumprod, prediction_type="eps")


def test_mse_objective_equals_the_naive_reference():
    online = _random_unet(0)
    twin = copy.deepcopy(online)
    x0, noise, t, _, labels = _batch()
    schedule = _schedule()
    ours = training_loss(online, schedule, x0, noise, t, {"labels": labels, "context": None})
    theirs = reference.reference_mse_loss(
        twin, x0, noise, t, schedule.alphas_cumprod.double(), labels=labels
    )
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-10, atol=0)


def test_gradients_reach_the_online_model_only_and_the_frozen_net_never_changes():
    online, perceptual = _random_unet(0), reference.frozen_copy(_random_unet(1))
    before = {k: v.clone() for k, v in perceptual.state_dict().items()}
    schedule = _schedule()
    loss_fn = SelfPerceptualLoss(perceptual, schedule.alphas_cumprod)
    optimizer = torch.optim.AdamW(online.parameters(), lr=1e-3)
    for step in range(3):
        x0, noise, t, t_prime, labels = _batch(seed=step)
        optimizer.zero_grad()
        training_loss(
            online, schedule, x0, noise, t, {"labels": labels, "context": None}, loss_fn, t_prime
        ).backward()
        for name, p in online.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in perceptual.parameters())
    assert not perceptual.training
    for k, v in perceptual.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_truncated_perceptual_forward_equals_the_hooked_full_forward():
    perceptual = reference.frozen_copy(_random_unet(1))
    x0, _, t, _, labels = _batch()
    ran_decoder = []
    handle = perceptual.up[0].register_forward_hook(lambda *args: ran_decoder.append(True))
    truncated = FeatureExtractor(perceptual, ["mid"])(x0, t, {"labels": labels})["mid"]
    handle.remove()
    assert not ran_decoder, "the perceptual forward must stop at the mid block"
    hooked = reference.mid_features(perceptual, x0, t, labels=labels)
    assert torch.equal(truncated, hooked)


def test_several_layers_with_weights_and_l1():
    online, perceptual = _random_unet(0), reference.frozen_copy(_random_unet(1))
    x0, noise, t, t_prime, labels = _batch()
    schedule = _schedule()
    a, s = schedule.coefficients(t, x0)
    prediction = online(a * x0 + s * noise, t, labels=labels)
    x0_hat, eps_hat = schedule.split_prediction(prediction, a * x0 + s * noise, t)
    ap, sp = schedule.coefficients(t_prime, x0)
    real = perceptual(ap * x0 + sp * noise, t_prime, labels=labels, taps=["down0", "mid"])
    pred = perceptual(ap * x0_hat + sp * eps_hat, t_prime, labels=labels, taps=["down0", "mid"])
    expected_l2 = (
        0.5 * (pred["down0"] - real["down0"]).square().mean()
        + 2 * (pred["mid"] - real["mid"]).square().mean()
    )
    expected_l1 = (pred["down0"] - real["down0"]).abs().mean() + (
        pred["mid"] - real["mid"]
    ).abs().mean()
    cond = {"labels": labels}
    l2 = SelfPerceptualLoss(perceptual, schedule.alphas_cumprod, layers="down0:0.5,mid:2")
    l1 = SelfPerceptualLoss(
        perceptual, schedule.alphas_cumprod, layers=["down0", "mid"], distance="l1"
    )
    torch.testing.assert_close(
        l2(prediction, x0, noise, t, t_prime, cond).double(), expected_l2, rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        l1(prediction, x0, noise, t, t_prime, cond).double(), expected_l1, rtol=1e-6, atol=0
    )


def test_t_prime_distributions():
    perceptual = reference.frozen_copy(_random_unet(1))
    schedule = _schedule()
    t = torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    uniform = SelfPerceptualLoss(perceptual, schedule.alphas_cumprod).sample_t_prime(t, g)
    assert uniform.min() >= 0 and uniform.max() <= 999 and not torch.equal(uniform, t)
    assert abs(uniform.double().mean().item() - 499.5) < 15  # 4096 draws: std of the mean ~4.5
    ranged = SelfPerceptualLoss(
        perceptual, schedule.alphas_cumprod, perceptual_t="200,300"
    ).sample_t_prime(t, g)
    assert ranged.min() >= 200 and ranged.max() <= 300
    same = SelfPerceptualLoss(
        perceptual, schedule.alphas_cumprod, perceptual_t="same"
    ).sample_t_prime(t, g)
    assert torch.equal(same, t)


def test_option_parsing_errors():
    assert parse_layers("mid") == {"mid": 1.0}
    assert parse_layers("mid:1,down1:0.25") == {"mid": 1.0, "down1": 0.25}
    with pytest.raises(ValueError, match="not a number"):
        parse_layers("mid:heavy")
    perceptual = reference.frozen_copy(_random_unet(1))
    with pytest.raises(ValueError, match="valid names: down0, down1, mid, up0, up1"):
        SelfPerceptualLoss(perceptual, _schedule().alphas_cumprod, layers="middle")
    with pytest.raises(ValueError, match="LOW,HIGH"):
        SelfPerceptualLoss(perceptual, _schedule().alphas_cumprod, perceptual_t="gaussian")
    with pytest.raises(ValueError, match="0 <= LOW <= HIGH < 1000"):
        SelfPerceptualLoss(perceptual, _schedule().alphas_cumprod, perceptual_t="10,1000")


# ---------------------------------------------------------------------------------------------
# Stage 2 through the command line


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _fails(argv, capsys, *expected):
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1") / "run"
    assert train_cli.main(["--preset", "tiny", "--steps", "3", "--out", str(out)]) == 0
    return out


def test_stage2_trains_and_leaves_the_perceptual_checkpoint_untouched(stage1, tmp_path):
    before = _digest(stage1 / "checkpoints" / "step_00000003")
    out = tmp_path / "sp"
    argv = [
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--objective",
        "self_perceptual",
        "--init",
        str(stage1),
        "--mse-weight",
        "0.1",
        "--out",
        str(out),
    ]
    assert train_cli.main(argv) == 0
    assert _digest(stage1 / "checkpoints" / "step_00000003") == before
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines and all(re.search(r'"loss": [0-9.e-]+', line) for line in lines)


def test_stage2_with_ema_source_and_another_layer(stage1, tmp_path):
    argv = [
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--objective",
        "self_perceptual",
        "--init",
        str(stage1),
        "--perceptual-source",
        "ema",
        "--perceptual-layers",
        "down1",
        "--out",
        str(tmp_path / "ema"),
    ]
    assert train_cli.main(argv) == 0


def test_stage2_without_a_perceptual_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(
            ["--preset", "tiny", "--objective", "self_perceptual", "--out", str(tmp_path / "o")]
        )
    assert exit_info.value.code == 2
    assert "--init CHECKPOINT" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_stage2_with_a_perceptual_checkpoint_but_no_init_is_refused(stage1, tmp_path, capsys):
    # The online model must start from stage 1 (PAPER.md), not from random weights.
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(
            [
                "--preset",
                "tiny",
                "--objective",
                "self_perceptual",
                "--perceptual-checkpoint",
                str(stage1),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert exit_info.value.code == 2
    assert "--init CHECKPOINT" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_stage2_with_another_perceptual_checkpoint_and_x0_prediction(tmp_path):
    """A separate same-shape perceptual checkpoint, x0-prediction, through the command line."""
    runs = {}
    for name, seed in (("online", "1"), ("perceptual", "2")):
        runs[name] = tmp_path / name
        argv = ["--preset", "tiny", "--steps", "2", "--seed", seed, "--prediction-type", "x0"]
        assert train_cli.main([*argv, "--out", str(runs[name])]) == 0
    before = _digest(runs["perceptual"] / "checkpoints" / "step_00000002")
    out = tmp_path / "sp"
    argv = [
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--prediction-type",
        "x0",
        "--objective",
        "self_perceptual",
        "--init",
        str(runs["online"]),
        "--perceptual-checkpoint",
        str(runs["perceptual"]),
        "--out",
        str(out),
    ]
    assert train_cli.main(argv) == 0
    assert _digest(runs["perceptual"] / "checkpoints" / "step_00000002") == before
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["perceptual_checkpoint"] == str(runs["perceptual"])


def test_ema_source_uses_the_online_models_ema_itself():
    """--perceptual-source ema: the loss reads the live EMA module, which the step updates in
    place, not a copy frozen at the start."""
    cfg, model_cfg = config.resolve(
        "tiny", {"objective": "self_perceptual", "init": "unused", "perceptual_source": "ema"}, {}
    )
    ema = UNet(model_cfg)
    plan = plan_run(cfg, model_cfg, world_size=1, device_type="cpu", read_sources=False)
    loss_fn = build_perceptual_loss(plan, ema, torch.device("cpu"))
    assert loss_fn.perceptual is ema and loss_fn.features.network is ema
    assert not any(p.requires_grad for p in ema.parameters())


def test_perceptual_checkpoint_of_another_shape(stage1, tmp_path, capsys):
    other = tmp_path / "other"
    assert (
        train_cli.main(
            ["--preset", "tiny", "--steps", "1", "--base-channels", "8", "--out", str(other)]
        )
        == 0
    )
    capsys.readouterr()
    _fails(
        [
            "--preset",
            "tiny",
            "--objective",
            "self_perceptual",
            "--init",
            str(stage1),
            "--perceptual-checkpoint",
            str(other),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
        "another shape",
        "base_channels",
    )
    assert not (tmp_path / "o").exists()


def test_unknown_perceptual_layer_lists_the_valid_ones(stage1, tmp_path, capsys):
    _fails(
        [
            "--preset",
            "tiny",
            "--objective",
            "self_perceptual",
            "--init",
            str(stage1),
            "--perceptual-layers",
            "mid_block",
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
        "mid_block",
        "down0, down1, mid, up0, up1",
    )
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# Use from another trainer: the README's example, run as written


def _readme_example(index: int = 0) -> str:
    """The `index`-th python block of the README's "Use from another trainer" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Use from another trainer", 1)[1].split("\n## ", 1)[0]
    return section.split("```python")[1 + index].split("```", 1)[0]


def _check_sd_zero_snr_schedule(scheduler) -> None:
    """The paper's schedule: Stable Diffusion's scaled-linear betas at zero terminal SNR, v."""
    expected = NoiseSchedule().alphas_cumprod.double()
    assert scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), expected, rtol=0, atol=1e-6)


def test_readme_example_with_a_diffusers_unet():
    pytest.importorskip("diffusers")
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)
    loss, unet, perceptual, before = (
        namespace["loss"],
        namespace["unet"],
        namespace["perceptual"],
        namespace["before"],
    )
    assert torch.isfinite(loss) and loss.item() > 0
    _check_sd_zero_snr_schedule(namespace["scheduler"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
    # The frozen network stops after mid_block: its up blocks and output conv never run.
    ran = []
    for module in (*perceptual.up_blocks, perceptual.conv_out):
        module.register_forward_hook(lambda *args: ran.append(1))
    loss_fn, prediction = namespace["loss_fn"], namespace["prediction"]
    latents, noise, t, text = (namespace[k] for k in ("latents", "noise", "t", "text"))
    again = loss_fn(prediction, latents, noise, t, cond={"encoder_hidden_states": text})
    assert not ran and torch.isfinite(again)
    assert all(p.grad is None for p in perceptual.parameters())
    assert all(torch.equal(v, before[k]) for k, v in perceptual.state_dict().items())


def test_readme_schedule_from_a_pipeline_folder(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    block = _readme_example(1)
    folder = re.search(r'sd_folder = "([^"]+)"', block).group(1)
    (tmp_path / folder / "scheduler").mkdir(parents=True)
    config_file = tmp_path / folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(SD21_SCHEDULER_CONFIG))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    _check_sd_zero_snr_schedule(namespace["scheduler"])


def test_hooked_extractor_stops_a_diffusers_unet_after_the_mid_block():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    calls = []
    unet.up_blocks[0].register_forward_hook(lambda *args: calls.append("up"))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    features = FeatureExtractor(unet, ["mid_block"])(x, t, {})
    assert not calls and features["mid_block"].shape == (2, 16, 4, 4)
    full = {}
    unet.mid_block.register_forward_hook(lambda m, i, o: full.setdefault("mid", o))
    unet(x, t)
    assert torch.equal(features["mid_block"], full["mid"])
    with pytest.raises(ValueError, match="valid names: .*mid_block"):
        FeatureExtractor(unet, ["middle"])
