"""The data sets: readers for each `--data`, the item contract and the bad-data policy.

Data sets: the built-in 8x8 digits (scikit-learn ships them, so nothing is downloaded), a folder of
images (one subfolder per class), a folder of precomputed VAE latent shards (fastsp.latent_shards)
and synthetic noise for benchmarks; `build_dataset` picks the one `--data` names. The order they
are read in (sharding, resume) is fastsp.data_stream's job. Every data set is indexed by a key
`(index, flip)` and returns `{"x": [C, R, R] float32 in [-1, 1], "label": int64 0-d, "bad": int64
0-d, "context": [L, D] (optional)}`.

Bad data (`on_bad_data`): an image PIL cannot identify, a zero-byte file, one above the pixel limit
(a possible decompression bomb), or a latent shard that is unreadable or disagrees with the others
is found at construction. "stop" (the default) raises `DataError` naming the file; "skip" leaves
it out with one `BadDataWarning` naming it, and lists it in the data set's `bad_files`. An image
that passes the header check but fails to decode (truncated) is found when read: "stop" raises,
"skip" warns once and returns in its place the next index (cyclically) whose file decodes, with
`"bad": 1` so the trainer can count substituted items (`batch["bad"].sum()`); every other item
has `"bad": 0`. The substitute depends only on which files are bad, never on the order they were
read in, so batches stay the same for every run, rank and worker count.
"""

from __future__ import annotations

import collections
import functools
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fastsp.config_fields import BUILTIN_DATA, DATA_FORMATS, is_int
from fastsp.data_policy import (
    FIX_DATA,
    check_index,
    check_policy,
    missing_folder,
    skip_bad_file,
    split_key,
)
from fastsp.errors import DataError
from fastsp.latent_shards import LatentsDataset
from fastsp.letters import LettersDataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "DigitsDataset",
    "ImageFolderDataset",
    "SyntheticDataset",
    "build_dataset",
    "describe_data",
    "load_image",
]

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
MAX_IMAGE_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS (1024**3 // 4 // 3)

DIGITS_HELDOUT = 297  # held-out images of the 1,797; the other 1,500 train
_DIGITS_SPLIT_SEED = 0  # fixed forever: the split must not move with a run's --seed
_SYNTHETIC_ITEMS = 10_000


class _BadImage(Exception):
    """An image that cannot be used; the message is the reason (callers add the path)."""


# ---------------------------------------------------------------------------------------------
# Built-in digits
# ---------------------------------------------------------------------------------------------


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
        from sklearn.datasets import load_digits  # local: a slow import that only digits needs

        digits = load_digits()
        perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(digits.target))
        indices = np.sort(perm[:DIGITS_HELDOUT] if split == "heldout" else perm[DIGITS_HELDOUT:])
        pixels = torch.from_numpy(digits.images[indices].astype(np.float32))  # [N, 8, 8], 0..16
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
        self.labels = torch.from_numpy(digits.target[indices].astype(np.int64))  # [N]
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
# Image folder
# ---------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _within(path: str, folder: str) -> bool:
    """Whether the real path `path` is the real path `folder` or lies under it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _image_files(folder: str, root: str, seen: set[str], links: list[str]) -> list[str]:
    """The image files under `folder` (inside the data folder `root`), sorted, each once.

    Symbolic links are followed only out of `root`: a link to a file or folder inside it is left
    out (its target is counted where it lies), and so is a link to a folder that holds `root` or
    one already walked (a loop). `seen` holds the real paths of the files found so far (across
    classes); every link left out is appended to `links`."""
    real_root = os.path.realpath(root)
    found, walked = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        walked.add(os.path.realpath(dirpath))
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            path = os.path.join(dirpath, name)
            target = os.path.realpath(path)
            if os.path.islink(path) and (
                _within(target, real_root) or _within(real_root, target) or target in walked
            ):
                links.append(path)
            else:
                kept.append(name)
        dirnames[:] = kept
        found.extend(
            path
            for path in (os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
            if _first_sight(path, real_root, seen, links)
        )
    return found


def _first_sight(path: str, real_root: str, seen: set[str], links: list[str]) -> bool:
    """Whether the image file `path` counts: not a link into the data folder (`real_root`),
    whose target counts where it lies, and not a file already found by another path."""
    target = os.path.realpath(path)
    if os.path.islink(path) and _within(target, real_root):
        links.append(path)
        return False
    if target in seen:
        return False
    seen.add(target)
    return True


def find_images(folder: str) -> list[str]:
    """Image files under `folder`, recursively, sorted; hidden files and folders skipped; each
    file once, by its real path (symbolic links are followed out of `folder` only, never in a
    loop: see `_image_files`)."""
    return _image_files(folder, folder, set(), [])


def _pixel_limit(max_image_pixels: int | None) -> int | None:
    """The pixel limit in force: the data set's own and PIL's global `Image.MAX_IMAGE_PIXELS`,
    which `Image.open` applies regardless (it warns above it; both count as bad here)."""
    from PIL import Image

    limits = [v for v in (max_image_pixels, Image.MAX_IMAGE_PIXELS) if v is not None]
    return min(limits) if limits else None


def _bomb_reason(size: tuple[int, int], limit: int | None) -> str | None:
    width, height = size
    if limit is None or width * height <= limit:
        return None
    return (
        f"{width}x{height} = {width * height:,} pixels, more than the limit of {limit:,} "
        f"(max_image_pixels): a possible decompression bomb"
    )


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises on a broken file (plugins differ: truncated data can surface as any)."""
    from PIL import Image

    return (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        IndexError,
        struct.error,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,  # raised as an error inside `_decode_image`
    )


