"""The VAE and CLIP text encoder from local folders encode as diffusers' StableDiffusionPipeline
does (checked against the pipeline itself on tiny random components); bad folders and a missing
extra are one-line errors naming what was expected."""

import sys

import pytest
import torch
from sd_tiny import CONTEXT_DIM, MAX_LENGTH, TINY_UNET_CONFIG, save_pipeline_components  # noqa: I001

from fastsp import sd_components as sd
from fastsp.errors import ConfigError


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return save_pipeline_components(tmp_path_factory.mktemp("sd") / "pipeline")


def _diffusers_pipeline(root):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    tokenizer, text_encoder = sd.load_text_encoder(root)
    return StableDiffusionPipeline(
        vae=sd.load_vae(root),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_prompts_encode_as_the_diffusers_pipeline_does(pipeline_folder):
    pipe = _diffusers_pipeline(pipeline_folder)
    prompts = ["a photo of a cat", "a red dog", ""]
    ours = sd.encode_text(pipe.tokenizer, pipe.text_encoder, prompts)
    theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    assert ours.shape == (3, MAX_LENGTH, CONTEXT_DIM)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_images_round_trip_through_the_vae(pipeline_folder):
    vae = sd.load_vae(pipeline_folder)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = sd.encode_images(vae, images)
    expected = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)
    sampled = sd.encode_images(vae, images, generator=torch.Generator().manual_seed(1))
    assert sampled.shape == latents.shape == (2, 4, 8, 8)
    assert not torch.equal(sampled, latents)
    decoded = sd.decode_latents(vae, latents)
    expected = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=0)


def test_component_folders_or_a_pipeline_folder(pipeline_folder):
    tokenizer, encoder = sd.load_text_encoder(
        pipeline_folder / "text_encoder", pipeline_folder / "tokenizer"
    )
    again_tokenizer, again_encoder = sd.load_text_encoder(pipeline_folder / "text_encoder")
    assert again_tokenizer.model_max_length == tokenizer.model_max_length == MAX_LENGTH
    vae = sd.load_vae(pipeline_folder / "vae")
    assert vae.config.latent_channels == 4


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: (root / "file.txt").write_text("x") and root / "file.txt", "is a file"),
        (lambda root: root, "holds neither a config.json nor a vae/ folder"),
    ],
)
def test_a_bad_folder_names_what_was_expected(tmp_path, make, problem):
    with pytest.raises(ConfigError, match=problem) as error:
        sd.load_vae(make(tmp_path))
    assert "AutoencoderKL" in str(error.value) and "\n" not in str(error.value)


def test_a_folder_of_another_component_is_refused(pipeline_folder):
    with pytest.raises(ConfigError, match="not an AutoencoderKL"):
        sd.load_vae(pipeline_folder / "text_encoder")


def test_without_the_extra_the_error_names_it(monkeypatch, pipeline_folder):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now fails
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[sd\]"'):
        sd.load_vae(pipeline_folder)
