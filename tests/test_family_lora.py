"""LoRA on the diffusers families (fastsp.lora with `--model diffusers`), on tiny random models
of each family (tests/family_tiny.py):

- the default targets are diffusers' own LoRA scripts' (attention; the joint attention's context
  projections for SD3 and Flux), and targets that match nothing are refused naming the layers;
- the perceptual pass with the adapters off equals a frozen copy's bit for bit;
- the float64 fast LoRA step equals the naive reference step (fastsp/reference.py: a plain
  frozen copy as the perceptual network), trains, keeps Adam state for and averages the adapters
  alone, and reads nothing on the host with two passes off and one on;
- the adapter in the diffusers LoRA format: the family pipeline's `load_lora_weights` loads it
  onto the base denoiser and computes the LoRA model; --lora-init reads it back; merging.
"""

import copy
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from family_tiny import TINY, conditions
from safetensors import safe_open
from safetensors.torch import load_file
from test_families import LR, SIDE, B, _batch, _config, _inputs, _process, _wrapped
from test_lora import check_adapters_off_is_the_frozen_copy, check_only_adapters_train
from test_step import FailOnHostSync

from fastsp import lora, reference
from fastsp.config import TrainConfig
from fastsp.errors import CheckpointError, ConfigError
from fastsp.perceptual import SelfPerceptualLoss
from fastsp.step import StepConfig, TrainStep, step_randomness

FAMILIES = tuple(TINY)
# the families whose diffusers pipeline fastsp exports to (PixArt and Sana: the model folder only)
PIPELINE_FAMILIES = ("sd", "sdxl", "sd3", "flux")


def _lora_cfg(rank=4, **options) -> TrainConfig:
    return TrainConfig(lora_rank=rank, **options)


