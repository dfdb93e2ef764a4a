"""python -m fastsp.prepare --pipeline: captioned images -> shards through a diffusers pipeline's
own encoders, on tiny random SD, SDXL, SD3 and Flux pipelines (tests/pipeline_tiny.py).

- The shards hold the pipeline's VAE latents ((mean - shift_factor) * scaling_factor), its
  class's own encode_prompt outputs (context, pooled), SDXL's time ids (original size, crop,
  target size) per image; the empty prompt is encode_prompt(""); metadata.json names the family.
- An SD pipeline through --pipeline writes the same shards as the --vae/--text-encoder path.
- A rerun rewrites nothing (the shard writing, resume and torchrun split are prepare's own,
  shared with the --vae path and tested in test_prepare.py).
- An unsupported pipeline class, a pipeline missing a part, contradictory options: one line, exit
  2, nothing written.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_tiny import T5_LENGTH, save_pipeline
from safetensors.torch import load_file
from test_prepare import _mtimes, _shards

from fastsp import prepare
from fastsp.image_folder import load_image
from fastsp.latent_shards import read_metadata

RES = 32
# name -> (caption, (height, width)): one image without resizing or cropping, one cropped from the
# left and right, one from the top and bottom, one downscaled by 2 and then cropped.
IMAGES = {
    "a.png": ("a photo of a cat", (32, 32)),
    "b.png": ("a red dog", (32, 38)),
    "c.png": ("blue", (48, 32)),
    "d.png": ("", (64, 80)),
}
# SDXL's time ids of each: original (h, w), crop (top, left), target (h, w)
TIME_IDS = [
    [32, 32, 0, 0, 32, 32],
    [32, 38, 0, 3, 32, 32],
    [48, 32, 8, 0, 32, 32],
    [64, 80, 0, 4, 32, 32],  # resized to 32 x 40: 4 columns cut on each side
]
PIPELINE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (caption, size) in IMAGES.items():
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(caption)
    return folder


def pipeline_folder(build_once, family):
    return build_once(f"pipeline_{family}", lambda folder: save_pipeline(family, folder))


def _args(images, pipeline, out, family, *extra):
    length = ["--max-sequence-length", str(T5_LENGTH)] if family in ("sd3", "flux") else []
    return [
        "--images", str(images), "--pipeline", str(pipeline), "--resolution", str(RES),
        "--out", str(out), "--shard-size", "3", "--batch-size", "2", "--device", "cpu",
        *length, *extra,
    ]  # fmt: skip


def _encode_prompt(pipeline, family, prompt):
    """(context [1, L, D], pooled [1, P] or None): the pipeline's own encode_prompt."""
    if family == "sd":
        return pipeline.encode_prompt(prompt, "cpu", 1, False)[0], None
    if family == "sdxl":
        context, _, pooled, _ = pipeline.encode_prompt(prompt, do_classifier_free_guidance=False)
    elif family == "sd3":
        context, _, pooled, _ = pipeline.encode_prompt(
            prompt, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH
        )
    else:
        context, pooled, _ = pipeline.encode_prompt(prompt, None, max_sequence_length=T5_LENGTH)
    return context, pooled


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_shards_hold_the_pipelines_own_encodings(build_once, images, tmp_path, family):
    import diffusers

    pipeline_path = pipeline_folder(build_once, family)
    out = tmp_path / "latents"
    assert prepare.main(_args(images, pipeline_path, out, family)) == 0
    shards = _shards(out)
    assert [len(s["latents"]) for s in shards] == [3, 1]
    stored = {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
    has_pooled = family != "sd"
    expected_keys = {"latents", "context"} | ({"pooled"} if has_pooled else set())
    assert set(stored) == expected_keys | ({"time_ids"} if family == "sdxl" else set())

    pipeline = getattr(diffusers, PIPELINE_CLASSES[family]).from_pretrained(pipeline_path)
    vae = pipeline.vae
    shift = {"sd": 0.0, "sdxl": 0.0, "sd3": 0.0609, "flux": 0.1159}[family]
    assert (vae.config.shift_factor or 0.0) == shift
    with torch.no_grad():
        for i, (name, (caption, _)) in enumerate(IMAGES.items()):
            pixels = load_image(str(images / name), RES)[None]
            mean = vae.encode(pixels).latent_dist.mean
            expected = (mean - shift) * vae.config.scaling_factor
            torch.testing.assert_close(stored["latents"][i : i + 1], expected, rtol=0, atol=2e-6)
            context, pooled = _encode_prompt(pipeline, family, caption)
            torch.testing.assert_close(stored["context"][i : i + 1], context, rtol=0, atol=1e-6)
            if has_pooled:
                torch.testing.assert_close(stored["pooled"][i : i + 1], pooled, rtol=0, atol=1e-6)
        empty_context, empty_pooled = _encode_prompt(pipeline, family, "")
    assert not torch.allclose(stored["context"][0], stored["context"][1])
    if family == "sdxl":
        assert stored["time_ids"].tolist() == TIME_IDS

    empty = load_file(out / "empty_prompt.safetensors")
    assert set(empty) == {"context"} | ({"pooled"} if has_pooled else set())
    torch.testing.assert_close(empty["context"], empty_context[0], rtol=0, atol=0)
    if has_pooled:
        torch.testing.assert_close(empty["pooled"], empty_pooled[0], rtol=0, atol=0)

    metadata = read_metadata(out)
    assert metadata["family"] == family
    assert metadata["pipeline_class"] == PIPELINE_CLASSES[family]
    assert metadata["pipeline_folder"] == str(pipeline_path.resolve())
    assert metadata["shift_factor"] == shift
    assert metadata["scaling_factor"] == vae.config.scaling_factor
    assert metadata["time_ids"] is (family == "sdxl")
    assert metadata["latent_shape"] == [4, RES // 2, RES // 2]
    assert metadata["context_shape"] == list(empty_context.shape[1:])
    assert metadata.get("pooled_shape") == (list(empty_pooled.shape[1:]) if has_pooled else None)
    assert metadata["num_images"] == 4

    before = _mtimes(out)  # a rerun skips every shard and rewrites nothing
    assert prepare.main(_args(images, pipeline_path, out, family)) == 0
    assert _mtimes(out) == before


def test_an_sd_pipeline_writes_the_shards_of_the_component_path(build_once, images, tmp_path):
    pipeline_path = pipeline_folder(build_once, "sd")
    through_pipeline, through_components = tmp_path / "pipeline", tmp_path / "components"
    assert prepare.main(_args(images, pipeline_path, through_pipeline, "sd")) == 0
    args = _args(images, pipeline_path, through_components, "sd")
    at = args.index("--pipeline")
    args[at : at + 2] = ["--vae", str(pipeline_path), "--text-encoder", str(pipeline_path)]
    assert prepare.main(args) == 0
    for a, b in zip(_shards(through_pipeline), _shards(through_components), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "family" not in read_metadata(through_components)  # today's format, unchanged


def test_bad_pipelines_and_options_are_refused_before_anything_is_written(
    build_once, images, tmp_path, capsys
):
    flux = pipeline_folder(build_once, "flux")
    out = tmp_path / "out"

    def refused(args, message):
        assert prepare.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()

    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    refused(
        _args(images, other, out, "sdxl"),
        "holds a KandinskyPipeline (model_index.json); supported pipelines: "
        "StableDiffusionPipeline (sd), StableDiffusionXLPipeline (sdxl), "
        "StableDiffusion3Pipeline (sd3), FluxPipeline (flux)",
    )
    refused(_args(images, tmp_path, out, "sdxl"), "has no model_index.json")
    partial = tmp_path / "partial"
    shutil.copytree(flux, partial)
    shutil.rmtree(partial / "text_encoder_2")
    refused(_args(images, partial, out, "flux"), "lacks text_encoder_2/ that its model_index")
    refused(
        _args(images, flux, out, "flux", "--vae", str(flux)),
        "--pipeline takes the VAE and text encoders from the pipeline folder; drop --vae",
    )
    refused(
        [
            *_args(images, pipeline_folder(build_once, "sdxl"), out, "sdxl"),
            "--max-sequence-length",
            "8",
        ],
        "the pipeline is sdxl, which has no T5 encoder",
    )
    no_encoders = _args(images, flux, out, "sdxl")
    del no_encoders[no_encoders.index("--pipeline") : no_encoders.index("--pipeline") + 2]
    refused(no_encoders, "pass the encoders: --pipeline PIPELINE")
    # the T5 length is part of what the shards depend on: another one is another preparation
    assert prepare.main(_args(images, flux, out, "flux")) == 0
    capsys.readouterr()
    again = _args(images, flux, out, "flux")
    again[again.index("--max-sequence-length") + 1] = str(T5_LENGTH + 1)
    assert prepare.main(again) == 2
    assert f"max_sequence_length {T5_LENGTH} (now {T5_LENGTH + 1})" in capsys.readouterr().err
