"""The built-in letters: 62 characters (0-9, A-Z, a-z) rendered from the fonts matplotlib ships.

A second built-in data set, harder than the 8x8 digits and as offline: every font file is inside
the matplotlib package (`pip install "fastsp[letters]"`), nothing is downloaded. Each class has
many modes (18 faces: DejaVu Sans, Serif and Mono, STIX and Computer Modern, each regular, bold
and italic or oblique; Computer Modern also sans and typewriter) and fine strokes, where a small
model blends modes: the regime in which MSE without guidance is unrealistic.

Generation, deterministic (no state but the fixed seed below):

- each character is rendered by FreeType (matplotlib.ft2font) at 44 px into a 64x64 canvas, its
  baseline on row 49 and its bitmap centred, so that case (o/O, c/C) shows in the size;
- each (class, font) pair gets `_DRAWS` random affine jitters (rotation, anisotropic scale,
  shear, translation) from `numpy.random.default_rng(_SEED)`, applied by bilinear resampling of
  the 64x64 canvas; the result is area-averaged down to `resolution` (32 by default);
- draw 0 of every pair is held out (1,116 images), draws 1-4 train (4,464 images): the held-out
  split has every font and class, but no jitter the training split saw.

Ink is +1 and background -1, as the digits. Some classes are ambiguous in some faces (l and I in
sans-serif faces are the same glyph; o, O and 0 differ by a few pixels), which bounds the feature
classifier's accuracy below 1; fastsp.evaluate reports its held-out accuracy. Rendering all 5,580
images takes under a second on a CPU, so nothing is cached on disk.
"""

from __future__ import annotations

import os
import string

import numpy as np
import torch
import torch.nn.functional as F

from fastsp.config_fields import is_int
from fastsp.data_policy import check_index, split_key
from fastsp.errors import ConfigError, DataError

CHARACTERS = string.digits + string.ascii_uppercase + string.ascii_lowercase  # class k = [k]
# (file in matplotlib's mpl-data/fonts/ttf, family, style)
FONTS = (
    ("DejaVuSans.ttf", "DejaVu Sans", "regular"),
    ("DejaVuSans-Bold.ttf", "DejaVu Sans", "bold"),
    ("DejaVuSans-Oblique.ttf", "DejaVu Sans", "oblique"),
    ("DejaVuSerif.ttf", "DejaVu Serif", "regular"),
    ("DejaVuSerif-Bold.ttf", "DejaVu Serif", "bold"),
    ("DejaVuSerif-Italic.ttf", "DejaVu Serif", "italic"),
    ("DejaVuSansMono.ttf", "DejaVu Sans Mono", "regular"),
    ("DejaVuSansMono-Bold.ttf", "DejaVu Sans Mono", "bold"),
    ("DejaVuSansMono-Oblique.ttf", "DejaVu Sans Mono", "oblique"),
    ("STIXGeneral.ttf", "STIX", "regular"),
    ("STIXGeneralBol.ttf", "STIX", "bold"),
    ("STIXGeneralItalic.ttf", "STIX", "italic"),
    ("STIXGeneralBolIta.ttf", "STIX", "bold italic"),
    ("cmr10.ttf", "Computer Modern Roman", "regular"),
    ("cmb10.ttf", "Computer Modern Roman", "bold"),
    ("cmti10.ttf", "Computer Modern Roman", "italic"),
    ("cmss10.ttf", "Computer Modern Sans", "regular"),
    ("cmtt10.ttf", "Computer Modern Typewriter", "regular"),
)
LETTERS_SPLITS = ("train", "heldout")
_SEED = 0  # fixed forever: the images and the split must not move with a run's --seed
_DRAWS = 5  # jitters per (class, font): draw 0 held out, draws 1.. train
_CANVAS, _FONT_PX, _BASELINE = 64, 44, 49  # render canvas, font size in pixels, baseline row
# Jitter ranges (uniform): rotation in degrees, log2 of the x/y scale, shear, shift in canvas px
_ROTATE, _LOG2_SCALE, _SHEAR, _SHIFT = 12.0, 0.2, 0.2, 5.0
_MISSING = (
    "the letters data set renders matplotlib's fonts, but matplotlib is not installed: "
    'pip install "fastsp[letters]" (or pip install matplotlib)'
)


def _fonts():
    """matplotlib's font folder and its FreeType wrapper, or a DataError naming the extra."""
    try:
        import matplotlib
        from matplotlib.ft2font import FT2Font
    except ImportError:
        raise DataError(_MISSING) from None
    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf"), FT2Font


