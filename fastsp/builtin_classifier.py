"""The feature network of the built-in data sets (digits, letters): a small CNN classifier that
fastsp trains itself, and its cache.

`fastsp.evaluation` measures samples of a model trained on built-in data in this network's
feature space: its 64-dim penultimate layer gives the features of FID and precision/recall, its
softmax the Inception-Score analogue and the class accuracy. It is trained on the training split
only (seeded, a fixed schedule, never tuned on the held-out split) and cached under
$FASTSP_CACHE (default ~/.cache/fastsp), one safetensors file and one JSON file per data set,
version and resolution; a cache that is missing or damaged is trained again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fastsp import quality
from fastsp.checkpoint import atomic_write_bytes, atomic_write_text
from fastsp.data import DigitsDataset
from fastsp.letters import LettersDataset

CLASSIFIER_VERSION = "digits-cnn-v1"  # change when the network or its training changes
# Each built-in data set: its data set class and its classifier's version (change the version
# when the network or its training changes: the cache is keyed by it).
BUILTIN = {
    "digits": (DigitsDataset, CLASSIFIER_VERSION),
    "letters": (LettersDataset, "letters-cnn-v1"),
}
FEATURE_DIM = 64
_TRAIN_EPOCHS = 15
_TRAIN_BATCH = 64
_TRAIN_LR = 2e-3
_TRAIN_SEED = 0


class DigitsClassifier(nn.Module):
    """A small CNN on [N, 1, R, R] digits in [-1, 1]: 3 convs -> 64-dim features -> 10 classes.

    The second conv halves images of 16 pixels and more, so every resolution costs about
    0.9 MFLOP per image at most 16x16: cheap enough to train on a CPU before an evaluation.
    """

    def __init__(self, resolution: int, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2 if resolution >= 16 else 1, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, R, R] -> penultimate features [N, feature_dim]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, R, R] -> logits [N, classes]."""
        return self.head(self.body(x))


