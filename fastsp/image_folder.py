"""A folder of images as a data set: one subfolder per class, each image checked, decoded,
resized and cropped the same way for training and for `fastsp.prepare`.

Items follow the contract in fastsp.data. Bad images (`on_bad_data`, fastsp.data_policy): an
image PIL cannot identify, a zero-byte file, or one above the pixel limit (a possible
decompression bomb) is found at construction. "stop" (the default) raises `DataError` naming the
file; "skip" leaves it out with one `BadDataWarning` naming it, and lists it in the data set's
`bad_files`. An image that passes the header check but fails to decode (truncated) is found when
read: "stop" raises, "skip" warns once and returns in its place the next index (cyclically) whose
file decodes, with `"bad": 1` so the trainer can count substituted items
(`batch["bad"].sum()`); every other item has `"bad": 0`. The substitute depends only on which
files are bad, never on the order they were read in, so batches stay the same for every run, rank
and worker count.
"""

from __future__ import annotations

import collections
import functools
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from fastsp.config_fields import is_int
from fastsp.data_policy import (
    FIX_DATA,
    check_index,
    check_policy,
    missing_folder,
    skip_bad_file,
    split_key,
)
from fastsp.errors import DataError

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
MAX_IMAGE_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS (1024**3 // 4 // 3)


class _BadImage(Exception):
    """An image that cannot be used; the message is the reason (callers add the path)."""


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
) -> CroppedImage:
    """Decode, convert, resize the short side, center-crop (see `CroppedImage`).

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
    return CroppedImage(
        pixels.float().div_(127.5).sub_(1.0).contiguous(), (height, width), (top, left)
    )


class CroppedImage(NamedTuple):
    """An image as the readers prepare it, and where it came from: what SDXL's micro-conditioning
    (its added time ids) describes."""

    pixels: torch.Tensor  # [C, R, R] float32 in [-1, 1]
    original_size: tuple[int, int]  # (height, width) of the decoded image, before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def load_cropped_image(
    path: str,
    resolution: int,
    channels: int = 3,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> CroppedImage:
    """`load_image`'s pixels with the image's original size and crop offset; the same
    `DataError` for a file PIL cannot decode."""
    try:
        return _decode_image(path, resolution, channels, max_image_pixels)
    except _BadImage as e:
        raise DataError(
            f"cannot read image '{path}' ({e}); remove the file or replace it with a valid "
            f"image, or pass --on-bad-data skip to go on without it"
        ) from e


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
    return load_cropped_image(path, resolution, channels, max_image_pixels).pixels


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
        return _decode_image(path, self.resolution, self.channels, self.max_image_pixels).pixels

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
