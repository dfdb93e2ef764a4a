"""fastsp.diffusers_unet: diffusers UNet2DConditionModel folders in (load_unet, --init,
--perceptual-checkpoint) and out (export_to_diffusers, python -m fastsp.export), checked against
diffusers' own model in float64 on tiny random UNets of both Stable Diffusion families."""

import json
import sys
from pathlib import Path

import prefork
import pytest
import torch

import fastsp
from fastsp import config as config_lib
from fastsp import config_cli, config_file, model_config
from fastsp.diffusers_unet import SD21_BASE_CONFIG, diffusers_names, export_to_diffusers
from fastsp.diffusers_unet_config import unet_config_from_diffusers
from fastsp.errors import CheckpointError, ConfigError

diffusers = pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parent.parent
CONTEXT_DIM = 32
# SD 1.x's layout: 1x1-conv projections, attention_head_dim = 8 heads at every level.
SD1_LIKE = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CONTEXT_DIM,
    attention_head_dim=8,
    norm_num_groups=8,
)
# SD 2.x's layout: linear projections, attention_head_dim = heads per level (16 channels each).
SD2_LIKE = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CONTEXT_DIM,
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    transformer_layers_per_block=2,
    norm_num_groups=8,
)
FAMILIES = {"sd1": SD1_LIKE, "sd2": SD2_LIKE}
SD21_PARAMS = 865_910_724


