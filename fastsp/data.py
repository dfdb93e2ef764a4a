"""The data sets: readers for each `--data`, and the item contract they all follow.

Data sets: the built-in 8x8 digits (scikit-learn ships them, so nothing is downloaded), the
built-in letters (fastsp.letters), a folder of images (one subfolder per class,
fastsp.image_folder), a folder of precomputed VAE latent shards (fastsp.latent_shards) and
synthetic noise for benchmarks; `build_dataset` picks the one `--data` names. The order they are
read in (sharding, resume) is fastsp.data_stream's job. Every data set is indexed by a key
`(index, flip)` and returns `{"x": [C, R, R] float32 in [-1, 1], "label": int64 0-d, "bad": int64
0-d, "context": [L, D] (optional)}`.

Bad data (`on_bad_data`, fastsp.data_policy): a file a folder's reader cannot use is found at
construction where it can be. "stop" (the default) raises `DataError` naming the file; "skip"
leaves it out with one `BadDataWarning` naming it, and lists it in the data set's `bad_files`.
An item substituted for one that fails only when read (a truncated image) has `"bad": 1`, so the
trainer can count them (`batch["bad"].sum()`); every other item has `"bad": 0`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fastsp.config_fields import BUILTIN_DATA, DATA_FORMATS, is_int
from fastsp.data_policy import FIX_DATA, check_index, check_policy, split_key
from fastsp.errors import DataError
from fastsp.image_folder import MAX_IMAGE_PIXELS, ImageFolderDataset
from fastsp.latent_shards import LatentsDataset
from fastsp.letters import LettersDataset

DIGITS_HELDOUT = 297  # held-out images of the 1,797; the other 1,500 train
_DIGITS_SPLIT_SEED = 0  # fixed forever: the split must not move with a run's --seed
_SYNTHETIC_ITEMS = 10_000


# ---------------------------------------------------------------------------------------------
# Built-in digits
# ---------------------------------------------------------------------------------------------


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float64 in 0..16, targets [1797] int64): scikit-learn's digits.

    Read straight from the CSV that ships inside scikit-learn (what `load_digits` parses), found
    without importing sklearn: that import costs over a second in every training process, the
    file a hundredth of one. Where a scikit-learn release moves the file, `load_digits` reads it.
    """
    spec = importlib.util.find_spec("sklearn")
    folders = spec.submodule_search_locations if spec is not None else None
    csv = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    table = np.loadtxt(csv, delimiter=",")  # [1797, 65]: 64 pixels, then the digit
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits, upsampled to `resolution`, fixed train/held-out split.

    1,797 images of 10 classes; pixel values 0..16 map linearly to [-1, 1], then bilinear
    (half-pixel centers, no antialias) upsampling 8 -> resolution. The split is a permutation from
    `numpy.random.default_rng(0)`: its first 297 indices are held out, the other 1,500 train.
    The whole split is precomputed as `images` [N, 1, R, R] and `labels` [N]; flip is ignored
    (digits are not mirror-symmetric).
    """

    num_classes = 10
    channels = 1
    has_context = False
    context_shape = None

    def __init__(self, split: str = "train", resolution: int = 16):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if not is_int(resolution) or resolution < 8:
            # A DataError (invalid input, exit 2): --resolution is valid for other data sets.
            raise DataError(
                f"--resolution {resolution!r} is too small for the digits: their images are 8x8 "
                f"and are only ever upsampled; pass --resolution 8 or more (16 is the default)"
            )
        images, targets = load_digit_arrays()
        perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(targets))
        indices = np.sort(perm[:DIGITS_HELDOUT] if split == "heldout" else perm[DIGITS_HELDOUT:])
        pixels = torch.from_numpy(images[indices].astype(np.float32))  # [N, 8, 8], 0..16
        x = (pixels / 8.0 - 1.0).unsqueeze(1)  # [N, 1, 8, 8] in [-1, 1]
        if resolution != 8:
            x = F.interpolate(
                x,
                size=(resolution, resolution),
                mode="bilinear",
                align_corners=False,
                antialias=False,
            )
        self.split = split
        self.resolution = resolution
        self.indices = indices  # rows of load_digits() in this split
        self.images = x.clamp_(-1.0, 1.0).contiguous()  # [N, 1, R, R] float32
        self.labels = torch.from_numpy(targets[indices].astype(np.int64))  # [N]
        self.class_counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index = check_index(split_key(key)[0], len(self))
        return {"x": self.images[index], "label": self.labels[index], "bad": torch.tensor(0)}

    def get_batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """One index op per batch: `index` [B] int64 -> {"x": [B, 1, R, R], "label": [B],
        "bad": [B] zeros}."""
        bad = torch.zeros(index.shape, dtype=torch.int64)
        return {"x": self.images[index], "label": self.labels[index], "bad": bad}


# ---------------------------------------------------------------------------------------------
# Synthetic
# ---------------------------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """Deterministic Gaussian items for benchmarks: item i is drawn from a generator seeded by
    `seed * 1_000_003 + i`; label `i % num_classes` (0 when unlabeled); flip is ignored."""

    def __init__(
        self,
        num_items: int,
        channels: int,
        resolution: int,
        num_classes: int = 0,
        context_len: int = 0,
        context_dim: int = 0,
        seed: int = 0,
        pooled_dim: int = 0,
        time_ids: bool = False,
    ):
        if num_items < 1 or channels < 1 or resolution < 1 or num_classes < 0:
            raise ValueError(
                f"synthetic data needs num_items, channels, resolution >= 1 and num_classes >= 0, "
                f"got {num_items}, {channels}, {resolution}, {num_classes}"
            )
        if (context_len > 0) != (context_dim > 0) or context_len < 0 or context_dim < 0:
            raise ValueError(
                f"context_len and context_dim must both be positive (with context) or both 0, "
                f"got {context_len} and {context_dim}"
            )
        self.num_items = num_items
        self.channels = channels
        self.resolution = resolution
        self.num_classes = num_classes
        self.has_context = context_len > 0
        self.context_shape = (context_len, context_dim) if self.has_context else None
        # a diffusers family's other conditions (fastsp.families): random pooled embeddings, and
        # SDXL's time ids of an uncropped square image 8x the latent side
        self.pooled_dim, self.has_time_ids = pooled_dim, time_ids
        self.seed = seed

    def __len__(self) -> int:
        return self.num_items

    @property
    def class_counts(self) -> list[int]:
        """Items per label 0..num_classes-1: item i has label i % num_classes."""
        n, k = self.num_items, self.num_classes
        return [n // k + (label < n % k) for label in range(k)]

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index = check_index(split_key(key)[0], len(self))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        r = self.resolution
        item = {
            "x": torch.randn(self.channels, r, r, generator=g),
            "label": torch.tensor(index % self.num_classes if self.num_classes else 0),
            "bad": torch.tensor(0),
        }
        if self.has_context:
            item["context"] = torch.randn(self.context_shape, generator=g)
        if self.pooled_dim:
            item["pooled"] = torch.randn(self.pooled_dim, generator=g)
        if self.has_time_ids:
            item["time_ids"] = torch.tensor([8.0 * r, 8.0 * r, 0, 0, 8.0 * r, 8.0 * r])
        return item


# ---------------------------------------------------------------------------------------------
# What a data set holds, said at the start of a run
# ---------------------------------------------------------------------------------------------

_SHOWN_CLASSES = 20  # a data set of 1,000 classes is described by its first 20


def describe_data(dataset, labels: bool = True) -> list[str]:
    """Lines for the start of a run: with `labels` (a class-conditional run), each label with
    its items (and, for an image folder, the subfolder it stands for) and the subfolders that are
    no class, so that what the model learns to call label 3 is never a surprise; and the
    symbolic links left out."""
    counts = (getattr(dataset, "class_counts", None) or []) if labels else []
    names = (getattr(dataset, "class_names", None) or []) if labels else []
    lines = []
    if counts:
        shown = [
            f"{label} = '{names[label]}': {n}" if names else f"{label}: {n}"
            for label, n in enumerate(counts[:_SHOWN_CLASSES])
        ]
        more = len(counts) - _SHOWN_CLASSES
        what = "label = folder: images" if names else "label: items"
        lines.append(
            f"classes ({what}): {', '.join(shown)}"
            + (f", and {more} more classes" if more > 0 else "")
        )
    links = getattr(dataset, "skipped_links", [])
    if links:
        lines.append(
            f"left out {len(links)} symbolic link(s) back into the data folder or in a loop "
            f"(each file counts once, by its real path), e.g. '{links[0]}'"
        )
    empty = getattr(dataset, "empty_folders", [])
    if empty and names:
        lines.append(
            f"not classes (no images inside, so no label): {', '.join(repr(e) for e in empty)}"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------


def build_dataset(
    data: str,
    data_format: str = "auto",
    resolution: int = 16,
    channels: int = 3,
    latent_scale: float = 1.0,
    split: str = "train",
    random_flip: bool = True,
    on_bad_data: str = "stop",
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    *,
    num_classes: int = 0,
    context_len: int = 0,
    context_dim: int = 0,
    seed: int = 0,
    pooled_dim: int = 0,
    time_ids: bool = False,
) -> Dataset:
    """The data set that `--data` names: "digits", "letters", "synthetic" or a folder.

    A folder holding any *.npy or *.safetensors file directly is read as latents, else as images;
    `data_format` forces one. `split` applies to digits and letters only (give a folder of
    held-out images or latents as its own `--data`); `random_flip` and `max_image_pixels` apply
    to image folders (latents never flip here); `on_bad_data` ("stop" or "skip") to folders.
    `num_classes`, `context_len`, `context_dim`, `seed`, `pooled_dim` and `time_ids` (a diffusers
    family's conditions) apply to synthetic only (see
    `SyntheticDataset`): the other data sets get their classes and context from their files.
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    check_policy(on_bad_data)
    fmt = data_format
    if fmt == "auto" and data in BUILTIN_DATA:
        fmt = data
    if fmt in BUILTIN_DATA and data not in (fmt, "", None):
        raise DataError(
            f"data format '{fmt}' is built in and reads no files, but --data is '{data}'; "
            f"pass --data {fmt}, or a different --data-format for the folder"
        )
    if fmt == "digits":
        return DigitsDataset(split, resolution)
    if fmt == "letters":
        return LettersDataset(split, resolution)
    if fmt == "synthetic":
        return SyntheticDataset(
            _SYNTHETIC_ITEMS,
            channels,
            resolution,
            num_classes=num_classes,
            context_len=context_len,
            context_dim=context_dim,
            seed=seed,
            pooled_dim=pooled_dim,
            time_ids=time_ids,
        )

    path = os.fspath(data)
    if not os.path.exists(path):
        raise DataError(f"data folder '{path}' does not exist; {FIX_DATA}")
    if not os.path.isdir(path):
        raise DataError(f"data path '{path}' is a file, not a folder; {FIX_DATA}")
    if fmt == "auto":
        names = os.listdir(path)
        is_latents = any(
            n.endswith((".npy", ".safetensors")) and not n.startswith(".") for n in names
        )
        fmt = "latents" if is_latents else "images"
    if fmt == "latents":
        return LatentsDataset(path, latent_scale=latent_scale, on_bad_data=on_bad_data)
    return ImageFolderDataset(
        path,
        resolution,
        channels=channels,
        random_flip=random_flip,
        on_bad_data=on_bad_data,
        max_image_pixels=max_image_pixels,
    )
