"""The diffusers pipelines whose denoiser fastsp trains (SD 1/2, SDXL, SD3/3.5, Flux.1): which
family a pipeline folder is, the pipeline assembled from the folder with a given denoiser,
sampling through it, and the denoiser exported as a diffusers folder or a whole pipeline folder.

    images = sample_with_pipeline("FLUX", transformer, ["a photo of a cat"], steps=28,
                                  guidance=3.5, seed=0, height=1024, width=1024, device="cuda")
    export_denoiser(transformer, "out/transformer")              # FluxTransformer2DModel folder
    export_denoiser(transformer, "out/flux", pipeline_folder="FLUX")  # FluxPipeline folder

A family is read from the pipeline folder's model_index.json ("_class_name"), never guessed from
weights. Everything a pipeline does (prompt encoding, the scheduler, guidance, the VAE's scaling
and shift, Flux's latent packing) stays the pipeline's own: this module assembles and calls it.
`guidance` is the pipeline's `guidance_scale`: classifier-free guidance for SD, SDXL and SD3; for
Flux the guidance value the guidance-distilled transformer is conditioned on (Flux.1-dev).
diffusers and transformers come with the `sd` extra; without them a ConfigError names it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastsp.errors import ConfigError
from fastsp.sd_components import require

__all__ = [
    "FAMILIES",
    "Family",
    "export_denoiser",
    "export_run",
    "load_pipeline",
    "pipeline_family",
    "run_pipeline_folder",
    "sample_run",
    "sample_with_pipeline",
]

MODEL_INDEX = "model_index.json"


@dataclass(frozen=True)
class Family:
    name: str  # fastsp's name of the family, as metadata.json's "family" holds it
    pipeline_class: str  # the diffusers pipeline class model_index.json's "_class_name" names
    denoiser: str  # the pipeline's slot of the trained module (its subfolder)
    denoiser_class: str  # the diffusers class of that module


FAMILIES = {
    family.pipeline_class: family
    for family in (
        Family("sd", "StableDiffusionPipeline", "unet", "UNet2DConditionModel"),
        Family("sdxl", "StableDiffusionXLPipeline", "unet", "UNet2DConditionModel"),
        Family("sd3", "StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel"),
        Family("flux", "FluxPipeline", "transformer", "FluxTransformer2DModel"),
    )
}
SUPPORTED = ", ".join(f"{cls} ({family.name})" for cls, family in FAMILIES.items())


def read_model_index(folder: str | Path, option: str = "--pipeline") -> dict:
    """A pipeline folder's model_index.json; a one-line ConfigError when there is none."""
    root = Path(folder)
    if not root.is_dir():
        problem = "does not exist" if not root.exists() else "is a file, not a folder"
        raise ConfigError(f"{option} {root} {problem}; pass a local diffusers pipeline folder")
    try:
        index = json.loads((root / MODEL_INDEX).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{option} {root} has no {MODEL_INDEX}; pass a diffusers pipeline folder (what a "
            f"pipeline's save_pretrained writes: {MODEL_INDEX}, vae/, text_encoder/, ...)"
        ) from None
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{option} {root / MODEL_INDEX} cannot be read ({error}); restore the pipeline's "
            f"{MODEL_INDEX}"
        ) from None
    if not isinstance(index, dict):
        raise ConfigError(f"{option} {root / MODEL_INDEX} is not a JSON object; restore it")
    return index


def pipeline_family(folder: str | Path, option: str = "--pipeline") -> Family:
    """The family of a pipeline folder, from its model_index.json's class; a one-line
    ConfigError naming the supported classes for any other."""
    index = read_model_index(folder, option)
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise ConfigError(
            f"{option} {folder} holds a {name or 'pipeline without a _class_name'} "
            f"({MODEL_INDEX}); supported pipelines: {SUPPORTED}"
        )
    return FAMILIES[name]


def check_parts(folder: str | Path, skip: Sequence[str] = (), option: str = "--pipeline") -> None:
    """Refuse a pipeline folder missing a component its model_index.json lists (each
    non-null [library, class] entry is a subfolder), naming every missing one."""
    index = read_model_index(folder, option)
    missing = [
        name
        for name, entry in index.items()
        if not name.startswith("_")
        and name not in skip
        and isinstance(entry, list)
        and entry[0] is not None
        and not (Path(folder) / name).is_dir()
    ]
    if missing:
        listed = ", ".join(f"{name}/" for name in missing)
        raise ConfigError(
            f"{option} {folder} lacks {listed} that its {MODEL_INDEX} lists; copy the complete "
            f"pipeline folder (every component its {MODEL_INDEX} names)"
        )