def _stage1_and_lora(family, dtype=torch.float64, rank=4, **options):
    """A random stage-1 module of `family`, its plain frozen copy and the LoRA model on the same
    weights, with random adapters (peft starts B at zero, where on and off agree by design)."""
    stage1 = _wrapped(family, dtype=dtype)
    frozen = reference.frozen_copy(stage1)
    model = lora.add_adapters(copy.deepcopy(stage1), _lora_cfg(rank, **options), stage1.config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return frozen, model.train()


def _adapted(model) -> set[str]:
    """The adapted layers' names inside their block ("attn1.to_q", "attn.add_q_proj", ...)."""
    return {
        re.sub(r".*transformer_blocks\.\d+\.", "", name)
        for name, module in model.denoiser.named_modules()
        if isinstance(module, lora.LoraLayer)
    }


def test_default_targets_are_diffusers_scripts_and_bad_targets_name_the_layers():
    joint = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"}
    joint |= {"attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"}
    for family in FAMILIES:
        lora.check_options(_lora_cfg(), _config(family))  # on the meta device
        _, model = _stage1_and_lora(family, torch.float32)
        if family in ("sd", "sdxl", "pixart", "sana"):  # self- and cross-attention of each block
            projections = ("to_q", "to_k", "to_v") + (() if family == "sana" else ("to_out.0",))
            assert _adapted(model) == {f"attn{i}.{p}" for i in (1, 2) for p in projections}
        else:  # both streams of the joint attention; Flux's single blocks have no to_out
            assert _adapted(model) == joint, family
        assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
        if family not in PIPELINE_FAMILIES:  # no pipeline format to write the adapter alone in
            with pytest.raises(ConfigError, match=r"^a LoRA adapter of a .*--merge --model-only"):
                lora.save_diffusers_lora(model, _lora_cfg(), Path("/nonexistent"))
    with pytest.raises(
        ConfigError,
        match=r"--lora-targets to_qkv: no layer of the flux FluxTransformer2DModel.*"
        r"attn\.add_q_proj.*proj_mlp",
    ):
        lora.check_options(_lora_cfg(lora_targets="to_q,to_qkv"), _config("flux"))
    lora.check_options(_lora_cfg(lora_targets="proj_mlp,ff.net.2"), _config("flux"))


@pytest.mark.parametrize(
    "family, layers", [("sdxl", ["mid"]), ("flux", ["mid", "transformer_blocks.0"])]
)
def test_adapters_off_features_equal_a_frozen_copy_bit_for_bit(family, layers):
    frozen, model = _stage1_and_lora(family, torch.float32)
    check_adapters_off_is_the_frozen_copy(frozen, model, layers, *_inputs(family, torch.float32))


def _lora_step(family, model) -> TrainStep:
    process = _process(family)
    loss = SelfPerceptualLoss(model, process, perceptual_context=lambda: lora.adapters_off(model))
    config = StepConfig(
        seed=3,
        global_batch=B,
        shape=(4, SIDE, SIDE),
        context_shape=tuple(conditions(family, 1)["context"].shape[1:]),
        pooled_dim=TINY[family]["pooled"],
        time_ids=family == "sdxl",
        prediction_type=process.prediction_type,
    )
    trained = [p for p in model.parameters() if p.requires_grad]
    return TrainStep(
        config,
        model=model,
        online=model,
        ema=lora.ema_copy(model),
        optimizer=torch.optim.AdamW(trained, lr=LR, fused=True),
        schedule=process,
        perceptual_loss=loss,
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize("family", [pytest.param("sdxl", marks=pytest.mark.slow), "flux"])
def test_fast_lora_step_equals_the_reference_step_and_reads_nothing_on_the_host(family):
    # The fast step's perceptual pass is the online model with its adapters off; the
    # reference's a plain frozen copy of the stage-1 module (full forwards and a hook).
    frozen, model = _stage1_and_lora(family)
    ref_model = copy.deepcopy(model)
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    layer = next(m for m in model.modules() if isinstance(m, lora.LoraLayer))
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(module.disable_adapters))
    batch = _batch(family)
    step = _lora_step(family, model)
    step.load(batch, 5, LR, 0.1)
    with FailOnHostSync():
        step.compute(zero_grad=False)
    assert seen == [False, True, True]  # the online pass on, both perceptual passes off

    process = _process(family)
    noise, t, _, t_prime = step_randomness(
        3, 5, B, (4, SIDE, SIDE), process, 0.0, "cpu", step.perceptual_loss, torch.float64
    )
    cond = {k: v for k, v in batch.items() if k != "x"}
    args = (batch["x"], noise, t, t_prime)
    if family == "flux":
        ref_loss = reference.reference_flow_self_perceptual_loss(ref_model, frozen, *args, **cond)
    else:
        alphas = process.alphas_cumprod.double()
        ref_loss = reference.reference_self_perceptual_loss(
            ref_model, frozen, *args, alphas, **cond
        )
    ref_loss.backward()
    assert step.loss_sum.item() == pytest.approx(ref_loss.item(), rel=1e-10)
    for p, q in check_only_adapters_train(step, model, ref_model, base_before, rel=1e-10):
        assert not torch.equal(p, q)  # the update moved the adapter


@pytest.mark.parametrize("family", [pytest.param("sdxl", marks=pytest.mark.slow), "flux"])
def test_merged_weights_compute_the_lora_model(family):
    _, model = _stage1_and_lora(family)
    model.eval()
    plain = lora.merged(model, model.config)
    assert not lora.has_adapters(plain)
    x, t, cond = _inputs(family)
    torch.testing.assert_close(plain(x, t, **cond), model(x, t, **cond))


# ---- in and out: the family pipeline's own LoRA loader ------------------------------------------
def _pipeline_with(family, denoiser):
    """The family's pipeline class around `denoiser` alone (no encoders: load_lora_weights
    reads the denoiser's slot)."""
    import diffusers

    from fastsp.family_pipelines import FAMILIES

    spec = next(f for f in FAMILIES.values() if f.name == family)
    cls = getattr(diffusers, spec.pipeline_class)
    parts = {name: None for name in cls._get_signature_keys(cls)[0]}
    parts.update({spec.denoiser: denoiser, "scheduler": diffusers.DDIMScheduler()})
    return cls(**parts)


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(f, marks=pytest.mark.slow) if f in ("sd", "sdxl") else f
        for f in PIPELINE_FAMILIES
    ],
)
def test_the_exported_adapter_loads_into_the_family_pipeline(family, tmp_path):
    _, ours = _stage1_and_lora(family, rank=2, lora_alpha=3.0)
    ours.eval()
    cfg = _lora_cfg(rank=2, lora_alpha=3.0)
    written = lora.save_diffusers_lora(ours, cfg, tmp_path / "adapter")
    assert written.name == "pytorch_lora_weights.safetensors"
    prefix = "unet." if family in ("sd", "sdxl") else "transformer."
    keys = load_file(written)
    assert keys and all(k.startswith(prefix) and ".lora_" in k for k in keys)

    base = _wrapped(family)  # the same base weights as `ours` (seeded)
    pipe = _pipeline_with(family, base.denoiser)
    pipe.load_lora_weights(tmp_path / "adapter")
    theirs = copy.copy(base)  # their denoiser (with diffusers' adapters) behind our call
    x, t, cond = _inputs(family)
    with torch.no_grad():
        expected = ours(x, t, **cond)
        got = theirs(x, t, **cond)
        with lora.adapters_off(ours):
            off = ours(x, t, **cond)
    # diffusers embeds the timestep in float32 (tests/test_diffusers_unet.py: the same bound)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-10
    assert ((off - expected).norm() / expected.norm()).item() > 1e-4  # the adapters matter

    # --lora-init reads it back into a fresh LoRA model: the same adapters
    fresh = lora.add_adapters(_wrapped(family), cfg, ours.config)
    lora.load_adapter(fresh, tmp_path / "adapter")
    for key, tensor in lora.adapter_state(ours).items():
        assert torch.equal(lora.adapter_state(fresh)[key], tensor), key
    other = lora.add_adapters(_wrapped(family), _lora_cfg(rank=3), ours.config)
    with pytest.raises(CheckpointError, match="another rank"):
        lora.load_adapter(other, tmp_path / "adapter")
    with safe_open(str(written), "pt") as f:  # the LoraConfig diffusers rebuilds it from
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (metadata[prefix + "r"], metadata[prefix + "lora_alpha"]) == (2, 3.0)