def render_glyphs() -> np.ndarray:
    """Every (font, character) on the canvas, no jitter: float32 [fonts, 62, 64, 64] in [0, 1]."""
    root, FT2Font = _fonts()
    out = np.zeros((len(FONTS), len(CHARACTERS), _CANVAS, _CANVAS), np.float32)
    for f, (name, _, _) in enumerate(FONTS):
        font = FT2Font(os.path.join(root, name))
        font.set_size(_FONT_PX, 72)  # 72 dpi: points are pixels
        for c, char in enumerate(CHARACTERS):
            font.clear()
            font.set_text(char, 0.0)
            font.draw_glyphs_to_bitmap(antialiased=True)
            glyph = np.asarray(font.get_image(), np.float32) / 255.0  # [h, w], ink 1
            h, w = glyph.shape
            top = _BASELINE - (h - round(font.get_descent() / 64))  # FreeType's 26.6 fixed point
            left = (_CANVAS - w) // 2
            # glyphs that reach past the canvas (none at these sizes) are clipped, not moved
            y0, x0 = max(top, 0), max(left, 0)
            y1, x1 = min(top + h, _CANVAS), min(left + w, _CANVAS)
            out[f, c, y0:y1, x0:x1] = glyph[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


def _jitter_matrices(n: int, rng: np.random.Generator) -> np.ndarray:
    """n random affine maps [n, 2, 3] in affine_grid's normalised coordinates (output -> input)."""
    angle = np.deg2rad(rng.uniform(-_ROTATE, _ROTATE, n))
    scale = 2.0 ** rng.uniform(-_LOG2_SCALE, _LOG2_SCALE, (n, 2))
    shear = rng.uniform(-_SHEAR, _SHEAR, n)
    shift = rng.uniform(-_SHIFT, _SHIFT, (n, 2)) * 2 / _CANVAS
    cos, sin = np.cos(angle), np.sin(angle)
    # forward map A = R(angle) @ Shear @ diag(scale); the grid samples the input at A^-1 (y - b)
    forward = np.stack(
        [
            np.stack([cos * scale[:, 0], (cos * shear - sin) * scale[:, 1]], -1),
            np.stack([sin * scale[:, 0], (sin * shear + cos) * scale[:, 1]], -1),
        ],
        1,
    )
    inverse = np.linalg.inv(forward)
    offset = -np.einsum("nij,nj->ni", inverse, shift)
    return np.concatenate([inverse, offset[:, :, None]], axis=2)


def render_letters(resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All images: x [fonts * 62 * draws, 1, R, R] in [-1, 1], labels [N], draw index [N].

    Row order: font, then class, then draw.
    """
    glyphs = torch.from_numpy(render_glyphs())  # [F, C, 64, 64]
    n_fonts, n_classes = glyphs.shape[:2]
    n = n_fonts * n_classes * _DRAWS
    theta = torch.from_numpy(_jitter_matrices(n, np.random.default_rng(_SEED))).float()
    canvas = glyphs.repeat_interleave(_DRAWS, dim=1).reshape(n, 1, _CANVAS, _CANVAS)
    grid = F.affine_grid(theta, [n, 1, _CANVAS, _CANVAS], align_corners=False)
    ink = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if resolution != _CANVAS:
        ink = F.interpolate(ink, size=(resolution, resolution), mode="area")
    labels = torch.arange(n_classes).repeat_interleave(_DRAWS).repeat(n_fonts)
    draws = torch.arange(_DRAWS).repeat(n_fonts * n_classes)
    return (ink * 2 - 1).clamp_(-1, 1).contiguous(), labels, draws


class LettersDataset(torch.utils.data.Dataset):
    """The 62 letters and digits of matplotlib's fonts with affine jitter; fixed split.

    `images` [N, 1, R, R] float32 in [-1, 1] and `labels` [N] int64 (class k is CHARACTERS[k]),
    precomputed; 4,464 training and 1,116 held-out images. Flip is ignored (letters are not
    mirror-symmetric).
    """

    num_classes = len(CHARACTERS)
    channels = 1
    has_context = False
    context_shape = None

    def __init__(self, split: str = "train", resolution: int = 32):
        if split not in LETTERS_SPLITS:
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if not is_int(resolution) or not (8 <= resolution <= _CANVAS and _CANVAS % resolution == 0):
            raise ConfigError(
                f"--resolution {resolution!r}: letters resolution must divide {_CANVAS} (the "
                f"side they are drawn at) and be >= 8; pass --resolution 8, 16, 32 or 64"
            )
        x, labels, draws = render_letters(resolution)
        keep = (draws == 0) if split == "heldout" else (draws > 0)
        self.split = split
        self.resolution = resolution
        self.indices = torch.nonzero(keep).squeeze(1).numpy()  # rows of render_letters()
        self.images = x[keep].contiguous()
        self.labels = labels[keep].contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index = check_index(split_key(key)[0], len(self))
        return {"x": self.images[index], "label": self.labels[index], "bad": torch.tensor(0)}

    def get_batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """`index` [B] int64 -> {"x": [B, 1, R, R], "label": [B], "bad": [B] zeros}."""
        bad = torch.zeros(index.shape, dtype=torch.int64)
        return {"x": self.images[index], "label": self.labels[index], "bad": bad}
