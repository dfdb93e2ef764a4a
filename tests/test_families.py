"""Diffusers denoisers trained in place (fastsp.families, `--model diffusers`), on tiny random
models of each family built here (tests/family_tiny.py):

- the wrapper calls each module as diffusers' pipelines do (Flux's packing and ids through
  FluxPipeline's own helpers; PixArt-alpha's size conditions, Sana's timestep scale, and the
  learned variance half dropped);
- feature taps: "mid" and module paths per family; the perceptual pass runs no block after the
  deepest tap (a module-call counter), and its features equal, in float64, the same module's
  outputs in an uncut forward;
- the fast step equals the naive reference step in float64 for each family, MSE and the
  self-perceptual loss, and model guidance (all but SD: the null condition is the empty
  prompt's context and pooled embedding, SDXL's time ids kept), and reads nothing on the host;
  CFG dropout gives dropped rows the empty prompt's context AND pooled embedding, and keeps the
  time ids;
- the trainer end to end on hand-written shards (train, checkpoint with diffusers' key names,
  stage 2 from it), DDP over two processes equal to one, and the refusals (exit 2, nothing
  written).
"""

import copy
import json
import os
import sys
from pathlib import Path

import prefork
import pytest
import torch
from family_tiny import (
    PROCESS,
    TINY,
    conditions,
    tiny_denoiser,
    write_pipeline_folder,
    write_shards,
)
from test_step import FailOnHostSync

from fastsp import reference
from fastsp.diffusion import NoiseSchedule
from fastsp.errors import ConfigError
from fastsp.families import DiffusersDenoiser
from fastsp.family_config import DiffusersConfig, check_data, family_of
from fastsp.flow import FlowProcess
from fastsp.model_guidance import ModelGuidance
from fastsp.perceptual import FeatureExtractor, SelfPerceptualLoss
from fastsp.step import StepConfig, TrainStep, step_randomness

FAMILIES = tuple(TINY)
B, SIDE, LR = 4, 8, 1e-3
ROOT = Path(__file__).resolve().parents[1]


def _config(family: str) -> DiffusersConfig:
    spec = TINY[family]
    diffusers = json.loads(json.dumps(tiny_denoiser(family).config))  # tuples -> lists
    diffusers = {k: v for k, v in diffusers.items() if not k.startswith("_")}
    return DiffusersConfig(
        family=family_of(spec["cls"], diffusers),
        class_name=spec["cls"],
        diffusers=diffusers,
        in_channels=4,
        context_dim=conditions(family, 1)["context"].shape[-1],
        guidance=3.5,
    )


def _wrapped(family: str, seed: int = 0, dtype=torch.float64) -> DiffusersDenoiser:
    """The tiny module of `family` with every weight random (diffusers zero-initialises some)."""
    model = DiffusersDenoiser(_config(family), tiny_denoiser(family, seed)).to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=dtype))
    return model


def _inputs(family: str, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, SIDE, SIDE, generator=g, dtype=dtype)
    if PROCESS[family] == "flow":
        t = torch.rand(B, generator=g, dtype=dtype) * 1000
    else:
        t = torch.randint(0, 1000, (B,), generator=g)
    cond = {k: v.to(dtype) for k, v in conditions(family, B, seed).items()}
    return x, t, cond


def _process(family: str):
    return FlowProcess() if PROCESS[family] == "flow" else NoiseSchedule()


# ---- the call ----------------------------------------------------------------------------------
@pytest.mark.slow  # imports diffusers' pipelines (transformers)
def test_flux_is_called_as_flux_pipeline_packs_and_ids_it():
    from diffusers import FluxPipeline

    model = _wrapped("flux")
    x, t, cond = _inputs("flux")
    packed = FluxPipeline._pack_latents(x, B, 4, SIDE, SIDE)
    img_ids = FluxPipeline._prepare_latent_image_ids(B, SIDE // 2, SIDE // 2, x.device, x.dtype)
    out = model.denoiser(
        hidden_states=packed,
        timestep=t / 1000,  # FluxPipeline: the scheduler's sigma * 1000, divided by 1000
        guidance=torch.full((B,), 3.5, dtype=x.dtype),
        pooled_projections=cond["pooled"],
        encoder_hidden_states=cond["context"],
        txt_ids=torch.zeros(cond["context"].shape[1], 3, dtype=x.dtype),
        img_ids=img_ids,
        return_dict=False,
    )[0]
    expected = FluxPipeline._unpack_latents(out, SIDE * 8, SIDE * 8, 8)
    assert torch.equal(model(x, t, **cond), expected)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "pixart", "sana"])