def _check_denoiser(denoiser: torch.nn.Module, family: Family, folder: str | Path) -> None:
    if type(denoiser).__name__ != family.denoiser_class:
        raise ConfigError(
            f"{folder} is a {family.pipeline_class}, whose {family.denoiser} is a "
            f"{family.denoiser_class}, but the denoiser given is a {type(denoiser).__name__}; "
            f"pass the pipeline folder of the model that was trained"
        )


def load_pipeline(
    folder: str | Path,
    denoiser: torch.nn.Module | None,
    dtype: torch.dtype = torch.float32,
    option: str = "--pipeline",
    **components,
):
    """The family's diffusers pipeline from a local folder with `denoiser` in its denoiser
    slot, `components` (name -> module, or None to leave one out) in theirs, and every other
    component loaded from the folder and cast to `dtype` (after loading: the keyword that
    sets it differs between diffusers versions)."""
    family = pipeline_family(folder, option)
    if denoiser is not None:
        _check_denoiser(denoiser, family, folder)
    check_parts(folder, skip=(family.denoiser, *components), option=option)
    diffusers = require("diffusers", option)
    pipeline_class = getattr(diffusers, family.pipeline_class)
    try:
        pipeline = pipeline_class.from_pretrained(
            folder, local_files_only=True, **{**components, family.denoiser: denoiser}
        )
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            f"{option} {folder}: diffusers cannot load this {family.pipeline_class} ({reason}); "
            f"pass a complete pipeline folder"
        ) from None
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module) and name != family.denoiser:
            if any(p.dtype != dtype for p in component.parameters()):  # diffusers warns on any
                component.to(dtype)
    return pipeline


