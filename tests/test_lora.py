"""LoRA through peft (fastsp.lora): the perceptual pass with the adapters off against a frozen
copy, the fast LoRA step against the naive reference step, capture safety, the trainer's
options and refusals, and the diffusers LoRA format against diffusers' own loader.
"""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sd_tiny import CONTEXT_DIM, TINY_UNET_CONFIG
from test_step import LR, RES, B, FailOnHostSync, _batch

from fastsp import lora, reference
from fastsp.config import TrainConfig
from fastsp.diffusion import NoiseSchedule
from fastsp.errors import CheckpointError, ConfigError
from fastsp.model_config import DIT_PRESETS, UNET_PRESETS
from fastsp.models import build_model
from fastsp.perceptual import FeatureExtractor, SelfPerceptualLoss
from fastsp.step import StepConfig, TrainStep, step_randomness

_KINDS = {
    "unet": dataclasses.replace(UNET_PRESETS["tiny"], num_classes=10),
    "dit": dataclasses.replace(DIT_PRESETS["dit_tiny"], num_classes=10, input_size=RES),
}


def _lora_cfg(rank=4, **options) -> TrainConfig:
    return TrainConfig(lora_rank=rank, **options)


def _randomise(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Every weight random, the adapters' B included (peft starts B at zero, where adapters on
    and off would agree by construction)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _stage1_and_lora(kind="unet", dtype=torch.float64, rank=4):
    """A random stage-1 network, its plain frozen copy (reference.frozen_copy) and the LoRA
    model on the same weights, with random adapters."""
    model_cfg = _KINDS[kind]
    torch.manual_seed(0)
    stage1 = build_model(model_cfg).to(dtype)
    _randomise(stage1)
    frozen = reference.frozen_copy(stage1)
    model = lora.add_adapters(copy.deepcopy(stage1), _lora_cfg(rank), model_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return frozen, model.train()


@pytest.mark.parametrize("kind, layers", [("unet", ["mid", "down1"]), ("dit", ["block1", "mid"])])
def test_adapters_off_features_equal_a_frozen_copy_bit_for_bit(kind, layers):
    frozen, model = _stage1_and_lora(kind, torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, RES, RES, generator=g)
    t, cond = torch.tensor([3, 500, 999]), {"labels": torch.tensor([0, 4, 9])}
    check_adapters_off_is_the_frozen_copy(frozen, model, layers, x, t, cond)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def check_adapters_off_is_the_frozen_copy(frozen, model, layers, x, t, cond):
    """The tapped features of `model` with its adapters off equal `frozen`'s bit for bit (and
    with them on, differ); the switch leaves the model training."""
    off = FeatureExtractor(model, layers, lambda: lora.adapters_off(model))(x, t, cond)
    ours = FeatureExtractor(frozen, layers)(x, t, cond)
    on = FeatureExtractor(model, layers)(x, t, cond)
    for name in layers:
        assert torch.equal(off[name], ours[name]), name
        assert not torch.allclose(on[name], ours[name]), name  # the adapters do change them
    assert model.training  # the switch restores the mode and every adapter


def _lora_step(model, objective="self_perceptual", **options):
    schedule = NoiseSchedule()
    perceptual_loss = None
    if objective == "self_perceptual":
        perceptual_loss = SelfPerceptualLoss(
            model,
            schedule.alphas_cumprod,
            batched_branches=options.pop("batched_branches", False),
            perceptual_context=lambda: lora.adapters_off(model),
        )
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LR, fused=True)
    config = StepConfig(seed=3, global_batch=B, shape=(1, RES, RES), num_classes=10, **options)
    return TrainStep(
        config,
        model=model,
        online=model,
        ema=lora.ema_copy(model),
        optimizer=optimizer,
        schedule=schedule,
        perceptual_loss=perceptual_loss,
        device=torch.device("cpu"),
    )


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mse", "self_perceptual"])
def test_fast_lora_step_equals_the_reference_step_in_float64(objective):
    # The fast step's perceptual pass is the online model with its adapters off; the reference's
    # is a plain frozen copy of the stage-1 network (full forwards, a hook, foreach AdamW).
    frozen, model = _stage1_and_lora()
    ref_model = copy.deepcopy(model)
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = _batch(torch.float64)
    step = _lora_step(model, objective)
    step.load(batch, 5, LR, 0.1)
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
    alphas = schedule.alphas_cumprod.to(torch.float64)
    ref_optimizer = torch.optim.AdamW([p for p in ref_model.parameters() if p.requires_grad], lr=LR)
    args = (batch["x"], noise, t)
    if objective == "mse":
        ref_loss = reference.reference_mse_step(
            ref_model, ref_optimizer, *args, alphas, labels=batch["label"]
        )
    else:
        ref_loss = reference.reference_self_perceptual_step(
            ref_model, frozen, ref_optimizer, *args, t_prime, alphas, labels=batch["label"]
        )
    assert step.loss_sum.item() == pytest.approx(ref_loss, rel=1e-12)
    for p, q in check_only_adapters_train(step, model, ref_model, base_before, rel=1e-12):
        assert torch.allclose(p, q, rtol=0, atol=2 * LR * 2**-24)