def test_the_unets_and_transformers_are_called_with_their_pipelines_timesteps(family):
    model = _wrapped(family)
    x, t, cond = _inputs(family)
    kwargs = {"encoder_hidden_states": cond["context"], "return_dict": False}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
    if family == "sd3":  # StableDiffusion3Pipeline: timestep = sigma * 1000
        kwargs["pooled_projections"] = cond["pooled"]
        expected = model.denoiser(hidden_states=x, timestep=t, **kwargs)[0]
    elif family == "pixart":  # PixArtAlphaPipeline: the image size in pixels, the eps half
        height = width = SIDE * 8
        kwargs["added_cond_kwargs"] = {
            "resolution": torch.tensor([height, width]).repeat(B, 1).to(x.dtype),
            "aspect_ratio": torch.tensor([float(height / width)]).repeat(B, 1).to(x.dtype),
        }
        expected = model.denoiser(x, timestep=t, **kwargs)[0].chunk(2, dim=1)[0]
    elif family == "sana":  # SanaPipeline: timestep = sigma * 1000 * timestep_scale
        scale = model.denoiser.config.timestep_scale
        expected = model.denoiser(x, timestep=t * scale, **kwargs)[0]
    else:
        expected = model.denoiser(x, t, **kwargs)[0]
    assert torch.equal(model(x, t, **cond), expected)


def test_checkpoint_keys_are_diffusers_own():
    model = _wrapped("sd3")
    state = model.state_dict()
    assert set(state) == set(model.denoiser.state_dict())
    fresh = DiffusersDenoiser(model.config).to(torch.float64)
    fresh.load_state_dict(state)
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True)
    )


# ---- feature taps ------------------------------------------------------------------------------
# The blocks of each family in the order they run, and its "mid" tap.
_BLOCKS = {
    "sd": ("down_blocks", "mid_block", "up_blocks"),
    "sdxl": ("down_blocks", "mid_block", "up_blocks"),
    "sd3": ("transformer_blocks",),
    "flux": ("transformer_blocks", "single_transformer_blocks"),
    "pixart": ("transformer_blocks",),
    "sana": ("transformer_blocks",),
}
_MID = {
    "sd": "mid_block",
    "sdxl": "mid_block",
    "sd3": "transformer_blocks.0",  # 2 blocks: the output of the first
    "flux": "single_transformer_blocks.0",  # 1 double + 3 single: the output of the first 2
    "pixart": "transformer_blocks.0",
    "sana": "transformer_blocks.0",
}


