"""The built-in letters (fastsp/letters.py): deterministic, split, selectable, its classifier."""

import hashlib
import sys

import numpy as np
import pytest
import torch

from fastsp import builtin_classifier, letters, quality
from fastsp import train as train_cli
from fastsp.config_cli import parse_args
from fastsp.data import build_dataset
from fastsp.errors import DataError
from fastsp.letters import CHARACTERS, FONTS, LettersDataset

_RESOLUTION = 16  # the classifier test's (32, the data set's default, trains 4x longer)


@pytest.fixture(scope="module")
def splits():
    return {split: LettersDataset(split, 32) for split in ("train", "heldout")}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def test_shapes_labels_and_range(splits):
    train, heldout = splits["train"], splits["heldout"]
    assert len(CHARACTERS) == 62 and len(set(CHARACTERS)) == 62 and len(FONTS) == 18
    assert train.images.shape == (62 * 18 * 4, 1, 32, 32) and train.images.dtype == torch.float32
    assert heldout.images.shape == (62 * 18, 1, 32, 32)
    assert train.num_classes == heldout.num_classes == 62 and train.channels == 1
    # every class in every split, once per (font, draw)
    assert torch.equal(torch.bincount(train.labels, minlength=62), torch.full((62,), 72))
    assert torch.equal(torch.bincount(heldout.labels, minlength=62), torch.full((62,), 18))
    for data in splits.values():
        assert data.images.min() == -1 and data.images.max() <= 1
        # ink on every image, background (-1) on most of it
        ink = (data.images > 0).flatten(1).float().mean(1)
        assert (ink > 0.01).all() and (ink < 0.5).all()
    item = train[5]
    assert torch.equal(item["x"], train.images[5]) and item["label"] == train.labels[5]
    batch = heldout.get_batch(torch.tensor([3, 0, 7]))
    assert torch.equal(batch["x"], heldout.images[[3, 0, 7]])
    assert torch.equal(batch["bad"], torch.zeros(3, dtype=torch.int64))


def test_generation_is_deterministic(splits):
    # a second rendering (fresh fonts, fresh generator) gives the same bytes
    again = LettersDataset("heldout", 32)
    assert _digest(again.images) == _digest(splits["heldout"].images)
    assert torch.equal(again.labels, splits["heldout"].labels)
    # and the glyph of class k, font f is CHARACTERS[k] of FONTS[f]: the labels follow the rows
    x, labels, draws = letters.render_letters(32)
    assert torch.equal(labels.reshape(18, 62, 5)[3, :, 0], torch.arange(62))
    assert torch.equal(draws.reshape(18, 62, 5)[0, 0], torch.arange(5))


def test_splits_are_disjoint(splits):
    train, heldout = splits["train"], splits["heldout"]
    assert not set(train.indices) & set(heldout.indices)
    assert len(train.indices) + len(heldout.indices) == 62 * 18 * 5
    # no held-out image is a copy of a training one (different jitter draws)
    train_flat = train.images.flatten(1).double()
    held_flat = heldout.images.flatten(1).double()
    d2 = torch.cdist(held_flat, train_flat) ** 2 / held_flat.shape[1]
    assert d2.min() > 1e-4


def test_lower_resolutions_are_area_averages(splits):
    x16 = LettersDataset("heldout", 16).images
    x32 = splits["heldout"].images
    expected = torch.nn.functional.avg_pool2d(x32, 2)
    torch.testing.assert_close(x16, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="letters resolution must divide 64"):
        LettersDataset("train", 24)
    with pytest.raises(ValueError, match="split must be"):
        LettersDataset("validation", 32)


def test_missing_matplotlib_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(DataError, match=r'pip install "fastsp\[letters\]"') as raised:
        LettersDataset("train", 32)
    assert "\n" not in str(raised.value)


def test_selectable_like_digits(tmp_path, capsys):
    data = build_dataset("letters", resolution=16, split="heldout")
    assert isinstance(data, LettersDataset) and len(data) == 1116
    train, _ = parse_args(["--data", "letters", "--resolution", "32"])
    assert train.data == "letters"
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--data", "letters", "--steps", "2", "--cond", "class"]
    assert train_cli.main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    config = (out / "config.json").read_text()
    assert '"num_classes": 62' in config and '"data": "letters"' in config


@pytest.mark.slow
def test_letters_classifier_is_cached_and_far_above_chance(tmp_path):
    classifier, info = builtin_classifier.load_or_train_classifier(
        _RESOLUTION, tmp_path, data="letters"
    )
    assert info["trained_now"] and info["version"] == "letters-cnn-v1"
    heldout = LettersDataset("heldout", _RESOLUTION)
    _, probs = builtin_classifier.classify(classifier, heldout.images)
    assert probs.shape == (1116, 62)
    assert quality.class_accuracy(probs, heldout.labels) == info["heldout_accuracy"]
    # chance is 1/62; l/I/1 and o/O/0 are the same glyph in some faces, so not near 1 either
    assert info["heldout_accuracy"] > 0.6
    again, cached = builtin_classifier.load_or_train_classifier(
        _RESOLUTION, tmp_path, data="letters"
    )
    assert not cached["trained_now"] and cached["sha256"] == info["sha256"]
    # the digits classifier's cache files are other files
    digits_files = builtin_classifier._cache_files(_RESOLUTION, tmp_path, "digits")
    assert not any(f.exists() for f in digits_files)
    assert np.isfinite(info["train_seconds"])