def check_only_adapters_train(step, model, ref_model, base_before, rel):
    """After one fast step of a LoRA `model` and the reference step of `ref_model`: the base got
    no gradient and never moved, each adapter's gradient equals the reference's within `rel` of
    its largest, and only the adapters have Adam state and an EMA (whose base tensors are the
    model's own). Returns the (adapter, reference adapter) pairs."""
    adapters = []
    pairs = zip(model.named_parameters(), ref_model.parameters(), strict=True)
    for (name, p), q in pairs:
        if not p.requires_grad:  # the base: no gradient, never moved
            assert p.grad is None and torch.equal(p, base_before[name]), name
            continue
        scale = q.grad.abs().max().item() + 1e-30
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=rel * scale), name
        adapters.append((p, q))
    assert set(map(id, step.optimizer.state)) == {id(p) for p, _ in adapters}
    assert len(step.ema_params) == len(adapters)
    for name, p in step.ema.named_parameters():
        assert (p is model.get_parameter(name)) == ("lora_" not in name), name
    return adapters


@pytest.mark.slow
def test_the_lora_step_is_capture_safe_two_passes_off_one_on():
    # The whole step (the online pass with adapters on, the real and predicted perceptual
    # passes with them off, backward, fused AdamW, EMA) reads no tensor on the host.
    _, model = _stage1_and_lora(dtype=torch.float32)
    layer = next(m for m in model.modules() if isinstance(m, lora.LoraLayer))
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(module.disable_adapters))
    step = _lora_step(model, grad_clip=1.0, label_dropout=0.1)
    for i in range(2):
        step.load(_batch(seed=i), i, LR, 0.1)
        with FailOnHostSync():
            step.compute()
    assert step.good_steps.item() == 2
    assert seen == [False, True, True] * 2


def test_the_ema_of_a_lora_model_shares_the_base_and_averages_the_adapters():
    _, model = _stage1_and_lora(dtype=torch.float32)
    ema = lora.ema_copy(model)
    for name, p in model.named_parameters():
        q = ema.get_parameter(name)
        assert (q is p) == (not p.requires_grad), name
    empty = copy.deepcopy(model).to_empty(device="cpu")
    ema_empty = lora.ema_copy(empty).to_empty(device="cpu")  # fresh storage for every tensor
    lora.tie_frozen(ema_empty, empty)
    for name, p in empty.named_parameters():
        assert (ema_empty.get_parameter(name) is p) == (not p.requires_grad), name


def test_merged_weights_compute_the_lora_model():
    for kind in _KINDS:
        _, model = _stage1_and_lora(kind)
        model.eval()
        plain = lora.merged(model, _KINDS[kind])
        assert not lora.has_adapters(plain)
        x = torch.randn(2, 1, RES, RES, dtype=torch.float64)
        t, labels = torch.tensor([10, 700]), torch.tensor([1, 2])
        torch.testing.assert_close(plain(x, t, labels=labels), model(x, t, labels=labels))


