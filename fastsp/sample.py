"""Sampling: image grids from a model, and the sampling command line.

python -m fastsp.sample --checkpoint runs/digits --num 64 --steps 50 --out grid.png
python -m fastsp.sample --checkpoint runs/digits --cfg 7.5 --cfg-rescale 0.7 --label 3 \
        --out threes.png
python -m fastsp.sample --checkpoint runs/sd21_sp --prompt "a photo of a cat" --num 4 \
        --vae SD/vae --text-encoder SD/text_encoder --out cats.png

With --prompt (a model trained with --cond context on text embeddings) the prompt is encoded by
the local CLIP text encoder, the model samples latents, and the local VAE decodes them to RGB;
diffusers and transformers come with the `sd` extra (`pip install -e ".[sd]"`).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import struct
import sys
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fastsp import checkpoint as checkpoint_lib
from fastsp.config_fields import SAMPLERS
from fastsp.diffusion import NoiseSchedule, sample
from fastsp.errors import CheckpointError, ConfigError
from fastsp.run_folder import check_output_file
from fastsp.unet import UNet


def schedule_from_config(train: dict) -> NoiseSchedule:
    return NoiseSchedule(
        beta_schedule=train["beta_schedule"],
        num_timesteps=train["num_timesteps"],
        beta_start=train["beta_start"],
        beta_end=train["beta_end"],
        zero_terminal_snr=train["zero_terminal_snr"],
        prediction_type=train["prediction_type"],
    )


def check_guidance(guidance_scale: float, conditional: bool) -> None:
    """Guidance contrasts the condition with the null one: refuse it for an unconditional model
    (a ConfigError, so a ValueError)."""
    if guidance_scale != 1 and not conditional:
        raise ConfigError(
            "classifier-free guidance needs a conditional model (this one is unconditional); "
            "use --cfg 1"
        )


@torch.no_grad()
def generate(
    model: UNet,
    schedule: NoiseSchedule,
    num: int,
    shape: tuple[int, int, int],
    labels: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    num_steps: int = 50,
    sampler: str = "ddim",
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    null_context: torch.Tensor | None = None,
) -> torch.Tensor:
    """`num` samples [num, *shape] in [-1, 1], for `labels` [num] and/or `context` [num, L, D].

    Guidance (guidance_scale != 1) contrasts the given labels / context with the null label /
    `null_context` ([L, D], [1, L, D] or [num, L, D]: the empty or negative prompt's embedding;
    default a zero context). The starting noise comes from a CPU generator seeded with `seed`, so
    a grid is the same on every device.
    """
    check_guidance(guidance_scale, conditional=labels is not None or context is not None)
    noise = torch.randn((num, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    labels = labels.to(device) if labels is not None else None
    context = context.to(device) if context is not None else None
    null_labels = torch.full_like(labels, model.config.num_classes) if labels is not None else None
    if context is not None and null_context is not None:
        null_context = null_context.to(device, context.dtype).expand_as(context)
    elif context is not None:
        null_context = torch.zeros_like(context)

    def model_fn(x, t):
        return model(x, t, labels=labels, context=context).float()

    def uncond_model_fn(x, t):
        return model(x, t, labels=null_labels, context=null_context).float()

    images = sample(
        model_fn,
        schedule,
        noise,
        num_steps=num_steps,
        sampler=sampler,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        uncond_model_fn=uncond_model_fn if guidance_scale != 1 else None,
    )
    return images.clamp(-1, 1)


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 1) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [rows*(H+p)+p, cols*(W+p)+p, C] with C in {1, 3}."""
    n, c, h, w = images.shape
    if c not in (1, 3):
        images, c = images[:, :3] if c > 3 else images[:, :1], 3 if c > 3 else 1
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    pixels = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    grid = torch.zeros(
        (rows * (h + padding) + padding, columns * (w + padding) + padding, c), dtype=torch.uint8
    )
    for i in range(n):
        top, left = (
            padding + (i // columns) * (h + padding),
            padding + (i % columns) * (w + padding),
        )
        grid[top : top + h, left : left + w] = pixels[i].permute(1, 2, 0)
    return grid.numpy()


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> None:
    """Write a uint8 HWC array as PNG atomically, enlarged `scale` times (nearest neighbour)."""
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_lib.atomic_write_bytes(path, buffer.getvalue())


def display_scale(resolution: int) -> int:
    """Small images are enlarged in PNGs so 16x16 digits are visible."""
    return max(1, 128 // resolution)


def default_labels(
    num: int, num_classes: int, label: int | None = None, start: int = 0
) -> torch.Tensor | None:
    """Labels long [num] on the CPU of samples start..start+num-1: `label` for every sample, or
    (default) cycling through the classes, `arange(start, start + num) % num_classes`; None for
    an unconditional model (num_classes <= 0)."""
    if num_classes <= 0:
        return None
    if label is not None:
        return torch.full((num,), label, dtype=torch.long)
    return torch.arange(start, start + num) % num_classes


def batch_seed(seed: int, batch: int) -> int:
    """The noise seed of batch `batch` of a sampling run with `seed`."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def generate_batches(
    model: UNet,
    schedule: NoiseSchedule,
    num: int,
    shape,
    *,
    batch_size: int,
    label: int | None = None,
    seed: int = 0,
    **options,
):
    """`num` samples as batches of at most `batch_size`, each yielded as [n, *shape] float32 on
    the CPU, in order: what `python -m fastsp.sample` and `fastsp.evaluate` draw, in memory
    bounded by the batch whatever `num` is. Batch b starts from noise seeded by
    `batch_seed(seed, b)` and holds the `default_labels` of its indices; `options` go to
    `generate` (num_steps, sampler, guidance_scale, guidance_rescale, device)."""
    for b, start in enumerate(range(0, num, batch_size)):
        n = min(batch_size, num - start)
        labels = default_labels(n, model.config.num_classes, label, start=start)
        images = generate(
            model, schedule, n, shape, labels=labels, seed=batch_seed(seed, b), **options
        )
        yield images.float().cpu()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


class GridWriter:
    """A grid PNG of `num` images written one row of cells at a time, so a grid of any size
    takes the memory of one row: the pixels of `save_png(image_grid(all images), path, scale)`.

    Use as a context manager; `add` takes images [n, C, H, W] in [-1, 1] in order. The file is
    written beside `path` under a temporary name and renamed when complete (never half a grid).
    """

    def __init__(self, path, num: int, channels: int, size: int, scale: int = 1, padding: int = 1):
        self.path, self.num, self.scale, self.padding = Path(path), num, scale, padding
        self.columns = math.ceil(math.sqrt(num))
        rows = math.ceil(num / self.columns)
        self.channels = channels if channels in (1, 3) else (3 if channels > 3 else 1)
        width = (self.columns * (size + padding) + padding) * scale
        height = (rows * (size + padding) + padding) * scale
        self.pending: list[torch.Tensor] = []  # images of the row of cells being filled
        self.pending_count = self.written = 0
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.file = None
        self.compress = zlib.compressobj(6)
        self.header = b"\x89PNG\r\n\x1a\n" + _png_chunk(
            b"IHDR",
            struct.pack(">IIBBBBB", width, height, 8, 0 if self.channels == 1 else 2, 0, 0, 0),
        )

    def __enter__(self) -> GridWriter:
        self.file = open(self.tmp, "wb")
        self.file.write(self.header)
        return self

    def add(self, images: torch.Tensor) -> None:
        while len(images):
            take = self.columns - self.pending_count
            self.pending.append(images[:take])
            self.pending_count += len(images[:take])
            images = images[take:]
            if self.pending_count == self.columns:
                self._write_row()

    def _write_row(self) -> None:
        cells = image_grid(torch.cat(self.pending), columns=self.columns, padding=self.padding)
        if self.written:  # the row above already wrote the padding between them
            cells = cells[self.padding :]
        if self.scale > 1:  # nearest neighbour, as PIL's NEAREST resize by a whole factor
            cells = cells.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        lines = cells.reshape(len(cells), -1)
        filtered = np.concatenate([np.zeros((len(lines), 1), np.uint8), lines], axis=1)
        self.file.write(_png_chunk(b"IDAT", self.compress.compress(filtered.tobytes())))
        self.written += self.pending_count
        self.pending, self.pending_count = [], 0

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                if self.pending_count:
                    self._write_row()
                if self.written != self.num:
                    raise ValueError(f"the grid holds {self.num} images, {self.written} were added")
                self.file.write(_png_chunk(b"IDAT", self.compress.flush()))
                self.file.write(_png_chunk(b"IEND", b""))
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if kind is None:
                os.replace(self.tmp, self.path)
        finally:
            self.file.close()
            self.tmp.unlink(missing_ok=True)


_MAX_GRID_SIDE = 4096


def grid_scale(resolution: int, num: int, padding: int = 1) -> int:
    """`display_scale`, lowered for big grids so that their side stays within
    `_MAX_GRID_SIDE` pixels where it can (a grid of a million digits is 9,001 pixels wide)."""
    side = math.ceil(math.sqrt(num)) * (resolution + padding) + padding
    return max(1, min(display_scale(resolution), _MAX_GRID_SIDE // side))


DEFAULT_NUM = 64  # a grid
DEFAULT_PROMPT_NUM = 4  # full-size decoded images cost far more than a grid of digits
DEFAULT_BATCH = 64


def check_sampling(args: argparse.Namespace) -> None:
    """The sampling options `python -m fastsp.sample` and `fastsp.evaluate` share (--num,
    --steps, --batch-size, --cfg, --cfg-rescale), refused with one ConfigError line before any
    checkpoint is read; a NaN guidance scale would sample black images without a word."""
    too_few = [args.num, args.steps, args.batch_size]  # num and batch_size: None is the default
    if any(value is not None and value < 1 for value in too_few):
        raise ConfigError("--num, --steps and --batch-size must be >= 1")
    if not (math.isfinite(args.cfg) and args.cfg >= 0):
        raise ConfigError(f"--cfg must be a finite number >= 0 (1 = no guidance), got {args.cfg:g}")
    if not 0 <= args.cfg_rescale <= 1:  # NaN is not in [0, 1] either
        raise ConfigError(f"--cfg-rescale must be in [0, 1], got {args.cfg_rescale:g}")


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
    parser.add_argument("--sampler", default="ddim", choices=SAMPLERS)
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
    return parser


# the options only prompt sampling reads: refused without --prompt rather than ignored
_PROMPT_OPTIONS = ("negative_prompt", "vae", "text_encoder", "tokenizer")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse contradictory or incomplete options, and an --out that cannot be written, with a
    one-line ConfigError."""
    check_sampling(args)
    check_output_file(args.out)  # an existing folder, under a file, read-only, too long
    if args.prompt is None:
        given = [f"--{name.replace('_', '-')}" for name in _PROMPT_OPTIONS if getattr(args, name)]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to prompt sampling; pass --prompt")
        return
    missing = [option for option in ("vae", "text_encoder") if getattr(args, option) is None]
    if missing:
        names = " and ".join(f"--{name.replace('_', '-')}" for name in missing)
        raise ConfigError(
            f"--prompt needs {names}: the local folders of the text encoder that made the "
            "training context and of the VAE that decodes the latents (or a pipeline folder)"
        )
    if args.negative_prompt is not None and args.cfg == 1:
        raise ConfigError("--negative-prompt is only used by guidance; pass --cfg > 1 with it")
    if args.batch_size is not None:
        raise ConfigError(
            "--batch-size applies to grids; prompt sampling draws its --num full-size images "
            f"(default {DEFAULT_PROMPT_NUM}) at once: drop --batch-size"
        )


def sample_grid(args: argparse.Namespace, model: UNet, config: dict) -> None:
    """A grid of `--num` samples of a class-conditional or unconditional model."""
    num_classes = model.config.num_classes
    if args.label is not None and num_classes == 0:
        raise ConfigError(
            "--label needs a class-conditional model; this one is unconditional, drop --label"
        )
    if args.label is not None and not 0 <= args.label < num_classes:
        raise ConfigError(
            f"--label {args.label} is not a class of this model: use 0..{num_classes - 1}"
        )
    if model.config.context_dim > 0:
        raise ConfigError(
            "this model is conditioned on a context sequence; sample it with --prompt (and "
            "--vae, --text-encoder) when that context is a text embedding"
        )
    check_guidance(args.cfg, conditional=num_classes > 0)  # before the grid's file is opened
    resolution = config["train"]["resolution"]
    shape = (model.config.in_channels, resolution, resolution)
    batches = generate_batches(
        model,
        schedule_from_config(config["train"]),
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


def sample_prompt(args: argparse.Namespace, model: UNet, config: dict) -> None:
    """`--num` RGB images of `--prompt`: one image as itself, several as a grid, full size.

    The unconditional branch of guidance is the negative prompt's embedding, or the empty
    prompt's: Stable Diffusion (and fastsp's CFG dropout on prepared shards) trains its null
    context as the encoding of "" by the same text encoder.
    """
    from fastsp import sd_components  # diffusers and transformers only for prompts

    if model.config.context_dim == 0:
        raise ConfigError(
            f"--prompt needs a model trained with --cond context on text embeddings; "
            f"{args.checkpoint} has no cross-attention (context_dim 0): drop --prompt"
        )
    tokenizer, encoder = sd_components.load_text_encoder(
        args.text_encoder, args.tokenizer, device=args.device
    )
    hidden = encoder.config.hidden_size
    if hidden != model.config.context_dim:
        raise ConfigError(
            f"--text-encoder {args.text_encoder} encodes to {hidden} dimensions but the model's "
            f"context_dim is {model.config.context_dim}; pass the text encoder it was trained with"
        )
    vae = sd_components.load_vae(args.vae, device=args.device)
    latent_channels = vae.config.latent_channels
    if latent_channels != model.config.in_channels:
        raise ConfigError(
            f"--vae {args.vae} has {latent_channels} latent channels but the model takes "
            f"{model.config.in_channels}; pass the VAE whose latents it was trained on"
        )
    context = sd_components.encode_text(tokenizer, encoder, [args.prompt])
    null_context = None
    if args.cfg != 1:
        null_context = sd_components.encode_text(tokenizer, encoder, [args.negative_prompt or ""])
    train = config["train"]
    labels = default_labels(args.num, model.config.num_classes, args.label)
    latents = generate(
        model,
        schedule_from_config(train),
        args.num,
        (model.config.in_channels, train["resolution"], train["resolution"]),
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        if args.num is None:
            args.num = DEFAULT_NUM if args.prompt is None else DEFAULT_PROMPT_NUM
        if args.batch_size is None:
            args.batch_size = DEFAULT_BATCH
        model, config = checkpoint_lib.load_model(
            args.checkpoint, weights=args.weights, device=args.device
        )
        if args.prompt is None:
            sample_grid(args, model, config)
        else:
            sample_prompt(args, model, config)
    except (ValueError, CheckpointError) as error:  # ConfigError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # found only when writing (a full disk): nothing half-written
        print(f"error: cannot write {args.out}: {error.strerror or error}", file=sys.stderr)
        return 4
    print(f"wrote {args.num} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