# ---- the LoRA recipe of docs/family_recipes.md, end to end ---------------------------------------
@pytest.mark.slow
def test_the_lora_recipe_end_to_end(build_once, tmp_path):
    # prepare -> stage 2 with --lora-rank -> sample -> export the adapter and the merged pipeline,
    # as written in the document, on the tiny Flux pipeline (tests/test_family_recipes.py's way)
    import diffusers
    import prefork
    from pipeline_tiny import save_pipeline
    from test_family_recipes import _option, _write_images, recipe_commands

    from fastsp.checkpoint import load_model
    from fastsp.families import DiffusersDenoiser

    pipeline = build_once("pipeline_flux", lambda folder: save_pipeline("flux", folder))
    (tmp_path / "FLUX").symlink_to(pipeline, target_is_directory=True)
    _write_images(tmp_path / "IMAGES")
    commands = recipe_commands("flux", "## LoRA on a family")
    for command in commands:
        done = prefork.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
        assert done.returncode == 0, f"{command[1:]}\n{done.stderr[-3000:]}"
    train, sample, adapter, merged = commands[1:]
    run = load_model(tmp_path / _option(train, "--out"))
    assert run.train_config.lora_rank == 16 and lora.has_adapters(run.model)
    assert "adapters off" in (tmp_path / _option(train, "--out") / "backends.json").read_text()
    assert (tmp_path / _option(sample, "--out")).is_file()

    # The adapter loads into the base pipeline through diffusers' own loader: the run's EMA
    # adapters, tensor for tensor, and the run's outputs (float32)
    folder = tmp_path / _option(adapter, "--to-diffusers")
    assert sorted(p.name for p in folder.iterdir()) == [lora.LORA_WEIGHTS_NAME]
    pipe = diffusers.FluxPipeline.from_pretrained(tmp_path / "FLUX")
    pipe.load_lora_weights(folder, adapter_name="run")
    theirs = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    ours = lora.adapter_state(run.model)
    assert len(theirs) == len(ours)
    for key, tensor in ours.items():  # diffusers names the adapter: lora_A.run.weight
        assert torch.equal(theirs[key.replace(".weight", ".run.weight")], tensor), key
    x, t, _ = _inputs("flux", torch.float32)
    cond = {
        "context": torch.randn(B, 6, run.model.config.context_width),
        "pooled": torch.randn(B, run.model.config.pooled_dim),
    }
    with torch.no_grad():
        expected = run.model(x, t, **cond)
        loaded = DiffusersDenoiser(run.model.config, pipe.transformer)(x, t, **cond)
        merged_model = diffusers.FluxPipeline.from_pretrained(
            tmp_path / _option(merged, "--to-diffusers")
        ).transformer
        assert not lora.has_adapters(merged_model)
        merged_out = DiffusersDenoiser(run.model.config, merged_model)(x, t, **cond)
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_out, expected, rtol=1e-5, atol=1e-5)

    # the adapter is written alone: a pipeline folder for it is refused, nothing written
    from fastsp import export

    out = tmp_path / "refused"
    argv = ["--checkpoint", str(tmp_path / _option(train, "--out")), "--to-diffusers", str(out)]
    assert export.main([*argv, "--pipeline", str(tmp_path / "FLUX")]) == 2
    assert not out.exists()


@pytest.mark.slow
def test_a_family_run_starts_from_a_diffusers_lora_file(tmp_path):
    # --lora-init FILE: the trainer's LoRA model starts from the file's adapters (a step at a
    # vanishing learning rate leaves them there); another rank is refused, exit 2
    import prefork
    from family_tiny import write_pipeline_folder, write_shards
    from test_families import ROOT, _run_options

    from fastsp.checkpoint import load_model

    pipeline = write_pipeline_folder("flux", tmp_path / "pipeline")
    data = write_shards("flux", tmp_path / "data")
    _, source = _stage1_and_lora("flux", torch.float32, rank=2)
    written = lora.save_diffusers_lora(source, _lora_cfg(rank=2), tmp_path / "adapter")

    def train(out, rank):
        options = [*_run_options("flux", data, tmp_path / out), "--init", pipeline]
        options += ["--objective", "self_perceptual", "--lora-rank", rank, "--lora-init", written]
        argv = [sys.executable, str(ROOT / "fastsp" / "train.py"), *map(str, options)]
        return prefork.run(argv + ["--steps", "1", "--lr", "1e-12"], cwd=tmp_path)

    done = train("run", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    for weights in ("model", "ema"):
        started = lora.adapter_state(load_model(tmp_path / "run", weights).model)
        for key, tensor in lora.adapter_state(source).items():
            torch.testing.assert_close(started[key], tensor, rtol=0, atol=1e-9)
    done = train("other", 4)
    assert done.returncode == 2 and "another rank" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "other" / "checkpoints").exists()