@torch.no_grad()
def sample_with_pipeline(
    pipeline_folder: str | Path,
    denoiser: torch.nn.Module,
    prompts: Sequence[str],
    *,
    steps: int,
    guidance: float,
    seed: int,
    height: int | None = None,
    width: int | None = None,
    device: torch.device | str,
    negative_prompt: str | None = None,
    latent_size: int | None = None,
    scheduler_config: dict | None = None,
    true_cfg_scale: float = 1.0,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Images [N, 3, height, width] in [-1, 1] of `prompts`, one each, drawn by the folder's
    pipeline (its scheduler, text encoders and VAE, in the denoiser's dtype) with `denoiser` as
    its unet or transformer (moved to `device`). The initial noise comes from a CPU generator
    seeded by `seed`, so a seed draws the same images on any device. `negative_prompt`: what
    classifier-free guidance steers away from (default the pipeline's).

    height, width: the image size in pixels; or `latent_size`, the latent side a run trained at,
    drawn at latent_size x the pipeline's own `vae_scale_factor`. `scheduler_config`
    (fastsp.flow.scheduler_config: the run's process) replaces the folder's scheduler.
    `true_cfg_scale`: Flux's classifier-free guidance against `negative_prompt` (FluxPipeline's
    own, separate from the guidance value); `guidance_rescale`: SD and SDXL's CFG rescale."""
    if (latent_size is None) == (height is None or width is None):
        raise ValueError("sample_with_pipeline takes height and width, or latent_size")
    dtype = next(denoiser.parameters()).dtype
    scheduler = {}
    if scheduler_config is not None:
        diffusers = require("diffusers", "sampling")
        scheduler_class = getattr(diffusers, scheduler_config["_class_name"])
        scheduler = {"scheduler": scheduler_class.from_config(scheduler_config)}
    pipeline = load_pipeline(pipeline_folder, denoiser, dtype=dtype, **scheduler)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    if latent_size is not None:
        height = width = latent_size * pipeline.vae_scale_factor
    options = {}
    if negative_prompt is not None:  # StableDiffusionPipeline takes it only of prompt's type
        options["negative_prompt"] = [negative_prompt] * len(prompts)
    if true_cfg_scale != 1:
        options["true_cfg_scale"] = true_cfg_scale
    if guidance_rescale:
        options["guidance_rescale"] = guidance_rescale
    try:
        images = pipeline(
            prompt=list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
            **options,
        ).images  # [N, 3, H, W] in [0, 1]
    except ValueError as error:  # the pipeline's check_inputs: a size it cannot draw, ...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            f"{type(pipeline).__name__} refuses this request: {reason}; change the option it names"
        ) from None
    if tuple(images.shape[-2:]) != (height, width):  # Flux rounds a size down, with a warning
        raise ConfigError(
            f"{type(pipeline).__name__} draws {images.shape[-2]}x{images.shape[-1]} images, not "
            f"the {height}x{width} asked for; pass a height and width it draws as asked"
        )
    return images.float() * 2 - 1


def export_denoiser(
    denoiser: torch.nn.Module,
    out_dir: str | Path,
    pipeline_folder: str | Path | None = None,
    scheduler_config: dict | None = None,
    pipeline_config: dict | None = None,
) -> Path:
    """Write `denoiser` as a diffusers model folder (its own `save_pretrained`), or, with
    `pipeline_folder`, a complete pipeline folder: that folder's other components copied and
    its denoiser subfolder replaced, which the family's pipeline class loads with
    `from_pretrained(out_dir)`. With `scheduler_config` (fastsp.flow.scheduler_config: the
    process the run trained with), it replaces the pipeline's scheduler/ config and its class in
    model_index.json (or is written as scheduler_config.json beside a model folder, as
    fastsp.export does). `pipeline_config`: entries of the pipeline's own registered config
    (model_index.json) to set, e.g. SDXL's force_zeros_for_empty_prompt.

    out_dir must not exist or be empty; it is assembled in a temporary folder beside it and
    renamed into place, so a failed write leaves nothing of it (a CheckpointWriteError)."""
    from fastsp.diffusers_unet import assembled_beside, check_export_folder

    out = Path(out_dir)
    check_export_folder(out)
    slot = None
    if pipeline_folder is not None:
        family = pipeline_family(pipeline_folder)
        _check_denoiser(denoiser, family, pipeline_folder)
        check_parts(pipeline_folder, skip=(family.denoiser,))
        slot = family.denoiser
        if out.resolve().is_relative_to(Path(pipeline_folder).resolve()):
            raise ConfigError(
                f"{out} is inside the pipeline folder {pipeline_folder}, which the export "
                f"copies; pass a folder outside it"
            )
    with assembled_beside(out) as tmp:
        if pipeline_folder is None:
            denoiser.save_pretrained(tmp)
            scheduler_path = tmp / "scheduler_config.json"
        else:
            root = Path(pipeline_folder)
            shutil.copytree(
                root,
                tmp,
                ignore=lambda d, names: [slot] if Path(d) == root else [],
                dirs_exist_ok=True,
            )
            denoiser.save_pretrained(tmp / slot)
            scheduler_path = tmp / "scheduler" / "scheduler_config.json"
        if scheduler_config is not None:
            scheduler_path.parent.mkdir(exist_ok=True)
            diffusers = require("diffusers", "export")
            config = {**scheduler_config, "_diffusers_version": diffusers.__version__}
            scheduler_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        index = {}
        if scheduler_config is not None and "_class_name" in scheduler_config:
            # the pipeline's from_pretrained builds the class its model_index.json names
            index["scheduler"] = ["diffusers", scheduler_config["_class_name"]]
        if pipeline_folder is not None and (index or pipeline_config):
            index = {**read_model_index(tmp), **index, **(pipeline_config or {})}
            (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


# ---- a `--model diffusers` run: `python -m fastsp.sample` and `python -m fastsp.export` ----------
def run_pipeline_folder(init: str) -> Path | None:
    """The pipeline folder a run started from: its --init when that is a pipeline folder, else
    the one the run or checkpoint its --init names started from, back along the chain of stages
    (each run's config.json records its --init, as given, relative to where it was launched).
    None when the chain ends elsewhere (a model folder, a folder no longer there)."""
    seen = set()
    while init and init not in seen:
        seen.add(init)
        folder = Path(init)
        if (folder / MODEL_INDEX).is_file():
            return folder
        try:
            saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            init = saved["train"]["init"]
        except (OSError, ValueError, KeyError, TypeError):  # not a fastsp run or checkpoint
            return None
    return None


def _run_pipeline(loaded, pipeline: str | None, use: str) -> Path | None:
    """The pipeline folder of a run: `pipeline` (--pipeline) or the run's own
    (run_pipeline_folder), checked to be of the run's family; None when neither."""
    folder = Path(pipeline) if pipeline else run_pipeline_folder(loaded.train_config.init)
    if folder is None:
        return None
    option = "--pipeline" if pipeline else f"the pipeline folder {loaded.checkpoint} started from"
    family = pipeline_family(folder, option)
    trained = loaded.model_config
    if family.name != trained.family:
        raise ConfigError(
            f"{option} {folder} is a {family.pipeline_class} ({family.name}) but "
            f"{loaded.checkpoint} trained a {trained.family} {trained.class_name}; pass the "
            f"{trained.family} pipeline folder to {use} it with"
        )
    return folder


def sample_run(
    loaded,
    prompt: str,
    *,
    num: int,
    steps: int,
    cfg: float,
    cfg_rescale: float,
    guidance: float | None,
    seed: int,
    device: str,
    negative_prompt: str | None = None,
    pipeline: str | None = None,
) -> torch.Tensor:
    """`num` images [num, 3, H, W] in [-1, 1] of `prompt` from a `--model diffusers` run
    (`loaded`: fastsp.checkpoint.load_model's), drawn by sample_with_pipeline with the run's
    denoiser, the run's process as the scheduler (fastsp.flow.scheduler_config) and its latent
    size, through `pipeline` or the pipeline folder the run started from.

    `cfg` is classifier-free guidance for every family, against `negative_prompt` or the empty
    prompt (the null condition CFG dropout trains): SD, SDXL and SD3's guidance_scale, Flux's
    true_cfg_scale. `guidance` is Flux's guidance value, the transformer's input (default the
    value the run trained at, its --guidance); `cfg_rescale` is SD and SDXL's guidance_rescale."""
    from fastsp.flow import scheduler_config

    trained = loaded.model_config
    flux = trained.family == "flux"
    guidance_embeds = flux and trained.diffusers.get("guidance_embeds", False)
    if guidance is not None and not guidance_embeds:
        raise ConfigError(
            f"--guidance is the guidance value a guidance-distilled Flux transformer takes; this "
            f"{trained.family} {trained.class_name} takes none: drop it (--cfg is its guidance)"
        )
    if cfg_rescale and trained.family in ("sd3", "flux"):
        raise ConfigError(f"--cfg-rescale: the {trained.family} pipeline has no guidance rescale")
    folder = _run_pipeline(loaded, pipeline, "sample")
    if folder is None:
        raise ConfigError(
            f"{loaded.checkpoint} did not start from a pipeline folder (its --init chain ends at "
            f"a model folder or a folder no longer there); pass --pipeline FOLDER, the "
            f"{trained.family} pipeline whose text encoders, VAE and tokenizers sample it"
        )
    if cfg != 1 and negative_prompt is None:
        negative_prompt = ""  # the null condition CFG dropout trains
    return sample_with_pipeline(
        folder,
        loaded.model.denoiser,
        [prompt] * num,
        steps=steps,
        guidance=(trained.guidance if guidance is None else guidance) if flux else cfg,
        true_cfg_scale=cfg if flux else 1.0,
        guidance_rescale=cfg_rescale,
        seed=seed,
        latent_size=loaded.train_config.resolution,
        device=device,
        negative_prompt=negative_prompt,
        scheduler_config=scheduler_config(loaded.train_config),
    )


def export_run(
    loaded, out_dir: str | Path, pipeline: str | None = None, model_only: bool = False
) -> Path:
    """Write a `--model diffusers` run's denoiser (`loaded`: fastsp.checkpoint.load_model's) with
    export_denoiser and the run's process as its scheduler: a whole pipeline folder of `pipeline`
    or, by default, of the pipeline folder the run started from; a model folder with
    `model_only` or when the run did not start from one."""
    from fastsp.flow import scheduler_config

    if model_only and pipeline:
        raise ConfigError("--model-only writes the denoiser alone: drop --pipeline or it")
    folder = None if model_only else _run_pipeline(loaded, pipeline, "export")
    # SDXLPipeline's null condition is zeros unless told otherwise; the run's CFG dropout
    # trained encode_prompt(""), the negative prompt fastsp.sample uses
    sdxl = {"force_zeros_for_empty_prompt": False} if loaded.model_config.family == "sdxl" else {}
    return export_denoiser(
        loaded.model.denoiser,
        out_dir,
        pipeline_folder=folder,
        scheduler_config=scheduler_config(loaded.train_config),
        pipeline_config=sdxl,
    )