def _blocks(model: DiffusersDenoiser) -> list[str]:
    names = []
    for group in _BLOCKS[model.family]:
        module = model.denoiser.get_submodule(group)
        names += [group] if group == "mid_block" else [f"{group}.{i}" for i in range(len(module))]
    return names


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers", [("mid",), "deepest module path"])
def test_the_perceptual_pass_stops_at_the_deepest_tap_with_the_uncut_features(family, layers):
    model = _wrapped(family).eval()
    blocks = _blocks(model)
    if layers == "deepest module path":  # two blocks, one of them the second block's attention
        second = blocks[1]
        inner = next(
            n
            for n, m in model.denoiser.get_submodule(second).named_modules()
            if n and not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict))
        )
        layers = (blocks[0], f"{second}.{inner}", second)
    deepest = _MID[family] if layers == ("mid",) else layers[-1]
    assert model.mid_name == _MID[family]
    calls = dict.fromkeys(blocks, 0)
    uncut: dict[str, object] = {}
    hooks = [
        model.denoiser.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1)
        )
        for name in blocks
    ]
    paths = [model.mid_name if name == "mid" else name for name in layers]
    hooks += [
        model.denoiser.get_submodule(path).register_forward_hook(
            lambda m, i, o, path=path: uncut.setdefault(path, o)
        )
        for path in paths
    ]
    x, t, cond = _inputs(family)
    features = FeatureExtractor(model, layers)(x, t, cond)
    ran = dict(calls)
    model(x, t, **cond)  # the uncut forward
    for hook in hooks:
        hook.remove()
    cut = blocks.index(deepest if deepest in blocks else deepest.rsplit(".", 1)[0])
    assert all(ran[name] == 1 for name in blocks[: cut + 1]), ran
    assert all(ran[name] == 0 for name in blocks[cut + 1 :]), ran  # nothing after the deepest
    for name, path in zip(layers, paths, strict=True):
        expected = uncut[path]
        if family in ("sd3", "flux") and path in blocks:  # (text tokens, image tokens)
            assert len(expected) == 2
            expected = expected[1]
            assert features[name].shape[1] == (SIDE // 2) ** 2  # image tokens only
        elif isinstance(expected, tuple):
            expected = expected[0]
        assert features[name].dtype == torch.float64
        assert torch.equal(features[name], expected), name


def test_an_unknown_tap_or_a_container_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown perceptual layer.*mid \(transformer_blocks.0\)"):
        FeatureExtractor(_wrapped("sd3"), ["down2"])
    with pytest.raises(ValueError, match=r"\['transformer_blocks'\].*never runs"):
        FeatureExtractor(_wrapped("sd3"), ["transformer_blocks"])  # a ModuleList is not called


# ---- the step ----------------------------------------------------------------------------------
def _step(family, model, perceptual, objective, online=None, ema=None, **options) -> TrainStep:
    process = _process(family)
    loss = SelfPerceptualLoss(perceptual, process) if objective == "self_perceptual" else None
    ema = copy.deepcopy(model).requires_grad_(False) if ema is None else ema
    guidance = None
    if objective == "model_guidance":  # the EMA guides, as the trainer builds it
        guidance = ModelGuidance(ema, process.num_timesteps, **_GUIDANCE)
    context = conditions(family, 1)["context"].shape[1:]
    config = StepConfig(
        seed=3,
        global_batch=B,
        shape=(4, SIDE, SIDE),
        context_shape=tuple(context),
        pooled_dim=TINY[family]["pooled"],
        time_ids=family == "sdxl",
        prediction_type=process.prediction_type,
        **options,
    )
    return TrainStep(
        config,
        model=model,
        online=online or model,
        ema=ema,
        optimizer=torch.optim.AdamW(model.parameters(), lr=LR, fused=True),
        schedule=process,
        perceptual_loss=loss,
        device=torch.device("cpu"),
        model_guidance=guidance,
    )


def _batch(family):
    x, _, cond = _inputs(family, seed=2)
    return {"x": x, **cond}


# Model guidance (fastsp.model_guidance): w and t_max with guided and unguided rows in the batch
_GUIDANCE = {"scale": 0.45, "t_max": 1.0}
_DROPOUT = {"mse": 0.0, "self_perceptual": 0.0, "model_guidance": 0.5}


def _null_condition(family, step, cond, drop):
    """What CFG dropout gives the dropped rows, written out: the empty prompt's context and
    pooled embedding; SDXL's time ids are kept."""
    null = {"context": step.null_context.expand_as(cond["context"])}
    if "pooled" in cond:
        null["pooled"] = step.null_pooled.expand_as(cond["pooled"])
    dropped = {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), null[k], v)
               for k, v in cond.items() if k in null}  # fmt: skip
    return {**cond, **dropped}, {**cond, **null}