def test_bad_lora_options_are_refused_naming_the_fix():
    tiny = _KINDS["unet"]
    with pytest.raises(
        ConfigError, match="--lora-alpha, --lora-dropout: LoRA options.*--lora-rank"
    ):
        lora.check_options(TrainConfig(lora_alpha=8.0, lora_dropout=0.1), tiny)
    with pytest.raises(ConfigError, match="--lora-targets to_v: no layer.*attn1.to_qkv"):
        lora.check_options(_lora_cfg(lora_targets="to_qkv,to_v"), tiny)
    lora.check_options(_lora_cfg(lora_targets="to_qkv,emb_proj"), tiny)
    lora.check_options(_lora_cfg(), _KINDS["dit"])  # the DiT's defaults match its layers


# ---- the trainer ------------------------------------------------------------------------------


def _train(argv):
    from fastsp import config_cli
    from fastsp.training.loop import train

    cfg, model_cfg = config_cli.parse_args(argv)
    return train(cfg, model_cfg)


_COMMON = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    return _train([*_COMMON, "--steps", "3", "--out", str(tmp_path_factory.mktemp("s1") / "s1")])


@pytest.mark.slow
def test_trainer_lora_fast_and_reference_steps_train_the_same_adapters(tmp_path, stage1):
    # End to end: the fast LoRA run (adapters-off perceptual pass) and the reference run (a
    # plain frozen copy of --init) train the same adapters; the base stays --init's weights.
    weights, lines = {}, {}
    for kind in ("fast", "reference"):
        out = tmp_path / kind
        checkpoint = _train(
            [*_COMMON, "--steps", "4", "--init", str(stage1), "--objective", "self_perceptual"]
            + ["--lora-rank", "4", "--train-step", kind, "--out", str(out)]
        )
        weights[kind] = load_file(checkpoint / "model.safetensors")
        lines[kind] = (out / "backends.json").read_text()
    assert "adapters off" in lines["fast"] and "adapters off" not in lines["reference"]
    init = load_file(Path(stage1) / "ema.safetensors")
    for name, fast in weights["fast"].items():
        assert torch.allclose(fast, weights["reference"][name], rtol=1e-4, atol=1e-5), name
        if "lora_" not in name:
            assert torch.equal(fast, init[name.replace(".base_layer.", ".")]), name


@pytest.mark.slow
def test_resuming_a_lora_run_as_a_full_one_is_refused(tmp_path, stage1):
    out = tmp_path / "run"
    argv = [*_COMMON, "--init", str(stage1), "--objective", "self_perceptual", "--out", str(out)]
    _train([*argv, "--steps", "2", "--lora-rank", "2"])
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(CheckpointError, match="--lora-rank 0 \\(checkpoint: 2\\)"):
        _train([*argv, "--steps", "4", "--resume"])
    assert sorted(p.name for p in out.rglob("*")) == before
    resumed = _train([*argv, "--steps", "3", "--resume", "--lora-rank", "2"])
    assert resumed.name == "step_00000003"


# ---- in and out: the diffusers LoRA format ----------------------------------------------------


def _tiny_sd_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    _randomise(unet, 0.1, seed)
    return unet.eval()