@torch.no_grad()
def classify(
    classifier: DigitsClassifier, images: torch.Tensor, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] and softmax probabilities [N, classes] (float64) of images [N, 1, R, R]."""
    classifier.eval()
    features, probs = [], []
    for start in range(0, len(images), batch_size):
        h = classifier.features(images[start : start + batch_size].float().cpu())
        features.append(h.double())
        probs.append(torch.softmax(classifier.head(h).double(), dim=1))
    return torch.cat(features).numpy(), torch.cat(probs).numpy()


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to `max_shift` pixels in x and y, background (-1) filled in."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(offsets)])


def train_classifier(resolution: int, data: str = "digits") -> tuple[DigitsClassifier, float]:
    """Train on the training split of built-in `data` (fixed seed and schedule); return it and
    its seconds.

    Nothing here looks at the held-out split: the schedule is fixed, with no early stopping.
    """
    start = time.perf_counter()
    dataset = BUILTIN[data][0]("train", resolution)
    generator = torch.Generator().manual_seed(_TRAIN_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TRAIN_SEED)
        classifier = DigitsClassifier(resolution, dataset.num_classes)
    steps = _TRAIN_EPOCHS * math.ceil(len(dataset) / _TRAIN_BATCH)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=_TRAIN_LR, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, _TRAIN_LR, total_steps=steps)
    classifier.train()
    for _ in range(_TRAIN_EPOCHS):
        order = torch.randperm(len(dataset), generator=generator)
        for batch in order.split(_TRAIN_BATCH):
            x = _shift(dataset.images[batch], max(1, resolution // 8), generator)
            loss = F.cross_entropy(classifier(x), dataset.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return classifier.eval(), time.perf_counter() - start


def cache_dir() -> Path:
    """$FASTSP_CACHE, or ~/.cache/fastsp."""
    return Path(os.environ.get("FASTSP_CACHE") or Path.home() / ".cache" / "fastsp").expanduser()


def _cache_files(resolution: int, root: Path, data: str = "digits") -> tuple[Path, Path]:
    stem = f"{BUILTIN[data][1]}_r{resolution}"
    return root / f"{stem}.safetensors", root / f"{stem}.json"


def _load_cached(weights_file: Path, info_file: Path, resolution: int, data: str = "digits"):
    """The cached classifier and its info, or (None, reason) when missing or damaged."""
    dataset_class, version = BUILTIN[data]
    if not info_file.is_file() or not weights_file.is_file():
        return None, "not cached yet"
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
        blob = weights_file.read_bytes()
        if info.get("version") != version or info.get("resolution") != resolution:
            return None, f"{info_file} is for another version or resolution"
        if hashlib.sha256(blob).hexdigest() != info.get("sha256"):
            return None, f"{weights_file} does not match the checksum in {info_file}"
        problem = _info_problem(info)
        if problem is not None:  # edited by hand: the checksum covers the weights only
            return None, f"{info_file} is damaged ({problem})"
        classifier = DigitsClassifier(resolution, dataset_class.num_classes)
        state = load_safetensors(blob)
        classifier.load_state_dict(state)
        if not all(torch.isfinite(v).all() for v in state.values()):
            return None, f"{weights_file} holds non-finite weights"
    except Exception as error:  # unreadable JSON, garbled tensors, other shapes: train again
        return None, f"{info_file} or {weights_file} is damaged ({type(error).__name__}: {error})"
    return classifier.eval(), info


# The cache's JSON fields and their types (a float field takes an int; numbers must be finite)
_INFO_FIELDS = {
    "version": str,
    "resolution": int,
    "heldout_accuracy": float,
    "heldout_images": int,
    "train_seconds": float,
    "sha256": str,
}


def _info_problem(info: Any) -> str | None:
    """What is wrong with a classifier cache's JSON, or None: a field missing, of another
    type, not finite, or an accuracy outside [0, 1]."""
    if not isinstance(info, dict):
        return "not a JSON object"
    for name, kind in _INFO_FIELDS.items():
        value = info.get(name)
        if kind is str:
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, (int, float) if kind is float else int)
            ok = ok and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            what = {str: "a string", int: "an integer", float: "a finite number"}[kind]
            return f"{name} is {value!r}, not {what}"
    if not 0 <= info["heldout_accuracy"] <= 1:
        return f"heldout_accuracy {info['heldout_accuracy']!r} is not in [0, 1]"
    return None


def load_or_train_classifier(
    resolution: int, root: str | Path | None = None, log=None, data: str = "digits"
) -> tuple[DigitsClassifier, dict[str, Any]]:
    """The classifier of built-in `data` (digits or letters) for `resolution`, from the cache or
    trained now and cached.

    Returns (classifier in eval mode, info) with info's keys version, resolution,
    heldout_accuracy, train_seconds, sha256, and trained_now (whether this call trained it).
    Both cache files are written atomically, weights first; the JSON holds the weights' checksum,
    so a damaged or half-replaced pair is noticed and the classifier trained again.
    """
    root = Path(root) if root is not None else cache_dir()
    weights_file, info_file = _cache_files(resolution, root, data)
    classifier, info = _load_cached(weights_file, info_file, resolution, data)
    if classifier is not None:
        return classifier, {**info, "trained_now": False, "cache_file": str(weights_file)}
    if log is not None:  # info: why the cache cannot be used, naming the file when damaged
        warning = "" if info == "not cached yet" else "warning: rebuilding the cache: "
        log(f"{warning}training the {data} classifier at {resolution}x{resolution} ({info})")
    classifier, seconds = train_classifier(resolution, data)
    heldout = BUILTIN[data][0]("heldout", resolution)
    _, probs = classify(classifier, heldout.images)
    blob = save_safetensors({k: v.contiguous() for k, v in classifier.state_dict().items()})
    info = {
        "version": BUILTIN[data][1],
        "resolution": resolution,
        "heldout_accuracy": quality.class_accuracy(probs, heldout.labels),
        "heldout_images": len(heldout),
        "train_seconds": round(seconds, 2),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(weights_file, blob)
        atomic_write_text(info_file, json.dumps(info, indent=2) + "\n")
    except OSError as error:  # a read-only cache costs a re-training next time, nothing else
        if log is not None:
            log(f"warning: cannot cache the classifier in {root} ({error})")
    return classifier, {**info, "trained_now": True, "cache_file": str(weights_file)}
