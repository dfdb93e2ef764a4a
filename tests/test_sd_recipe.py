"""The README's "Fine-tune Stable Diffusion 2.1 with the self-perceptual loss" recipe, end to end
on the CPU with tiny random components saved to a temporary folder laid out as the README's
(SD/, IMAGES/, LATENTS/, runs/): prepare -> stage 1 (MSE) from a diffusers UNet -> stage 2
(self-perceptual) -> a prompt sample -> export -> diffusers loads the export and its pipeline
block runs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastsp
from fastsp import checkpoint as checkpoint_lib
from fastsp import config_cli, diffusers_unet_config, sample
from fastsp.training.loop import train

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sd_tiny import CONTEXT_DIM, SD21_SCHEDULER_CONFIG, save_pipeline_components  # noqa: E402

from fastsp import export, prepare  # noqa: E402  (they need the sd extra)

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16  # the tiny VAE halves it: 8x8 latents
CAPTIONS = ("a photo of a cat", "a photo of a dog", "a red digit", "a blue digit")
# SD 2.x's UNet layout, tiny: linear projections, heads per level, a cross-attention mid block.
TINY_SD2_UNET = dict(
    sample_size=IMAGE_SIZE // 2,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CONTEXT_DIM,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    norm_num_groups=8,
)
# A pipeline folder's model_index.json and Stable Diffusion 2.1-base's scheduler_config.json.
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.8.0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _save_sd_folder(root: Path) -> Path:
    """root/SD: a pipeline folder of tiny random components, a UNet and a scheduler included."""
    sd = save_pipeline_components(root / "SD")
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(**TINY_SD2_UNET).save_pretrained(sd / "unet")
    (sd / "scheduler").mkdir()
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21_SCHEDULER_CONFIG))
    (sd / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return sd


def _save_captioned_images(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)
    return folder


def _train(*argv: str, model_config=None) -> None:
    """A README stage command at CPU size (2 steps, batch 4, 8x8 latents); `model_config`
    replaces the preset's architecture (a fastsp --init must match it, see stage 2)."""
    tiny = ["--batch-size", "4", "--steps", "2", "--resolution", "8", "--sample-steps", "2"]
    cfg, preset_model = config_cli.parse_args([*argv, *tiny])
    train(cfg, model_config or preset_model)


def _readme_pipeline_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Fine-tune Stable Diffusion 2.1 with the self-perceptual loss", 1)[1]
    return section.split("\n## ", 1)[0].split("```python", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_the_readme_recipe_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the README's relative paths
    _save_sd_folder(tmp_path)
    images = _save_captioned_images(tmp_path / "IMAGES")

    # 1. captioned images -> latent shards
    prepare_args = ["--images", str(images), "--vae", "SD/vae", "--text-encoder", "SD/text_encoder"]
    assert prepare.main([*prepare_args, "--resolution", str(IMAGE_SIZE), "--out", "LATENTS"]) == 0

    # 2. stage 1: MSE (zero terminal SNR + v-prediction) from the diffusers UNet
    data = ["--preset", "sd21", "--data", "LATENTS", "--cond", "context"]
    _train(*data, "--init", "SD/unet", "--out", "runs/sd21_zsnr")
    loaded1 = checkpoint_lib.load_model("runs/sd21_zsnr")
    stage1 = loaded1.model
    assert loaded1.train_config.zero_terminal_snr is True
    assert loaded1.train_config.prediction_type == "v"
    # the architecture came from SD/unet's config.json, not from the sd21 preset
    assert stage1.config == diffusers_unet_config.unet_config_from_diffusers(TINY_SD2_UNET)
    # and so did its start: two steps at the warm-up's learning rate barely move the weights
    start = fastsp.load_unet("SD/unet")
    for (name, ours), theirs in zip(
        stage1.state_dict().items(), start.state_dict().values(), strict=True
    ):
        assert (ours - theirs).abs().max() < 1e-3, name

    # 3. stage 2: self-perceptual from stage 1. A real SD 2.1-base UNet is the sd21 preset's
    # architecture, so the README's command needs no model options; this tiny one is not, and a
    # fastsp checkpoint passed to --init must match the run's architecture: give it stage 1's.
    stage2_args = ["--init", "runs/sd21_zsnr", "--objective", "self_perceptual"]
    _train(*data, *stage2_args, "--out", "runs/sd21_sp", model_config=stage1.config)
    loaded2 = checkpoint_lib.load_model("runs/sd21_sp")
    stage2 = loaded2.model
    assert loaded2.train_config.objective == "self_perceptual"
    moved = [
        not torch.equal(a, b) for a, b in zip(stage1.parameters(), stage2.parameters(), strict=True)
    ]
    assert any(moved)

    # 4. a prompt sample without CFG
    sample_args = ["--checkpoint", "runs/sd21_sp", "--prompt", "a photo of a cat", "--num", "1"]
    sample_args += ["--vae", "SD/vae", "--text-encoder", "SD/text_encoder", "--steps", "3"]
    assert sample.main([*sample_args, "--out", "cats.png"]) == 0
    assert np.asarray(Image.open("cats.png")).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)

    # 5. export; diffusers loads it, and its forward is fastsp's
    export_args = ["--checkpoint", "runs/sd21_sp", "--to-diffusers", "runs/sd21_sp_unet"]
    assert export.main(export_args) == 0
    theirs = diffusers.UNet2DConditionModel.from_pretrained("runs/sd21_sp_unet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t, context = torch.tensor([3, 999]), torch.randn(2, 8, CONTEXT_DIM, generator=g).double()
    with torch.no_grad():
        expected = stage2.double()(x, t, context=context)
        got = theirs.double()(x, t, encoder_hidden_states=context).sample
    assert ((got - expected).norm() / expected.norm()).item() < 1e-10

    # the README's block: the export in diffusers' pipeline, trailing DDIM, no guidance
    namespace: dict = {}
    exec(compile(_readme_pipeline_block(), "README.md", "exec"), namespace)
    assert namespace["image"].size == (IMAGE_SIZE, IMAGE_SIZE)
    assert namespace["pipe"].scheduler.config.timestep_spacing == "trailing"