def _header_error(path: str, limit: int | None = None) -> str | None:
    """Why `path` is not a usable image (reads only the header), or None when it is."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
    except UnidentifiedImageError:
        return "not an image PIL can identify: empty, truncated or another format"
    except _decode_errors() as e:
        return f"{type(e).__name__}: {e}"
    if width < 1 or height < 1:
        return f"it has size {width}x{height}"
    return _bomb_reason((width, height), limit)


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _convert_mode(img, channels: int):
    """A PIL image of any mode -> mode "L" (channels 1) or "RGB" (channels 3).

    16-bit grayscale (and 32-bit "I") maps value v to round(v / 257), so 65535 -> 255 and
    32896 -> 128; PIL's own convert would clip everything above 255 to white. CMYK goes through
    PIL's CMYK -> RGB. Palette images expand to RGBA, which keeps their transparency. Alpha
    (RGBA, LA, PA) is composited over black, color * alpha / 255: the digits and most data sets
    this trains on (handwriting, astronomy, medical scans) have black backgrounds, black is the
    model's -1, and premultiplying leaves no halo of the hidden colors around the shape.
    """
    from PIL import Image

    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    elif img.mode == "CMYK":
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA"):
        rgba = np.asarray(img, dtype=np.float32)
        color = np.rint(rgba[..., :-1] * (rgba[..., -1:] / 255.0)).astype(np.uint8)
        img = Image.fromarray(color[..., 0] if img.mode == "LA" else color)
    return img.convert("RGB" if channels == 3 else "L")


def _decode_image(
    path: str, resolution: int, channels: int, max_image_pixels: int | None
) -> torch.Tensor:
    """Decode, convert, resize the short side, center-crop: -> [C, R, R] float32 in [-1, 1].

    Raises `_BadImage` (the reason) when the file cannot be decoded."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) up to twice its limit; above our limit is bad data.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                reason = _bomb_reason(img.size, _pixel_limit(max_image_pixels))
                if reason is None:
                    img.load()
                    img = ImageOps.exif_transpose(img)
                    img = _convert_mode(img, channels)
    except _decode_errors() as e:
        raise _BadImage(f"{type(e).__name__}: {e}") from e
    if reason is not None:
        raise _BadImage(reason)
    r = resolution
    width, height = img.size
    scale = r / min(width, height)
    size = (max(r, round(width * scale)), max(r, round(height * scale)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - r) // 2, (size[1] - r) // 2
    img = img.crop((left, top, left + r, top + r))
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # [R, R, C] or [R, R]
    pixels = pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    return pixels.float().div_(127.5).sub_(1.0).contiguous()


def load_image(
    path: str,
    resolution: int,
    channels: int = 3,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """One image file as `ImageFolderDataset` reads it (see `_convert_mode`; short side resized
    to `resolution`, bicubic, center-cropped): -> [C, R, R] float32 in [-1, 1], C = `channels`.

    Raises `DataError` naming the file when PIL cannot decode it or it is above
    `max_image_pixels` (fastsp.prepare reads its captioned images through this)."""
    try:
        return _decode_image(path, resolution, channels, max_image_pixels)
    except _BadImage as e:
        raise DataError(
            f"cannot read image '{path}' ({e}); remove the file or replace it with a valid "
            f"image, or pass --on-bad-data skip to go on without it"
        ) from e


class ImageFolderDataset(Dataset):
    """A folder of images: one subfolder per class, or images directly in `root` (unlabeled).

    Classes are the subfolders that hold images, in sorted order (`class_names[label]`); a class
    folder is searched recursively. Each image is decoded with PIL, converted to RGB (channels 3)
    or L (channels 1) (see `_convert_mode` for 16-bit, CMYK, palette and alpha), resized so its
    short side is `resolution` (bicubic, antialiased), center-cropped to `resolution` x
    `resolution` and scaled to [-1, 1]; it is mirrored horizontally when the key's flip bit is set
    and `random_flip` is on. Every file's header is checked at construction, so a broken file
    fails the run at start, not hours in; images above `max_image_pixels` count as broken.
    `on_bad_data` ("stop" or "skip") and `bad_files` are described in the module docstring.
    """

    has_context = False
    context_shape = None

    def __init__(
        self,
        root,
        resolution: int,
        channels: int = 3,
        random_flip: bool = True,
        on_bad_data: str = "stop",
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    ):
        if channels not in (1, 3):
            # A DataError, not a plain ValueError: with --data-format auto only this constructor
            # knows the folder holds images, and train.py reports DataError as invalid input.
            raise DataError(
                f"invalid value {channels!r} for channels: it must be 1 (grayscale) or 3 (RGB) "
                "for an image folder; pass --channels 1 or --channels 3 (other counts need "
                "latent shards or --data synthetic)"
            )
        if not is_int(resolution) or resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        check_policy(on_bad_data)
        if max_image_pixels is not None and (not is_int(max_image_pixels) or max_image_pixels < 1):
            raise ValueError(
                f"max_image_pixels must be a positive integer or None, got {max_image_pixels!r}"
            )
        root = os.fspath(root)
        if not os.path.exists(root):
            raise missing_folder("image folder", root)
        if not os.path.isdir(root):
            raise DataError(f"image folder '{root}' is a file, not a folder; {FIX_DATA}")

        top = sorted(e for e in os.listdir(root) if not e.startswith("."))
        # Each file once, by its real path; links back into the folder (or loops) are left out.
        seen: set[str] = set()
        self.skipped_links: list[str] = []  # symbolic links left out (see `_image_files`)
        self.empty_folders: list[str] = []  # subfolders without images: not classes
        classes = []
        for name in top:
            sub = os.path.join(root, name)
            if not os.path.isdir(sub):
                continue
            target, real_root = os.path.realpath(sub), os.path.realpath(root)
            if os.path.islink(sub) and (_within(target, real_root) or _within(real_root, target)):
                self.skipped_links.append(sub)
                continue
            images = _image_files(sub, root, seen, self.skipped_links)
            if images:
                classes.append((name, images))
            else:
                self.empty_folders.append(sub)
        top_images = [
            path
            for path in (os.path.join(root, e) for e in top if _is_image(e))
            if os.path.isfile(path)
            and _first_sight(path, os.path.realpath(root), seen, self.skipped_links)
        ]
        if classes and top_images:
            raise DataError(
                f"image folder '{root}' has images both directly in it (e.g. '{top_images[0]}') "
                f"and in class subfolders; move every image into a class subfolder, "
                f"or every image into '{root}' for an unlabeled data set"
            )
        if classes:
            self.class_names = [name for name, _ in classes]
            self.files = [path for _, images in classes for path in images]
            self.file_labels = [lab for lab, (_, imgs) in enumerate(classes) for _ in imgs]
        else:
            self.class_names = []
            self.files = top_images
            self.file_labels = [0] * len(top_images)
        if not self.files:
            raise DataError(
                f"no images found in '{root}' (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
                f"any case, directly in it or in its subfolders); put images there, one subfolder "
                f"per class, or pass --data digits for the built-in data set"
            )
        self.root = root
        self.resolution = resolution
        self.channels = channels
        self.random_flip = random_flip
        self.on_bad_data = on_bad_data
        self.max_image_pixels = max_image_pixels
        self.num_classes = len(self.class_names)  # a class whose files are all bad keeps its label
        self.bad_files: list[tuple[str, str]] = []  # (path, reason), in the order found
        self._bad_indices: set[int] = set()  # indices that failed to decode (in this process)
        self._check_headers()

    def _check_headers(self) -> None:
        from PIL import Image

        check = functools.partial(_header_error, limit=_pixel_limit(self.max_image_pixels))
        # Threads: opening a header is file-system latency bound, PIL releases the GIL on I/O.
        # PIL's own bomb warning is silenced: `_bomb_reason` reports those files, by name.
        with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=8) as pool:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            errors = list(pool.map(check, self.files))
        bad = [(path, err) for path, err in zip(self.files, errors, strict=True) if err]
        if not bad:
            return
        if self.on_bad_data == "stop":
            path, err = bad[0]
            more = f" ({len(bad) - 1} more unreadable files)" if len(bad) > 1 else ""
            raise DataError(
                f"cannot read image '{path}' ({err}){more}; remove the file or replace it "
                f"with a valid image, or pass --on-bad-data skip to train without it"
            )
        for path, err in bad:
            skip_bad_file(self.bad_files, path, err)
        good = [i for i, err in enumerate(errors) if not err]
        if not good:
            path, err = bad[0]
            raise DataError(
                f"no readable images in '{self.root}': all {len(bad)} image files are bad "
                f"(e.g. '{path}': {err}); put valid images there, or pass --data digits for the "
                f"built-in data set"
            )
        self.files = [self.files[i] for i in good]
        self.file_labels = [self.file_labels[i] for i in good]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def class_counts(self) -> list[int]:
        """Images per label 0..num_classes-1 (empty when unlabeled)."""
        counts = collections.Counter(self.file_labels)
        return [counts[label] for label in range(self.num_classes)]

    def _load(self, path: str) -> torch.Tensor:
        """-> [C, R, R] float32 in [-1, 1]; raises `_BadImage` (the reason) if it cannot decode."""
        return _decode_image(path, self.resolution, self.channels, self.max_image_pixels)

    def _load_or_substitute(self, index: int) -> tuple[int, torch.Tensor]:
        """(the index read, its pixels): `index` itself or, under "skip", the first of
        index+1, index+2, ... (mod N) whose file decodes. Which one depends only on the files."""
        n = len(self.files)
        for step in range(n):
            j = (index + step) % n
            if j in self._bad_indices:
                continue
            path = self.files[j]
            try:
                return j, self._load(path)
            except _BadImage as e:
                if self.on_bad_data == "stop":
                    raise DataError(
                        f"cannot decode image '{path}' ({e}); remove the file or replace it with "
                        f"a valid image, or pass --on-bad-data skip to train without it"
                    ) from e
                self._bad_indices.add(j)
                skip_bad_file(self.bad_files, path, str(e))
        example = self.files[min(self._bad_indices)]
        raise DataError(
            f"no image in '{self.root}' can be decoded ({n} files, e.g. '{example}'); put valid "
            f"images there, or pass --data digits for the built-in data set"
        )

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, flip = split_key(key)
        index = check_index(index, len(self))
        used, x = self._load_or_substitute(index)
        if flip and self.random_flip:
            x = torch.flip(x, dims=(-1,))
        return {
            "x": x,
            "label": torch.tensor(self.file_labels[used], dtype=torch.int64),
            "bad": torch.tensor(int(used != index)),
        }


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
) -> Dataset:
    """The data set that `--data` names: "digits", "letters", "synthetic" or a folder.

    A folder holding any *.npy or *.safetensors file directly is read as latents, else as images;
    `data_format` forces one. `split` applies to digits and letters only (give a folder of
    held-out images or latents as its own `--data`); `random_flip` and `max_image_pixels` apply
    to image folders (latents never flip here); `on_bad_data` ("stop" or "skip") to folders.
    `num_classes`, `context_len`, `context_dim` and `seed` apply to synthetic only (see
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
