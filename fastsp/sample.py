"""Sampling: image grids from a model, and the sampling command line.

python -m fastsp.sample --checkpoint runs/digits --num 64 --steps 50 --out grid.png
python -m fastsp.sample --checkpoint runs/digits --cfg 7.5 --cfg-rescale 0.7 --label 3 \
        --out threes.png
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastsp import checkpoint as checkpoint_lib
from fastsp.config import SAMPLERS
from fastsp.diffusion import NoiseSchedule, sample
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
) -> torch.Tensor:
    """`num` samples [num, *shape] in [-1, 1], for `labels` [num] and/or `context` [num, L, D].

    Guidance (guidance_scale != 1) contrasts the given labels / context with the null label / a
    zero context. The starting noise comes from a CPU generator seeded with `seed`, so a grid is
    the same on every device.
    """
    if guidance_scale != 1 and labels is None and context is None:
        raise ValueError(
            "classifier-free guidance needs a conditional model (this one is unconditional); "
            "use --cfg 1"
        )
    noise = torch.randn((num, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    labels = labels.to(device) if labels is not None else None
    context = context.to(device) if context is not None else None
    null_labels = torch.full_like(labels, model.config.num_classes) if labels is not None else None
    null_context = torch.zeros_like(context) if context is not None else None

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


def default_labels(num: int, num_classes: int, label: int | None = None) -> torch.Tensor | None:
    """Labels long [num] on the CPU: `label` for every sample, or (default) cycling through the
    classes, `arange(num) % num_classes`; None for an unconditional model (num_classes <= 0)."""
    if num_classes <= 0:
        return None
    if label is not None:
        return torch.full((num,), label, dtype=torch.long)
    return torch.arange(num) % num_classes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastsp.sample", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder, or a run folder (its latest checkpoint)",
    )
    parser.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.num < 1 or args.steps < 1:
            raise ValueError("--num and --steps must be >= 1")
        if not 0 <= args.cfg_rescale <= 1:
            raise ValueError("--cfg-rescale must be in [0, 1]")
        model, config = checkpoint_lib.load_model(
            args.checkpoint, weights=args.weights, device=args.device
        )
        num_classes = model.config.num_classes
        if args.label is not None and num_classes == 0:
            raise ValueError(
                "--label needs a class-conditional model; this one is unconditional, drop --label"
            )
        if args.label is not None and not 0 <= args.label < num_classes:
            raise ValueError(
                f"--label {args.label} is not a class of this model: use 0..{num_classes - 1}"
            )
        if model.config.context_dim > 0:
            raise ValueError(
                "this model is conditioned on a context sequence; sampling it needs your own "
                "context encoder"
            )
        train = config["train"]
        labels = default_labels(args.num, num_classes, args.label)
        shape = (model.config.in_channels, train["resolution"], train["resolution"])
        images = generate(
            model,
            schedule_from_config(train),
            args.num,
            shape,
            labels=labels,
            num_steps=args.steps,
            sampler=args.sampler,
            guidance_scale=args.cfg,
            guidance_rescale=args.cfg_rescale,
            seed=args.seed,
            device=args.device,
        )
        save_png(image_grid(images), args.out, scale=display_scale(train["resolution"]))
    except (ValueError, checkpoint_lib.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.num} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