def _relative_error(got, expected) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def test_the_exported_adapter_loads_into_a_diffusers_pipeline(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from fastsp.diffusers_unet import load_unet

    unet = _tiny_sd_unet()
    unet.save_pretrained(tmp_path / "unet")
    ours = load_unet(tmp_path / "unet").to(torch.float64)
    cfg = _lora_cfg(rank=2, lora_alpha=3.0)
    ours = lora.add_adapters(ours, cfg, ours.config).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    written = lora.save_diffusers_lora(ours, cfg, tmp_path / "adapter")
    assert written.name == "pytorch_lora_weights.safetensors"

    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet.double(),  # the adapters load in the UNet's dtype
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(tmp_path / "adapter")
    theirs = pipe.unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([17, 803])
    context = torch.randn(2, 5, CONTEXT_DIM, generator=g, dtype=torch.float64)
    with torch.no_grad():
        expected = ours(x, t, context=context)
        got = theirs(x, t, encoder_hidden_states=context).sample
        theirs.disable_lora()  # and their base alone is ours with the adapters off
        their_base = theirs(x, t, encoder_hidden_states=context).sample
        with lora.adapters_off(ours):
            base = ours(x, t, context=context)
    # diffusers embeds the timestep in fp32 (tests/test_diffusers_unet.py: the same bound)
    assert _relative_error(got, expected) < 1e-10
    assert _relative_error(their_base, base) < 1e-10
    assert _relative_error(base, expected) > 1e-3  # the adapters do change the output

    # --lora-init reads it back into a fresh LoRA model: the same adapters
    fresh = lora.add_adapters(load_unet(tmp_path / "unet").to(torch.float64), cfg, ours.config)
    lora.load_adapter(fresh, tmp_path / "adapter")
    for key, tensor in lora.adapter_state(ours).items():
        assert torch.equal(lora.adapter_state(fresh)[key], tensor), key
    other = lora.add_adapters(load_unet(tmp_path / "unet"), _lora_cfg(rank=3), ours.config)
    with pytest.raises(CheckpointError, match="another rank"):
        lora.load_adapter(other, tmp_path / "adapter")


@pytest.mark.slow
def test_export_writes_the_adapter_or_with_merge_the_merged_network(tmp_path, stage1):
    from fastsp import export
    from fastsp.checkpoint import load_model
    from fastsp.dit_diffusers import load_dit

    unet_run = tmp_path / "unet"
    _train(
        [*_COMMON, "--init", str(stage1), "--objective", "self_perceptual", "--out", str(unet_run)]
        + ["--steps", "2", "--lora-rank", "2"]
    )
    assert export.main(["--checkpoint", str(unet_run), "--to-diffusers", str(tmp_path / "a")]) == 0
    written = load_file(tmp_path / "a" / lora.LORA_WEIGHTS_NAME)
    assert all(k.startswith("unet.") and ".lora_" in k for k in written)
    assert any(".attn1.to_v.lora_B" in k for k in written)  # the fused to_qkv split in three
    # --lora-init of the run folder: its latest checkpoint's EMA adapters
    trained = load_model(unet_run).model
    fresh = lora.add_adapters(build_model(_KINDS["unet"]), _lora_cfg(rank=2), _KINDS["unet"])
    lora.load_adapter(fresh, unet_run)
    for key, tensor in lora.adapter_state(trained).items():
        assert torch.equal(lora.adapter_state(fresh)[key], tensor), key
    with pytest.raises(CheckpointError, match="full fine-tune"):
        lora.load_adapter(fresh, Path(stage1))
    full = ["--checkpoint", str(stage1), "--to-diffusers", str(tmp_path / "f"), "--merge"]
    assert export.main(full) == 2 and not (tmp_path / "f").exists()

    # A DiT: diffusers' DiTPipeline loads no LoRA, so the adapter is refused; --merge writes the
    # network with the adapters merged, which computes what the LoRA model computes.
    dit = ["--preset", "dit_tiny", "--device", "cpu", "--precision", "fp32", "--steps", "2"]
    dit_stage1 = _train([*dit, "--out", str(tmp_path / "dit1")])
    dit_run = tmp_path / "dit2"
    _train(
        [*dit, "--init", str(dit_stage1), "--objective", "self_perceptual", "--lora-rank", "2"]
        + ["--out", str(dit_run)]
    )
    adapter = ["--checkpoint", str(dit_run), "--to-diffusers", str(tmp_path / "d")]
    assert export.main(adapter) == 2 and not (tmp_path / "d").exists()
    assert export.main([*adapter, "--merge"]) == 0
    lora_model = load_model(dit_run).model.to(torch.float64)
    merged = load_dit(tmp_path / "d").to(torch.float64)
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([5, 600])
    labels = torch.tensor([1, 7])
    expected = lora_model(x, t, labels=labels)
    torch.testing.assert_close(merged(x, t, labels=labels), expected)