@pytest.mark.parametrize(
    "family, objective",
    [
        *[(family, "mse") for family in FAMILIES],
        *[(family, "self_perceptual") for family in FAMILIES if family != "sdxl"],
        pytest.param("sdxl", "self_perceptual", marks=pytest.mark.slow),
        *[(family, "model_guidance") for family in ("sdxl", "sd3", "flux", "pixart", "sana")],
    ],
)
def test_fast_step_equals_the_reference_step_per_family(family, objective):
    model, perceptual = _wrapped(family), _wrapped(family, seed=1).eval().requires_grad_(False)
    ema = _wrapped(family, seed=2).requires_grad_(False)  # a guide that differs from the model
    ref_model, ref_ema = copy.deepcopy(model), copy.deepcopy(ema)
    batch = _batch(family)
    dropout = _DROPOUT[objective]
    step = _step(family, model, perceptual, objective, ema=ema, label_dropout=dropout)
    g = torch.Generator().manual_seed(9)  # the empty prompt's embeddings of prepared shards
    step.null_context.copy_(torch.randn(step.null_context.shape, generator=g))
    if step.null_pooled is not None:
        step.null_pooled.copy_(torch.randn(step.null_pooled.shape, generator=g))
    step.load(batch, 5, LR, 0.1)
    with FailOnHostSync():
        step.compute(zero_grad=False)

    process = _process(family)
    noise, t, drop, t_prime = step_randomness(
        3, 5, B, (4, SIDE, SIDE), process, dropout, "cpu", step.perceptual_loss, torch.float64
    )
    cond = {k: v for k, v in batch.items() if k != "x"}
    args = (batch["x"], noise, t)
    flow = PROCESS[family] == "flow"
    if objective == "model_guidance":
        assert 0 < int(drop.sum()) < B  # guided rows and rows dropout gave the empty prompt
        cond, null_cond = _null_condition(family, step, cond, drop)
        if family == "sdxl":  # the null condition keeps the time ids, row for row
            assert torch.equal(step.null_condition(B, cond)["time_ids"], batch["time_ids"])
        alphas = None if flow else process.alphas_cumprod.double()
        ref_loss = reference.reference_model_guidance_loss(
            ref_model, ref_ema, *args, cond, null_cond, ~drop, **_GUIDANCE,
            alphas_cumprod=alphas, num_timesteps=process.num_timesteps,
            prediction_type=process.prediction_type,
        )  # fmt: skip
    elif objective == "mse" and flow:
        ref_loss = reference.reference_flow_mse_loss(ref_model, *args, **cond)
    elif objective == "mse":
        alphas = process.alphas_cumprod.double()
        ref_loss = reference.reference_mse_loss(ref_model, *args, alphas, **cond)
    elif flow:
        ref_loss = reference.reference_flow_self_perceptual_loss(
            ref_model, perceptual, *args, t_prime, **cond
        )
    else:
        alphas = process.alphas_cumprod.double()
        ref_loss = reference.reference_self_perceptual_loss(
            ref_model, perceptual, *args, t_prime, alphas, **cond
        )
    ref_loss.backward()
    assert step.loss_sum.item() == pytest.approx(ref_loss.item(), rel=1e-10)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        if q.grad is None:  # a module the loss does not reach (none is expected)
            assert p.grad is None or not p.grad.any(), name
            continue
        scale = q.grad.abs().max().item() + 1e-30
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-10 * scale), name


