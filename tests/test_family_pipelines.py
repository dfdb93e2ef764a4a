"""fastsp.family_pipelines on tiny random SD, SDXL, SD3 and Flux pipelines (tests/pipeline_tiny.py).

- sample_with_pipeline with the folder's own denoiser draws exactly the images the folder's
  pipeline draws (same seed); with a changed denoiser, other images.
- export_denoiser writes a model folder its diffusers class loads with the same weights, and a
  pipeline folder its pipeline class loads, drawing the changed denoiser's images; a scheduler
  config given replaces the pipeline's.
- A folder that is not new or empty, a denoiser of another class, an unsupported pipeline: a
  one-line error, nothing written.
"""

import json

import pytest
import torch
from pipeline_tiny import save_pipeline
from test_prepare_pipeline import PIPELINE_CLASSES

from fastsp.errors import CheckpointError, ConfigError
from fastsp.family_pipelines import FAMILIES, export_denoiser, sample_with_pipeline

PROMPTS = ["a photo of a cat", "a red dog"]
# guidance: classifier-free for SD, SDXL, SD3 (> 1: the negative branch runs); Flux's embedded
# guidance value
SAMPLING = {"steps": 2, "seed": 3, "height": 32, "width": 32}
GUIDANCE = {"sd": 2.0, "sdxl": 2.0, "sd3": 2.0, "flux": 3.5}


def _family(name):
    return next(f for f in FAMILIES.values() if f.name == name)


def _load(build_once, name):
    """(pipeline folder, its denoiser loaded by diffusers, the pipeline class)."""
    import diffusers

    folder = build_once(f"pipeline_{name}", lambda f: save_pipeline(name, f))
    family = _family(name)
    denoiser_class = getattr(diffusers, family.denoiser_class)
    denoiser = denoiser_class.from_pretrained(folder, subfolder=family.denoiser).eval()
    return folder, denoiser, getattr(diffusers, PIPELINE_CLASSES[name])


def _pipeline_images(pipeline, name):
    pipeline.set_progress_bar_config(disable=True)
    return (
        pipeline(
            prompt=PROMPTS,
            num_inference_steps=SAMPLING["steps"],
            guidance_scale=GUIDANCE[name],
            height=SAMPLING["height"],
            width=SAMPLING["width"],
            generator=torch.Generator("cpu").manual_seed(SAMPLING["seed"]),
            output_type="pt",
        ).images
        * 2
        - 1
    )


def _changed(denoiser):
    """The denoiser with every weight moved a little: what a fine-tune returns."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in denoiser.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return denoiser


def _sample(folder, denoiser, name):
    return sample_with_pipeline(
        folder, denoiser, PROMPTS, guidance=GUIDANCE[name], device="cpu", **SAMPLING
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_sampling_and_export_go_through_the_familys_pipeline(build_once, tmp_path, name):
    folder, denoiser, pipeline_class = _load(build_once, name)
    images = _sample(folder, denoiser, name)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    expected = _pipeline_images(pipeline_class.from_pretrained(folder), name)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)

    tuned = _changed(denoiser)
    tuned_images = _sample(folder, tuned, name)
    assert (tuned_images - images).abs().max() > 1e-3  # the denoiser given is the one used

    slot = _family(name).denoiser
    model_folder = export_denoiser(tuned, tmp_path / "model")
    reloaded = type(tuned).from_pretrained(model_folder)
    for (key, value), (other, original) in zip(
        reloaded.state_dict().items(), tuned.state_dict().items(), strict=True
    ):
        assert key == other and torch.equal(value, original), key

    pipeline_out = export_denoiser(tuned, tmp_path / "pipeline", pipeline_folder=folder)
    assert sorted(p.name for p in pipeline_out.iterdir()) == sorted(
        p.name for p in folder.iterdir()
    )
    vae_weights = "vae/diffusion_pytorch_model.safetensors"
    assert (pipeline_out / vae_weights).read_bytes() == (folder / vae_weights).read_bytes()
    exported = pipeline_class.from_pretrained(pipeline_out)
    assert type(getattr(exported, slot)) is type(tuned)
    torch.testing.assert_close(_pipeline_images(exported, name), tuned_images, rtol=0, atol=0)
    assert not list(tmp_path.glob(".tmp-*"))


def test_an_export_with_a_scheduler_config_replaces_the_pipelines(build_once, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder, denoiser, pipeline_class = _load(build_once, "flux")
    trained = dict(FlowMatchEulerDiscreteScheduler(shift=1.7).config)  # the run's process
    out = export_denoiser(denoiser, tmp_path / "pipeline", folder, scheduler_config=trained)
    assert pipeline_class.from_pretrained(out).scheduler.config.shift == 1.7
    model = export_denoiser(denoiser, tmp_path / "model", scheduler_config=trained)
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(model).config.shift == 1.7
    # another class than the pipeline's (SDXL's Euler): model_index.json names the run's
    sdxl, unet, sdxl_class = _load(build_once, "sdxl")
    ddim = {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
    out = export_denoiser(unet, tmp_path / "sdxl", sdxl, scheduler_config=ddim)
    scheduler = sdxl_class.from_pretrained(out).scheduler
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert scheduler.config.prediction_type == "v_prediction"


def test_refusals_name_the_problem_and_write_nothing(build_once, tmp_path):
    flux, transformer, _ = _load(build_once, "flux")
    _, unet, _ = _load(build_once, "sdxl")
    with pytest.raises(ConfigError, match="whose transformer is a FluxTransformer2DModel, but "):
        export_denoiser(unet, tmp_path / "out", pipeline_folder=flux)
    with pytest.raises(ConfigError, match="but the denoiser given is a UNet2DConditionModel"):
        _sample(flux, unet, "flux")
    with pytest.raises(ConfigError, match="is inside the pipeline folder"):
        export_denoiser(transformer, flux / "exported", pipeline_folder=flux)
    assert not (flux / "exported").exists()
    sdxl = build_once("pipeline_sdxl", lambda f: save_pipeline("sdxl", f))
    for folder, denoiser, message in (
        (sdxl, unet, "StableDiffusionXLPipeline refuses this request: .*divisible by 8"),
        (flux, transformer, "FluxPipeline draws 28x32 images, not the 30x32 asked for"),
    ):
        with pytest.raises(ConfigError, match=message):
            sample_with_pipeline(
                folder, denoiser, PROMPTS[:1], steps=1, guidance=3.5, seed=0, height=30,
                width=32, device="cpu",
            )  # fmt: skip
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        export_denoiser(transformer, taken)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(ConfigError, match="holds a PixArtSigmaPipeline .*supported pipelines: "):
        export_denoiser(transformer, tmp_path / "out", pipeline_folder=other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "taken"]
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
