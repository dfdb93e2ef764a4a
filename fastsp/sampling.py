"""Sampling from a model: noise to images, in batches of bounded memory, and the PNGs they make.

`generate` draws samples of a UNet or a DiT (class labels and/or a context sequence, with or
without classifier-free guidance) with the sampler of the run's process (a `NoiseSchedule` or a
`fastsp.flow.FlowProcess`); `generate_batches` draws any number of them a batch at a time, each
batch from its own seeded noise; `image_grid`, `save_png` and `GridWriter` turn them into PNG
grids (`GridWriter` one row of cells at a time, for grids of any size). The trainer's sample
grids, `python -m fastsp.sample`, `python -m fastsp.evaluate` and the pipeline's comparison all
draw through these functions, so the same seed gives the same images in each.
"""

from __future__ import annotations

import io
import math
import os
import struct
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastsp.checkpoint import atomic_write_bytes
from fastsp.diffusion import NoiseSchedule
from fastsp.errors import ConfigError
from fastsp.flow import FlowProcess


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
    model: torch.nn.Module,
    schedule: NoiseSchedule | FlowProcess,
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
    conditions: dict[str, torch.Tensor] | None = None,
    null_pooled: torch.Tensor | None = None,
) -> torch.Tensor:
    """`num` samples [num, *shape] in [-1, 1], for `labels` [num] and/or `context` [num, L, D]
    (and a diffusers family's `conditions`: pooled [num, P], time_ids [num, 6]).

    Guidance (guidance_scale != 1) contrasts the given labels / context with the null label /
    `null_context` ([L, D], [1, L, D] or [num, L, D]: the empty or negative prompt's embedding;
    default a zero context; `null_pooled` [P] likewise). The starting noise comes from a CPU
    generator seeded with `seed`, so a grid is the same on every device.
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

    conditions = {name: value.to(device) for name, value in (conditions or {}).items()}
    null_conditions = dict(conditions)  # time ids stay; the pooled embedding is the null one's
    if "pooled" in conditions:
        pooled = conditions["pooled"]
        null_conditions["pooled"] = (
            torch.zeros_like(pooled)
            if null_pooled is None
            else null_pooled.to(device, pooled.dtype).expand_as(pooled)
        )

    def model_fn(x, t):
        return model(x, t, labels=labels, context=context, **conditions).float()

    def uncond_model_fn(x, t):
        return model(x, t, labels=null_labels, context=null_context, **null_conditions).float()

    images = schedule.sample(  # the process's sampler: DDIM/Euler, or flow's Euler
        model_fn,
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
    atomic_write_bytes(path, buffer.getvalue())


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
    model: torch.nn.Module,
    schedule: NoiseSchedule | FlowProcess,
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


def check_sampling(args) -> None:
    """The sampling options `python -m fastsp.sample` and `fastsp.evaluate` share (--num,
    --steps, --batch-size, --cfg, --cfg-rescale: the attributes num, steps, batch_size, cfg and
    cfg_rescale of `args`), refused with one ConfigError line before any checkpoint is read; a
    NaN guidance scale would sample black images without a word."""
    too_few = [args.num, args.steps, args.batch_size]  # num and batch_size: None is the default
    if any(value is not None and value < 1 for value in too_few):
        raise ConfigError("--num, --steps and --batch-size must be >= 1")
    if not (math.isfinite(args.cfg) and args.cfg >= 0):
        raise ConfigError(f"--cfg must be a finite number >= 0 (1 = no guidance), got {args.cfg:g}")
    if not 0 <= args.cfg_rescale <= 1:  # NaN is not in [0, 1] either
        raise ConfigError(f"--cfg-rescale must be in [0, 1], got {args.cfg_rescale:g}")