class _Recorder(torch.nn.Module):
    """The online model, recording the conditions each forward receives."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x, t, **cond):
        self.seen.append({k: v.detach().clone() for k, v in cond.items() if v is not None})
        return self.model(x, t, **cond)


def test_cfg_dropout_drops_context_and_pooled_to_the_empty_prompt_and_keeps_time_ids():
    model = _wrapped("sdxl", dtype=torch.float32)
    recorder = _Recorder(model)
    step = _step("sdxl", model, None, "mse", label_dropout=0.5, online=recorder)
    g = torch.Generator().manual_seed(5)
    null_context, null_pooled = torch.randn(5, 16, generator=g), torch.randn(8, generator=g)
    step.null_context.copy_(null_context)
    step.null_pooled.copy_(null_pooled)
    batch = {k: v.float() for k, v in _batch("sdxl").items()}
    batch["time_ids"] = torch.arange(B * 6, dtype=torch.float32).reshape(B, 6)
    step.load(batch, 7, LR, 0.1)
    with FailOnHostSync():
        step.compute()
    drop = step_randomness(3, 7, B, (4, SIDE, SIDE), NoiseSchedule(), 0.5, torch.device("cpu"))[2]
    assert 0 < int(drop.sum()) < B
    seen = recorder.seen[0]
    assert torch.equal(seen["context"][drop], null_context.expand(int(drop.sum()), -1, -1))
    assert torch.equal(seen["pooled"][drop], null_pooled.expand(int(drop.sum()), -1))
    assert torch.equal(seen["context"][~drop], batch["context"][~drop])
    assert torch.equal(seen["pooled"][~drop], batch["pooled"][~drop])
    assert torch.equal(seen["time_ids"], batch["time_ids"])  # never dropped


def test_sana_sprint_and_pixarts_variance_half():
    # Sana-Sprint's guidance embedding (consistency distillation) is refused in one line;
    # PixArt-alpha's out_channels 2 C is a learned variance the data need not match.
    with pytest.raises(ConfigError, match="guidance_embeds .Sana-Sprint.*not supported"):
        family_of("SanaTransformer2DModel", {"guidance_embeds": True})
    pixart = _config("pixart")
    assert (pixart.out_latent_channels, pixart.context_width, pixart.pooled_dim) == (4, 16, 0)
    check_data(pixart, "pixart", {"channels": 4, "context_dim": 16, "pooled_dim": 0,
                                  "time_ids": False})  # fmt: skip


def test_data_of_another_family_or_shape_is_refused():
    model = _config("sd3")
    fits = {"channels": 4, "context_dim": 16, "pooled_dim": 8, "time_ids": False}
    check_data(model, "sd3", fits)
    check_data(model, None, fits)  # hand-made shards do not say
    with pytest.raises(ConfigError, match="prepared for the flux family, the model is a sd3"):
        check_data(model, "flux", fits)
    with pytest.raises(ConfigError, match="pooled_dim 768 vs 8; time_ids True vs False"):
        check_data(model, "sd3", {**fits, "pooled_dim": 768, "time_ids": True})


# ---- the trainer -------------------------------------------------------------------------------
def _train(*argv, check=True):
    done = prefork.run(
        [sys.executable, str(ROOT / "fastsp" / "train.py"), *map(str, argv)], cwd=ROOT
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _run_options(family, data, out):
    return (
        "--preset", "tiny", "--model", "diffusers", "--diffusion", PROCESS[family],
        "--data", data, "--cond", "context", "--resolution", SIDE, "--batch-size", B,
        "--steps", 2, "--out", out,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "flux", "pixart", "sana"])
def test_a_family_trains_both_stages_through_the_trainer(family, tmp_path):
    pipeline = write_pipeline_folder(family, tmp_path / "pipeline")
    data = write_shards(family, tmp_path / "data")
    stage1 = tmp_path / "stage1"
    _train(*_run_options(family, data, stage1), "--init", pipeline)
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fastsp.checkpoint import load_model

    saved = json.loads((stage1 / "config.json").read_text())["model"]
    assert (saved["kind"], saved["family"]) == ("diffusers", family)
    checkpoint = stage1 / "checkpoints" / "step_00000002"
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(tiny_denoiser(family).state_dict())  # diffusers' own names
    loaded = load_model(stage1)  # rebuilt from config.json: from_config + the state dict
    assert isinstance(loaded.model, DiffusersDenoiser) and loaded.model.family == family
    ema = load_file(str(checkpoint / "ema.safetensors"))
    assert all(torch.equal(v, ema[k]) for k, v in loaded.model.state_dict().items())
    stage2 = tmp_path / "stage2"
    _train(*_run_options(family, data, stage2), "--init", stage1, "--objective", "self_perceptual")
    attention = json.loads((stage2 / "backends.json").read_text())["attention"]
    why = "diffusers has no xformers path" if family == "sana" else "inputs are on cpu"
    assert f"(sdpa: {why}" in attention
    metrics = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)


@pytest.mark.parametrize(
    "case, message",
    [
        ("wrong process", "is a sd3 model, trained under --diffusion flow"),
        pytest.param("missing tap", "unknown perceptual layer", marks=pytest.mark.slow),
        ("unsupported class", "is not a denoiser fastsp trains"),
        ("a pipeline missing its part", "lists transformer/, but"),
        ("without --model diffusers", "holds a SD3Transformer2DModel: train it with --model"),
        ("forced xformers on CPU", "--attention-backend xformers cannot run the SD3Transformer"),
    ],
)
def test_refusals_exit_2_and_write_nothing(case, message, tmp_path):
    pipeline = write_pipeline_folder("sd3", tmp_path / "pipeline")
    data = write_shards("sd3", tmp_path / "data")
    options = list(_run_options("sd3", data, tmp_path / "out")) + ["--init", pipeline]
    if case == "wrong process":
        options[options.index("--diffusion") + 1] = "ddpm"
    elif case == "missing tap":
        options += ["--objective", "self_perceptual", "--perceptual-layers", "down2"]
    elif case == "a pipeline missing its part":
        (pipeline / "transformer" / "config.json").unlink()
    elif case == "forced xformers on CPU":
        options += ["--attention-backend", "xformers"]
    elif case == "without --model diffusers":
        options.remove("--model")
        options.remove("diffusers")
    else:
        config = json.loads((pipeline / "transformer" / "config.json").read_text())
        config["_class_name"] = "HunyuanDiT2DModel"
        (pipeline / "transformer" / "config.json").write_text(json.dumps(config))
    done = _train(*options, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr.strip().splitlines()[-2 if "help" in done.stderr else -1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_bf16_step_with_a_bf16_frozen_network_is_capture_safe(family):
    # The trainer's fast step on a GPU: bf16 autocast of the forwards, the frozen network held
    # in bf16, the fused AdamW update; no host read anywhere, a finite loss and a real update.
    model = _wrapped(family, dtype=torch.float32)
    perceptual = _wrapped(family, seed=1, dtype=torch.bfloat16).eval().requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    step = _step(family, model, perceptual, "self_perceptual", bf16=True, label_dropout=0.2)
    step.load({k: v.float() for k, v in _batch(family).items()}, 1, LR, 0.1)
    with FailOnHostSync():
        step.compute()
    assert torch.isfinite(step.loss_sum) and step.good_steps.item() == 1
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_shards_give_pooled_and_time_ids_and_refuse_a_shard_without_them(tmp_path):
    from safetensors.torch import load_file, save_file

    from fastsp.errors import DataError
    from fastsp.latent_shards import LatentsDataset

    data = write_shards("sdxl", tmp_path / "data")
    dataset = LatentsDataset(data)
    assert (dataset.pooled_dim, dataset.has_time_ids, dataset.family) == (8, True, None)
    item = dataset[(1, False)]
    shard = load_file(str(data / "00000.safetensors"))
    assert torch.equal(item["pooled"], shard["pooled"][1])
    assert torch.equal(item["time_ids"], shard["time_ids"][1])
    del shard["time_ids"]
    save_file(shard, str(data / "00000.safetensors"))
    wrong = r"00001.safetensors' has conditions pooled \[4, 8\], time_ids \[4, 6\] but .*00000"
    with pytest.raises(DataError, match=wrong):
        LatentsDataset(data)


@pytest.mark.slow
def test_ddp_over_two_processes_trains_the_weights_one_process_does(tmp_path):
    # The self-perceptual step of SD3 under DDP (gloo, 2 ranks of half the batch each) updates
    # the diffusers module as one process on the whole batch does.
    from safetensors.torch import load_file

    pipeline = write_pipeline_folder("sd3", tmp_path / "pipeline")
    data = write_shards("sd3", tmp_path / "data")
    options = [*_run_options("sd3", data, "OUT"), "--init", pipeline, "--device", "cpu"]
    options += ["--objective", "self_perceptual", "--log-every", "1"]
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        argv = [str(a) if a != "OUT" else str(out) for a in options]
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        done = prefork.run(  # torchrun's workers forked (tests/prefork.py)
            [sys.executable, *launcher, str(ROOT / "fastsp" / "train.py"), *argv],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[processes] = load_file(
            str(out / "checkpoints" / "step_00000002" / "model.safetensors")
        )
    assert runs[1].keys() == runs[2].keys()
    for name in runs[1]:
        torch.testing.assert_close(runs[2][name], runs[1][name], rtol=1e-4, atol=1e-5, msg=name)
