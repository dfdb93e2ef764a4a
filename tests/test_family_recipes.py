"""docs/family_recipes.md, end to end on tiny random pipelines (tests/pipeline_tiny.py): each
family's block of commands read from the document and run as written, with only the sizes shrunk
(SIZES) and torchrun's 8 processes run as one, from a folder laid out as the recipe's (IMAGES/,
the pipeline folder, runs/): prepare --pipeline -> stage 1 (MSE, SD and SDXL) -> stage 2
(self-perceptual) -> sample --prompt -> export. Then the family's pipeline class loads the export
with from_pretrained, holds the run's EMA weights and the run's scheduler, and draws the images
the sample command wrote."""

import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import prefork
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from pipeline_tiny import T5_LENGTH, save_pipeline  # noqa: E402

from fastsp import sample as sample_cli  # noqa: E402
from fastsp.checkpoint import load_model  # noqa: E402
from fastsp.flow import scheduler_config  # noqa: E402
from fastsp.sampling import image_grid  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "docs" / "family_recipes.md"
# family -> (the recipe's section title, its pipeline folder, its pipeline class)
SECTIONS = {
    "sd": ("## SD 1.x / 2.x", "SD", "StableDiffusionPipeline"),
    "sdxl": ("## SDXL", "SDXL", "StableDiffusionXLPipeline"),
    "sd3": ("## SD3 / SD3.5", "SD35", "StableDiffusion3Pipeline"),
    "flux": ("## Flux.1", "FLUX", "FluxPipeline"),
}
# The recipes' real sizes -> CPU sizes (the tiny VAEs halve an image: 16 px, 8x8 latents)
SIZES = {
    "--resolution": {"1024": "16", "512": "16", "128": "8", "64": "8"},
    "--batch-size": "4",
    "--grad-accum": "1",
    "--steps": "2",
    "--checkpoint-every": "2",
    "--num": "2",
    "--device": "cpu",
    "--max-sequence-length": str(T5_LENGTH),
}
CAPTIONS = ("a photo of a cat", "a red dog", "blue", "a cat")


