"""The sampling command: an image grid, or images of a prompt, from a checkpoint.

python -m fastsp.sample --checkpoint runs/digits --num 64 --steps 50 --out grid.png
python -m fastsp.sample --checkpoint runs/digits --cfg 7.5 --cfg-rescale 0.7 --label 3 \
        --out threes.png
python -m fastsp.sample --checkpoint runs/sd21_sp --prompt "a photo of a cat" --num 4 \
        --vae SD/vae --text-encoder SD/text_encoder --out cats.png
python -m fastsp.sample --checkpoint runs/sdxl_sp --prompt "a photo of a cat" --num 4 \
        [--pipeline SDXL] --out cats.png

With --prompt (a model trained with --cond context on text embeddings) the prompt is encoded by
the local CLIP text encoder, the model samples latents, and the local VAE decodes them to RGB;
diffusers and transformers come with the `sd` extra (`pip install -e ".[sd]"`). A `--model
diffusers` run (SD, SDXL, SD3, Flux) is drawn by its family's diffusers pipeline instead, from
--pipeline or the pipeline folder the run started from, with the run's scheduler
(fastsp.family_pipelines.sample_run). The drawing and the PNG grids are fastsp.sampling's; this
module reads and checks the command line.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from fastsp.checkpoint import LoadedModel, load_model
from fastsp.cli import error_status
from fastsp.config_fields import SAMPLERS
from fastsp.errors import CheckpointError, ConfigError
from fastsp.family_config import DiffusersConfig
from fastsp.flow import process_from_config
from fastsp.run_folder import check_output_file
from fastsp.sampling import (
    GridWriter,
    check_guidance,
    check_sampling,
    default_labels,
    generate,
    generate_batches,
    grid_scale,
    image_grid,
    save_png,
)

DEFAULT_NUM = 64  # a grid
DEFAULT_PROMPT_NUM = 4  # full-size decoded images cost far more than a grid of digits
DEFAULT_BATCH = 64


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastsp.sample", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder, or a run folder (its latest checkpoint)",
    )
    parser.add_argument(
        "--num",
        type=int,
        default=None,
        help=f"number of images (default {DEFAULT_NUM}, {DEFAULT_PROMPT_NUM} with --prompt)",
    )
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"grid images sampled at once (default {DEFAULT_BATCH}); any --num runs in the "
        "memory of one batch, and batch b starts from noise seeded by (--seed, b)",
    )
    parser.add_argument(
        "--sampler", default=None, choices=SAMPLERS, help="fastsp's sampler (default ddim)"
    )
    parser.add_argument(
        "--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)"
    )
    parser.add_argument("--cfg-rescale", type=float, default=0.0, help="CFG rescale phi in [0, 1]")
    parser.add_argument(
        "--label", type=int, default=None, help="class of every sample (default: cycle classes)"
    )
    parser.add_argument(
        "--weights", default="ema", choices=("ema", "model"), help="EMA (default) or online weights"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", required=True, help="output PNG path")
    text = parser.add_argument_group("prompt sampling (a model trained on text embeddings)")
    text.add_argument("--prompt", default=None, help="the text every image is sampled for")
    text.add_argument(
        "--negative-prompt",
        default=None,
        help="what guidance steers away from (needs --cfg > 1; default the empty prompt)",
    )
    text.add_argument("--vae", default=None, help="local VAE folder (or pipeline folder)")
    text.add_argument(
        "--text-encoder", default=None, help="local CLIP text encoder folder (or pipeline folder)"
    )
    text.add_argument(
        "--tokenizer", default=None, help="local tokenizer folder (default: beside the encoder)"
    )
    family = parser.add_argument_group("prompt sampling of a --model diffusers run")
    family.add_argument(
        "--pipeline",
        default=None,
        help="the diffusers pipeline folder that draws it (default: the one the run started from)",
    )
    family.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="Flux: the guidance value the transformer takes (default the run's --guidance)",
    )
    return parser


# the options only prompt sampling reads: refused without --prompt rather than ignored
_PROMPT_OPTIONS = ("negative_prompt", "vae", "text_encoder", "tokenizer", "pipeline", "guidance")
# the options of fastsp's own prompt sampling, which a diffusers run's pipeline replaces
_FASTSP_PROMPT_OPTIONS = ("vae", "text_encoder", "tokenizer", "sampler")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse contradictory or incomplete options, and an --out that cannot be written, with a
    one-line ConfigError."""
    check_sampling(args)
    check_output_file(args.out)  # an existing folder, under a file, read-only, too long
    if Path(args.out).suffix.lower() != ".png":
        raise ConfigError(
            f"--out {args.out}: sample writes PNG images; pass a path ending in .png (convert "
            "it afterwards for another format)"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was requested but torch sees no CUDA GPU; use --device cpu"
        )
    if args.prompt is None:
        given = [_flag(name) for name in _PROMPT_OPTIONS if getattr(args, name) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to prompt sampling; pass --prompt")
        return
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise ConfigError(f"--guidance must be a finite number >= 0, got {args.guidance:g}")
    if args.negative_prompt is not None and args.cfg == 1:
        raise ConfigError("--negative-prompt is only used by guidance; pass --cfg > 1 with it")
    if args.batch_size is not None:
        raise ConfigError(
            "--batch-size applies to grids; prompt sampling draws its --num full-size images "
            f"(default {DEFAULT_PROMPT_NUM}) at once: drop --batch-size"
        )


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check_label(label: int | None, num_classes: int) -> None:
    """Refuse a --label the model has no class for (grids and prompts alike: never ignored)."""
    if label is not None and num_classes == 0:
        raise ConfigError(
            "--label needs a class-conditional model; this one has no classes (num_classes 0), "
            "drop --label"
        )
    if label is not None and not 0 <= label < num_classes:
        raise ConfigError(f"--label {label} is not a class of this model: use 0..{num_classes - 1}")


def sample_grid(args: argparse.Namespace, loaded: LoadedModel) -> None:
    """A grid of `--num` samples of a class-conditional or unconditional model."""
    model_config = loaded.model_config
    num_classes = model_config.num_classes
    check_label(args.label, num_classes)
    if model_config.context_dim > 0:
        raise ConfigError(
            "this model is conditioned on a context sequence; sample it with --prompt (and "
            "--vae, --text-encoder) when that context is a text embedding"
        )
    check_guidance(args.cfg, conditional=num_classes > 0)  # before the grid's file is opened
    resolution = loaded.train_config.resolution
    shape = (model_config.in_channels, resolution, resolution)
    batches = generate_batches(
        loaded.model,
        process_from_config(loaded.train_config),
        args.num,
        shape,
        batch_size=args.batch_size,
        label=args.label,
        seed=args.seed,
        num_steps=args.steps,
        sampler=args.sampler,
        guidance_scale=args.cfg,
        guidance_rescale=args.cfg_rescale,
        device=args.device,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    scale = grid_scale(resolution, args.num)
    with (
        GridWriter(args.out, args.num, shape[0], resolution, scale) as grid,
        tqdm(total=args.num, unit="image", desc="sampling", file=sys.stderr) as progress,
    ):
        for images in batches:
            grid.add(images)
            progress.update(len(images))


def sample_prompt(args: argparse.Namespace, loaded: LoadedModel) -> None:
    """`--num` RGB images of `--prompt`: one image as itself, several as a grid, full size.

    The unconditional branch of guidance is the negative prompt's embedding, or the empty
    prompt's: Stable Diffusion (and fastsp's CFG dropout on prepared shards) trains its null
    context as the encoding of "" by the same text encoder.
    """
    from fastsp import sd_components  # diffusers and transformers only for prompts

    model_config = loaded.model_config
    given = [_flag(name) for name in ("pipeline", "guidance") if getattr(args, name) is not None]
    if given:
        raise ConfigError(
            f"{', '.join(given)} apply to --model diffusers runs; {args.checkpoint} is a fastsp "
            "model: drop them (--vae and --text-encoder give its encoders)"
        )
    missing = [option for option in ("vae", "text_encoder") if getattr(args, option) is None]
    if missing:
        raise ConfigError(
            f"--prompt needs {' and '.join(map(_flag, missing))}: the local folders of the text "
            "encoder that made the training context and of the VAE that decodes the latents "
            "(or a pipeline folder)"
        )
    if model_config.context_dim == 0:
        raise ConfigError(
            f"--prompt needs a model trained with --cond context on text embeddings; "
            f"{args.checkpoint} has no cross-attention (context_dim 0): drop --prompt"
        )
    check_label(args.label, model_config.num_classes)
    tokenizer, encoder = sd_components.load_text_encoder(
        args.text_encoder, args.tokenizer, device=args.device
    )
    hidden = encoder.config.hidden_size
    if hidden != model_config.context_dim:
        raise ConfigError(
            f"--text-encoder {args.text_encoder} encodes to {hidden} dimensions but the model's "
            f"context_dim is {model_config.context_dim}; pass the text encoder it was trained with"
        )
    trained_len = loaded.train_config.context_len
    if tokenizer.model_max_length != trained_len:
        raise ConfigError(
            f"--tokenizer {tokenizer.name_or_path} pads prompts to {tokenizer.model_max_length} "
            f"tokens but the model trained on contexts of {trained_len} (its config.json's "
            "context_len); pass the tokenizer and text encoder it was trained with"
        )
    vae = sd_components.load_vae(args.vae, device=args.device)
    latent_channels = vae.config.latent_channels
    if latent_channels != model_config.in_channels:
        raise ConfigError(
            f"--vae {args.vae} has {latent_channels} latent channels but the model takes "
            f"{model_config.in_channels}; pass the VAE whose latents it was trained on"
        )
    context = sd_components.encode_text(tokenizer, encoder, [args.prompt])
    null_context = None
    if args.cfg != 1:
        null_context = sd_components.encode_text(tokenizer, encoder, [args.negative_prompt or ""])
    resolution = loaded.train_config.resolution
    labels = default_labels(args.num, model_config.num_classes, args.label)
    latents = generate(
        loaded.model,
        process_from_config(loaded.train_config),
        args.num,
        (model_config.in_channels, resolution, resolution),
        labels=labels,
        context=context.expand(args.num, -1, -1),
        num_steps=args.steps,
        sampler=args.sampler,
        guidance_scale=args.cfg,
        guidance_rescale=args.cfg_rescale,
        seed=args.seed,
        device=args.device,
        null_context=null_context,
    )
    images = sd_components.decode_latents(vae, latents)
    save_png(image_grid(images, padding=0 if args.num == 1 else 1), args.out)


def sample_family(args: argparse.Namespace, loaded: LoadedModel) -> None:
    """`--num` images of `--prompt` from a `--model diffusers` run, drawn by its family's
    pipeline (fastsp.family_pipelines.sample_run), written as sample_prompt writes them."""
    from fastsp.family_pipelines import sample_run

    if args.prompt is None:
        raise ConfigError(
            f"{args.checkpoint} is a {loaded.model_config.family} model, sampled from a prompt: "
            "pass --prompt (and --pipeline when the run did not start from a pipeline folder)"
        )
    given = [_flag(name) for name in _FASTSP_PROMPT_OPTIONS if getattr(args, name) is not None]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: a {loaded.model_config.family} run is drawn by its diffusers "
            "pipeline (its encoders, VAE and the run's scheduler); drop them, pass --pipeline"
        )
    check_label(args.label, loaded.model_config.num_classes)
    images = sample_run(
        loaded,
        args.prompt,
        num=args.num,
        steps=args.steps,
        cfg=args.cfg,
        cfg_rescale=args.cfg_rescale,
        guidance=args.guidance,
        seed=args.seed,
        device=args.device,
        negative_prompt=args.negative_prompt,
        pipeline=args.pipeline,
    )
    save_png(image_grid(images, padding=0 if args.num == 1 else 1), args.out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        if args.num is None:
            args.num = DEFAULT_NUM if args.prompt is None else DEFAULT_PROMPT_NUM
        if args.batch_size is None:
            args.batch_size = DEFAULT_BATCH
        loaded = load_model(args.checkpoint, weights=args.weights, device=args.device)
        if isinstance(loaded.model_config, DiffusersConfig):
            sample_family(args, loaded)
        else:
            args.sampler = args.sampler or "ddim"
            (sample_grid if args.prompt is None else sample_prompt)(args, loaded)
    except (ValueError, CheckpointError) as error:  # ConfigError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # found only when writing (a full disk): nothing half-written
        print(f"error: cannot write {args.out}: {error.strerror or error}", file=sys.stderr)
        return 4
    except KeyboardInterrupt as error:
        status, message = error_status(error, f"nothing was written to {args.out}")
        print(message, file=sys.stderr)
        return status
    print(f"wrote {args.num} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