def _diffusers_unet(config: dict, seed: int = 0) -> "diffusers.UNet2DConditionModel":
    """A diffusers UNet with every weight random (no zero inits), in eval mode."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5))
    return model


def _inputs(batch: int = 2, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g, dtype=torch.float64)
    t = torch.tensor([17, 803])[:batch]
    context = torch.randn(batch, 7, CONTEXT_DIM, generator=g, dtype=torch.float64)
    return x, t, context


def _assert_same_forward(ours, theirs, **inputs) -> None:
    x, t, context = _inputs(**inputs)
    with torch.no_grad():
        expected = theirs.double()(x, t, encoder_hidden_states=context).sample
        got = ours.double()(x, t, context=context)
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < 1e-10, error


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["fp32", "fp16", "sharded"])
def test_load_unet_forward_equals_diffusers(tmp_path, family, variant):
    theirs = _diffusers_unet(FAMILIES[family])
    if variant == "fp16":
        theirs = theirs.half()  # the stored weights are fp16; both sides compare from them
    kwargs = {"max_shard_size": "100KB"} if variant == "sharded" else {}
    theirs.save_pretrained(tmp_path / "unet", **kwargs)
    files = sorted(p.name for p in (tmp_path / "unet").iterdir())
    if variant == "sharded":
        assert "diffusion_pytorch_model.safetensors.index.json" in files
        assert len(files) > 3
    ours = fastsp.load_unet(tmp_path / "unet", dtype=torch.float64)
    assert ours.config.linear_projection is (family == "sd2")
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    _assert_same_forward(ours, theirs)


def test_scale_shift_time_embedding_maps(tmp_path):
    """resnet_time_scale_shift='scale_shift' is fastsp's scale_shift_norm (ADM's)."""
    theirs = _diffusers_unet({**SD2_LIKE, "resnet_time_scale_shift": "scale_shift"})
    theirs.save_pretrained(tmp_path)
    ours = fastsp.load_unet(tmp_path, dtype=torch.float64)
    assert ours.config.scale_shift_norm
    _assert_same_forward(ours, theirs)


def test_export_of_a_model_diffusers_cannot_express_is_refused(tmp_path):
    model = fastsp.UNet(model_config.UNET_PRESETS["tiny"])  # class labels, no context
    with pytest.raises(ConfigError) as caught:
        export_to_diffusers(model, tmp_path / "out")
    assert "num_classes=10" in str(caught.value) and "context_dim=0" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_family_configs_map_to_their_layouts():
    sd1 = unet_config_from_diffusers(SD1_LIKE)
    assert (sd1.num_heads, sd1.linear_projection, sd1.attention_levels) == ((8, 8), False, (0,))
    sd2 = unet_config_from_diffusers(SD2_LIKE)
    assert (sd2.head_dim, sd2.num_heads, sd2.transformer_depth) == (16, (), 2)
    assert unet_config_from_diffusers(SD21_BASE_CONFIG) == model_config.UNET_PRESETS["sd21"]


def test_mid_tap_equals_diffusers_mid_block(tmp_path):
    theirs = _diffusers_unet(SD2_LIKE).double()
    theirs.save_pretrained(tmp_path)
    ours = fastsp.load_unet(tmp_path, dtype=torch.float64)
    seen = {}
    theirs.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    x, t, context = _inputs()
    with torch.no_grad():
        theirs(x, t, encoder_hidden_states=context)
        mid = ours(x, t, context=context, taps=["mid"])["mid"]
    error = ((mid - seen["mid"]).norm() / seen["mid"].norm()).item()
    assert error < 1e-10, error


def test_pipeline_folder_loads_its_unet(tmp_path):
    theirs = _diffusers_unet(SD1_LIKE)
    theirs.save_pretrained(tmp_path / "pipe" / "unet")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    _assert_same_forward(fastsp.load_unet(tmp_path / "pipe", dtype=torch.float64), theirs)


def test_unsupported_config_is_refused_listing_every_field():
    config = {
        **SD2_LIKE,
        "class_embed_type": "timestep",
        "conv_in_kernel": 5,
        "time_embedding_type": "fourier",
        "mystery_field": 1,
    }
    with pytest.raises(ConfigError) as caught:
        unet_config_from_diffusers(config)
    message = str(caught.value)
    assert "\n" not in message
    for part in (
        "class_embed_type='timestep'",
        "conv_in_kernel=5",
        "time_embedding_type='fourier'",
        "mystery_field=1",
    ):
        assert part in message


@pytest.mark.parametrize("fault", ["no weights", "truncated", "extra tensor", "wrong shape"])
def test_damaged_diffusers_folder_is_a_one_line_error(tmp_path, fault):
    from safetensors.torch import load_file, save_file

    folder = _saved(tmp_path / "unet", SD2_LIKE)
    weights = folder / "diffusion_pytorch_model.safetensors"
    if fault == "no weights":
        weights.unlink()
    elif fault == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    else:
        tensors = load_file(weights)
        if fault == "extra tensor":
            tensors["class_embedding.weight"] = torch.zeros(3, 4)
        else:
            tensors["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
        save_file(tensors, weights)
    with pytest.raises(CheckpointError) as caught:
        fastsp.load_unet(folder)
    assert "\n" not in str(caught.value) and str(folder) in str(caught.value)


def test_load_unet_of_a_fastsp_run_is_its_ema_model(tmp_path):
    train, model_cfg = config_lib.resolve("tiny", {}, {})
    torch.manual_seed(0)
    model, ema = fastsp.UNet(model_cfg), fastsp.UNet(model_cfg)
    with torch.no_grad():
        for p in ema.parameters():
            p.normal_()
    optimizer = torch.optim.AdamW(model.parameters())
    text = config_file.dumps(train, model_cfg)
    fastsp.checkpoint.save_checkpoint(tmp_path / "run", 5, model, ema, optimizer, {"step": 5}, text)
    loaded = fastsp.load_unet(tmp_path / "run", dtype=torch.float64)
    pairs = zip(loaded.state_dict().items(), ema.state_dict().values(), strict=True)
    for (name, got), want in pairs:
        assert got.dtype == torch.float64 and torch.equal(got, want.double()), name
    with pytest.raises(CheckpointError, match="does not exist"):
        fastsp.load_unet(tmp_path / "nowhere")


def test_sd21_base_on_meta_device_maps_every_key():
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**SD21_BASE_CONFIG)
        ours = fastsp.UNet(unet_config_from_diffusers(SD21_BASE_CONFIG))
    their_shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    mapped = {}
    for name, tensor in ours.state_dict().items():
        sources = diffusers_names(name)
        assert all(s in their_shapes for s in sources), name
        assert sum(their_shapes[s][0] for s in sources) == tensor.shape[0], name
        assert all(their_shapes[s][1:] == tensor.shape[1:] for s in sources), name
        mapped.update(dict.fromkeys(sources, name))
    assert set(mapped) == set(their_shapes)  # none left over
    assert len(their_shapes) == 686 and len(ours.state_dict()) == 638
    assert sum(p.numel() for p in ours.parameters()) == SD21_PARAMS
    assert sum(p.numel() for p in theirs.parameters()) == SD21_PARAMS


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip(tmp_path, family):
    ours = fastsp.load_unet(_saved(tmp_path / "in", FAMILIES[family]))  # fp32, as trained
    export_to_diffusers(ours, tmp_path / "out", sample_size=16)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and "_diffusers_version" in config
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out").eval()
    assert theirs.config.sample_size == 16
    _assert_same_forward(ours, theirs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(CheckpointError, match="not empty"):
        export_to_diffusers(ours, tmp_path / "out")


def _saved(folder: Path, config: dict) -> Path:
    _diffusers_unet(config).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# The trainer and the export command

TRAIN = [sys.executable, str(REPO / "fastsp" / "train.py")]
TINY_RUN = [
    "--preset",
    "tiny",
    "--data",
    "synthetic",
    "--cond",
    "context",
    "--channels",
    "4",
    "--resolution",
    "16",
    "--steps",
    "1",
    "--device",
    "cpu",
]


def _run(args, cwd):
    return prefork.run(args, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_train_init_and_perceptual_from_diffusers_folder_then_export(tmp_path):
    unet_dir = _saved(tmp_path / "unet", SD1_LIKE)
    stage1 = _run([*TRAIN, *TINY_RUN, "--init", str(unet_dir), "--out", "run1"], tmp_path)
    assert stage1.returncode == 0, stage1.stderr
    saved = json.loads((tmp_path / "run1" / "config.json").read_text())["model"]
    assert saved["num_heads"] == [8, 8] and saved["linear_projection"] is False
    assert saved["base_channels"] == 32 and saved["context_dim"] == CONTEXT_DIM

    stage2 = _run(
        [
            *TRAIN,
            *TINY_RUN,
            "--init",
            str(unet_dir),
            "--objective",
            "self_perceptual",
            "--perceptual-checkpoint",
            str(unet_dir),
            "--out",
            "run2",
        ],
        tmp_path,
    )
    assert stage2.returncode == 0, stage2.stderr

    export = [sys.executable, "-m", "fastsp.export", "--checkpoint", "run2", "--to-diffusers"]
    done = _run([*export, "exported"], tmp_path)
    assert done.returncode == 0, done.stderr
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "exported").eval()
    assert theirs.config.sample_size == 16
    ours = fastsp.checkpoint.load_model(tmp_path / "run2", "ema").model
    _assert_same_forward(ours, theirs)
    again = _run([*export, "exported"], tmp_path)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    missing = _run([*export, "other", "--checkpoint", "nowhere"], tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr


def test_train_init_contradicting_option_names_both_values(tmp_path):
    unet_dir = _saved(tmp_path / "unet", SD2_LIKE)
    args = [*TINY_RUN, "--init", str(unet_dir), "--base-channels", "16", "--out", "run"]
    with pytest.raises(SystemExit) as caught:
        config_cli.parse_args(args)
    assert caught.value.code == 2
    result = _run([*TRAIN, *args], tmp_path)
    assert result.returncode == 2
    assert "--base-channels 16" in result.stderr and "32" in result.stderr, result.stderr