def recipe_commands(family: str, title: str | None = None) -> list[list[str]]:
    """The commands of the family's bash block in docs/family_recipes.md (or of the section
    `title`), at CPU sizes."""
    title = title or SECTIONS[family][0]
    section = RECIPES.read_text().split(f"\n{title}", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        words = shlex.split(line)
        if words[:2] == ["torchrun", "--nproc_per_node=8"]:
            words = ["python", *words[2:]]
        assert words[0] == "python", line
        command = [sys.executable]
        for word in words[1:]:
            option = command[-1] if command[-1].startswith("--") else None
            size = SIZES.get(option)
            command.append(size.get(word, word) if isinstance(size, dict) else size or word)
        if command[1] == "fastsp/train.py":
            command[1] = str(REPO / "fastsp" / "train.py")
        commands.append(command)
    return commands


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def _write_images(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(SECTIONS))
def test_the_familys_recipe_end_to_end(family, build_once, tmp_path, monkeypatch):
    _, folder_name, pipeline_class = SECTIONS[family]
    pipeline = build_once(f"pipeline_{family}", lambda folder: save_pipeline(family, folder))
    (tmp_path / folder_name).symlink_to(pipeline, target_is_directory=True)
    _write_images(tmp_path / "IMAGES")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = recipe_commands(family)
    for command in commands:
        done = prefork.run(command, env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, f"{shlex.join(command[1:])}\n{done.stderr[-3000:]}"

    trained = [c for c in commands if c[1].endswith("train.py")]
    objectives = [_option(c, "--objective") or "mse" for c in trained]
    assert objectives == (["mse"] if family in ("sd", "sdxl") else []) + ["self_perceptual"]
    run = load_model(tmp_path / _option(trained[-1], "--out"))
    assert run.model.family == family and run.train_config.objective == "self_perceptual"
    if len(trained) == 2:  # stage 2 started from stage 1, whose --init was the pipeline folder
        assert run.train_config.init == _option(trained[0], "--out")

    # The export: the family's pipeline class loads it, with the run's EMA weights and scheduler
    sample, *exports = [c for c in commands if c[2] in ("fastsp.sample", "fastsp.export")]
    pipeline_out = [c for c in exports if "--model-only" not in c][0]
    out = tmp_path / _option(pipeline_out, "--to-diffusers")
    exported = getattr(diffusers, pipeline_class).from_pretrained(out)
    denoiser = getattr(exported, "unet" if family in ("sd", "sdxl") else "transformer")
    ema = run.model.denoiser.state_dict()
    assert all(torch.equal(value, ema[key]) for key, value in denoiser.state_dict().items())
    expected_scheduler = scheduler_config(run.train_config)
    assert type(exported.scheduler).__name__ == expected_scheduler["_class_name"]
    written = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert {k: v for k, v in written.items() if k in expected_scheduler} == expected_scheduler
    for command in exports:
        if "--model-only" in command:
            model = type(denoiser).from_pretrained(tmp_path / _option(command, "--to-diffusers"))
            assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())

    # ... and draws the images `fastsp.sample` wrote, from the same seed: as the recipe samples,
    # and with classifier-free guidance against the empty prompt (the exported pipeline's own
    # null condition; Flux: its true CFG, given the empty negative prompt)
    num, steps = int(_option(sample, "--num")), int(_option(sample, "--steps"))
    guided = tmp_path / "guided.png"
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths, its runs' --init among them
    assert sample_cli.main([*sample[3:], "--cfg", "2", "--out", str(guided)]) == 0
    exported.set_progress_bar_config(disable=True)
    for png, cfg in ((tmp_path / _option(sample, "--out"), _option(sample, "--cfg")), (guided, 2)):
        cfg = float(cfg or 1)
        if family == "flux":
            options = {"guidance_scale": run.model.config.guidance, "true_cfg_scale": cfg}
            options.update({"negative_prompt": ""} if cfg > 1 else {})
        else:
            options = {"guidance_scale": cfg}
        images = exported(
            prompt=[_option(sample, "--prompt")] * num,
            num_inference_steps=steps,
            height=16,
            width=16,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pt",
            **options,
        ).images
        written = np.asarray(Image.open(png))
        drawn = image_grid(images * 2 - 1, padding=0 if num == 1 else 1)
        assert written.shape == drawn.shape == (17 + 1, 2 * 17 + 1, 3)  # 2 images of 16 x 16
        # the same computation in another process: at most a rounding step apart
        assert np.abs(written.astype(int) - drawn.astype(int)).max() <= 1, cfg


# ---- refusals of sample and export for a --model diffusers run ---------------------------------
@pytest.fixture(scope="module")
def sd3_run(build_once):
    """A tiny SD3 run (1 step) whose --init is a model folder, not a pipeline folder."""
    from family_tiny import write_pipeline_folder, write_shards

    from fastsp import train as train_cli

    def make(folder: Path) -> None:
        write_pipeline_folder("sd3", folder / "pipeline")
        options = ["--preset", "tiny", "--model", "diffusers", "--diffusion", "flow"]
        options += ["--data", str(write_shards("sd3", folder / "data")), "--cond", "context"]
        options += ["--resolution", "8", "--batch-size", "4", "--steps", "1"]
        options += ["--init", str(folder / "pipeline" / "transformer")]
        assert train_cli.main([*options, "--out", str(folder / "run")]) == 0

    return build_once("family_recipes_sd3_run", make) / "run"


def _index_only(folder: Path, pipeline_class: str) -> Path:
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return folder


@pytest.mark.slow
def test_sample_and_export_refusals_name_the_fix_exit_2_and_write_nothing(
    sd3_run, tmp_path, capsys
):
    from fastsp import export, sample

    flux = _index_only(tmp_path / "flux", "FluxPipeline")
    sd3 = _index_only(tmp_path / "sd3", "StableDiffusion3Pipeline")
    png = str(tmp_path / "out.png")
    base = ["--checkpoint", str(sd3_run), "--out", png]
    prompt = [*base, "--prompt", "a cat"]
    cases = [
        (prompt, "did not start from a pipeline folder (its --init chain ends at a model"),
        ([*prompt, "--pipeline", str(flux)], "is a FluxPipeline (flux) but"),
        ([*prompt, "--guidance", "3"], "--guidance is the guidance value a guidance-distilled"),
        (
            [*prompt, "--pipeline", str(sd3), "--cfg-rescale", "0.5"],
            "the sd3 pipeline has no guidance rescale",
        ),
        ([*prompt, "--vae", str(sd3)], "--vae: a sd3 run is drawn by its diffusers pipeline"),
        ([*prompt, "--sampler", "euler"], "--sampler: a sd3 run is drawn by its diffusers"),
        (base, "is a sd3 model, sampled from a prompt: pass --prompt"),
    ]
    for argv, message in cases:
        assert sample.main(argv) == 2, argv
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("error: ") and message in line, line
    out = tmp_path / "export"
    exports = [
        (["--pipeline", str(flux)], "is a FluxPipeline (flux) but"),
        (["--pipeline", str(sd3), "--model-only"], "--model-only writes the denoiser alone"),
    ]
    for extra, message in exports:
        argv = ["--checkpoint", str(sd3_run), "--to-diffusers", str(out), *extra]
        assert export.main(argv) == 2, argv
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flux", "sd3"]

    # a run that did not start from a pipeline folder exports its model folder
    assert export.main(["--checkpoint", str(sd3_run), "--to-diffusers", str(out)]) == 0
    model = diffusers.SD3Transformer2DModel.from_pretrained(out)
    ema = load_model(sd3_run).model.denoiser.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(out)
    assert scheduler.config.shift == load_model(sd3_run).train_config.flow_shift
