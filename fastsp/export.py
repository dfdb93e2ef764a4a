"""Export a fastsp checkpoint as a diffusers UNet folder (or, for a DiT, a transformer folder).

    python -m fastsp.export --checkpoint runs/sd21 --to-diffusers out/unet [--weights ema|model]

--checkpoint takes a checkpoint folder or a run folder (its latest complete checkpoint). OUT gets
config.json and diffusion_pytorch_model.safetensors (fp32), which
`diffusers.UNet2DConditionModel.from_pretrained(OUT)` loads without options, and
scheduler_config.json, the scheduler that samples the model as fastsp does
(fastsp.flow.scheduler_config: DDIMScheduler for DDPM, FlowMatchEulerDiscreteScheduler with the
run's shift for flow), which that class's from_pretrained(OUT) loads. Drop OUT into a pipeline
folder as its unet/ (scheduler_config.json as its scheduler/). A DiT checkpoint (a dit_*
preset) becomes a `diffusers.DiTTransformer2DModel` folder instead (fastsp.dit_diffusers), a
DiTPipeline's transformer/. The folder is written atomically; OUT must not exist or be empty,
which is checked before the checkpoint is read. A DiT's exported sample_size is its input_size:
diffusers' DiT scales its position grid to sample_size, so only that size gives the positions it
was trained with; a DiT trained at another resolution is exported so, and the command says how
to sample it.
Exit status (fastsp.cli): 0 written; 2 invalid input (a missing or damaged checkpoint, a model
diffusers cannot express, an OUT that is not new or empty or cannot be written); 4 a write that
failed (a full disk; nothing of OUT is left), with a one-line message.

A `--model diffusers` run (SD, SDXL, SD3, Flux: fastsp.family_pipelines.export_run) is written
as a whole pipeline folder, the pipeline folder it started from (or --pipeline FOLDER) with its
unet/ or transformer/ replaced by the run's and its scheduler/ by the run's process, which the
family's pipeline class (StableDiffusionXLPipeline, ...) loads with from_pretrained(OUT); with
--model-only, or when the run did not start from a pipeline folder, as the denoiser's own model
folder (plus scheduler_config.json).

    python -m fastsp.export --checkpoint runs/flux_sp --to-diffusers out/flux [--pipeline FLUX]

A LoRA run's checkpoint (--lora-rank) is written as its adapter alone, OUT/pytorch_lora_weights.
safetensors in the diffusers LoRA format that the pipeline's `load_lora_weights(OUT)` loads onto
the base denoiser (fastsp.lora: a Stable Diffusion pipeline for a fastsp UNet; the family's
pipeline for a `--model diffusers` run, StableDiffusionXLPipeline, FluxPipeline, ...); with
--merge, as the full network with the adapters merged into its weights, as any other checkpoint
(a family run's: a pipeline folder, or with --model-only its model folder).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from pathlib import Path

from fastsp import checkpoint as checkpoint_lib
from fastsp.cli import run_command
from fastsp.diffusers_unet import check_export_folder, export_to_diffusers
from fastsp.dit import DiT
from fastsp.dit_diffusers import export_dit
from fastsp.errors import ConfigError
from fastsp.family_config import DiffusersConfig
from fastsp.family_pipelines import export_run
from fastsp.flow import scheduler_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastsp.export",
        description="Write a fastsp checkpoint as a diffusers UNet2DConditionModel folder "
        "(a DiT checkpoint: a DiTTransformer2DModel folder).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder, or a run folder (its latest)"
    )
    parser.add_argument(
        "--to-diffusers", required=True, metavar="OUT", help="the folder to write (new or empty)"
    )
    parser.add_argument(
        "--weights",
        choices=("ema", "model"),
        default="ema",
        help="the EMA weights (default) or the online model's",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA checkpoint: write the full weights with the adapters merged, not the adapter",
    )
    parser.add_argument(
        "--pipeline",
        default=None,
        help="a --model diffusers run: the pipeline folder to write the run into (default: the "
        "one the run started from)",
    )
    parser.add_argument(
        "--model-only",
        action="store_true",
        help="a --model diffusers run: write its denoiser's model folder, not a pipeline folder",
    )
    return parser


def export(args: argparse.Namespace) -> None:
    check_export_folder(args.to_diffusers)  # before the checkpoint is read
    loaded = checkpoint_lib.load_model(args.checkpoint, weights=args.weights, merge=args.merge)
    model = loaded.model
    scheduler = scheduler_config(loaded.train_config)  # the process the run trained with
    family_run = isinstance(loaded.model_config, DiffusersConfig)
    if not family_run and (args.pipeline or args.model_only):
        given = " and ".join(
            f for f, v in (("--pipeline", args.pipeline), ("--model-only", args.model_only)) if v
        )
        raise ConfigError(
            f"{given}: for --model diffusers runs; {args.checkpoint} is a fastsp model, exported "
            "as a diffusers model folder: drop it"
        )
    lora_run = loaded.train_config.lora_rank > 0
    if args.merge and not lora_run:
        raise ConfigError(
            f"--merge merges LoRA adapters, but {loaded.checkpoint} is a full fine-tune "
            "(--lora-rank 0); drop --merge"
        )
    if lora_run and not args.merge:
        if args.pipeline or args.model_only:
            raise ConfigError(
                f"{'--pipeline' if args.pipeline else '--model-only'}: {loaded.checkpoint} is a "
                "LoRA run, exported as its adapter alone (the family pipeline's "
                "load_lora_weights loads it); drop it, or pass --merge to write the merged model"
            )
        out = export_lora(loaded, args.to_diffusers)
    elif family_run:  # the full or merged denoiser, in a pipeline folder or alone
        out = export_run(loaded, args.to_diffusers, args.pipeline, args.model_only)
    elif isinstance(model, DiT):  # its sample_size is the config's input_size
        out = export_dit(model, args.to_diffusers, scheduler_config=scheduler)
        trained, size = loaded.train_config.resolution, model.config.input_size
        if trained != size:
            print(
                f"note: this DiT trained on {trained}x{trained} latents, but diffusers' "
                f"DiTTransformer2DModel ties its position grid to sample_size, so {out} has "
                f"sample_size {size} (its input_size; another value would change the model) "
                f"and a DiTPipeline generates {size}x{size}: call the transformer on "
                f"{trained}x{trained} latents, which it computes as fastsp does",
                file=sys.stderr,
            )
    else:
        # The latent size the model was trained at: the pipelines' default generation size.
        resolution = loaded.train_config.resolution
        out = export_to_diffusers(
            model, args.to_diffusers, sample_size=resolution, scheduler_config=scheduler
        )
    print(f"wrote the {args.weights} weights of {args.checkpoint} to {out}")


def export_lora(loaded: checkpoint_lib.LoadedModel, out_dir: str) -> Path:
    """The adapter of a LoRA UNet or family model as OUT/pytorch_lora_weights.safetensors,
    written by diffusers' own LoRA writer into a temporary folder beside OUT and renamed into
    place."""
    if isinstance(loaded.model, DiT):
        raise ConfigError(
            "diffusers' DiTPipeline loads no LoRA adapters; pass --merge to export the DiT with "
            "its adapters merged"
        )
    from fastsp import lora

    out = Path(out_dir)  # new or empty: check_export_folder
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        lora.save_diffusers_lora(loaded.model, loaded.train_config, tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / lora.LORA_WEIGHTS_NAME


def main(argv: list[str] | None = None) -> int:
    return run_command(
        export, build_parser().parse_args(argv), rerun="nothing was exported; rerun the command"
    )


if __name__ == "__main__":
    sys.exit(main())
