"""Data faults (fastsp/data.py, fastsp/latent_shards.py): bad files under on_bad_data "stop" and
"skip", and odd image modes.

Every fault is a real file written into tmp_path: a zero-byte file, random bytes, an image above
the pixel limit (a decompression bomb in miniature: a 20x20 image against max_image_pixels=100),
PNGs and JPEGs cut to their first half, latent shards of the wrong shape or an integer dtype.
"stop" must raise DataError naming the file; "skip" must warn naming it, leave it out (or
substitute the next good item deterministically) and mark substituted items with "bad" = 1.
"""

import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import prefork
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastsp.data import build_dataset
from fastsp.data_policy import BadDataWarning
from fastsp.data_stream import ShardedBatchSampler, make_loader
from fastsp.errors import DataError
from fastsp.image_folder import ImageFolderDataset, _convert_mode
from fastsp.latent_shards import LatentsDataset, inspect_shard

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = str(REPO / "fastsp" / "train.py")

_GOOD_SIZE = (10, 9)  # 90 pixels: under the 100-pixel limit the bomb case uses
_LIMIT = 100


def _take(iterable, n):
    return list(itertools.islice(iter(iterable), n))


def _encoded(fmt: str, size: int = 64, seed: int = 0) -> bytes:
    """A valid random RGB image file's bytes; 64x64 so half a file still holds the header."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _write_good(folder: Path, names, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        pixels = rng.integers(0, 256, (_GOOD_SIZE[1], _GOOD_SIZE[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


def _folder_with(root: Path, bad_name: str, payload: bytes, n_good: int = 5) -> Path:
    """`n_good` valid images img0.png, img1.png, ... and one bad file `bad_name` beside them."""
    _write_good(root, [f"img{i}.png" for i in range(n_good)])
    bad = root / bad_name
    bad.write_bytes(payload)
    return bad


def _bad_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, BadDataWarning)]


@contextlib.contextmanager
def _no_bad_warnings():
    """A context in which a BadDataWarning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadDataWarning)
        yield


def _bomb_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (9, 99, 199)).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Faults found at construction: the header check
# ---------------------------------------------------------------------------------------------

_HEADER_FAULTS = [
    ("zero.png", b"", "not an image"),
    ("noise.jpg", np.random.default_rng(1).bytes(500), "not an image"),
    ("bomb.png", _bomb_bytes(), "decompression bomb"),
]


@pytest.mark.parametrize("name, payload, reason", _HEADER_FAULTS, ids=["zero", "noise", "bomb"])
def test_header_fault_stop(tmp_path, name, payload, reason):
    bad = _folder_with(tmp_path, name, payload)
    with pytest.raises(DataError, match="cannot read image") as e:
        ImageFolderDataset(tmp_path, resolution=8, max_image_pixels=_LIMIT)
    message = str(e.value)
    assert str(bad) in message and reason in message and "--on-bad-data skip" in message
    with pytest.raises(DataError, match=re.escape(str(bad))):
        build_dataset(str(tmp_path), resolution=8, max_image_pixels=_LIMIT)


@pytest.mark.parametrize("name, payload, reason", _HEADER_FAULTS, ids=["zero", "noise", "bomb"])
def test_header_fault_skip(tmp_path, name, payload, reason):
    bad = _folder_with(tmp_path, name, payload)
    with pytest.warns(BadDataWarning) as record:
        ds = ImageFolderDataset(tmp_path, resolution=8, on_bad_data="skip", max_image_pixels=_LIMIT)
    messages = _bad_warnings(record)
    assert len(messages) == 1 and str(bad) in messages[0] and reason in messages[0]
    assert len(ds) == 5 and str(bad) not in ds.files
    assert ds.file_labels == [0] * 5
    assert len(ds.bad_files) == 1 and ds.bad_files[0][0] == str(bad)
    assert reason in ds.bad_files[0][1]
    with _no_bad_warnings():
        items = [ds[(i, False)] for i in range(len(ds))]
        batch = _take(make_loader(ds, 4, seed=3), 2)
    assert all(it["bad"].item() == 0 and it["bad"].dtype == torch.int64 for it in items)
    assert all(torch.equal(b["bad"], torch.zeros(4, dtype=torch.int64)) for b in batch)
    with pytest.warns(BadDataWarning, match=re.escape(str(bad))):
        via_build = build_dataset(
            str(tmp_path), resolution=8, on_bad_data="skip", max_image_pixels=_LIMIT
        )
    assert via_build.files == ds.files


def test_bomb_limit_is_per_dataset(tmp_path):
    # The 20x20 image is fine under PIL's default limit: another data set's limit does not leak.
    bad = _folder_with(tmp_path, "bomb.png", _bomb_bytes())
    with pytest.warns(BadDataWarning):
        ImageFolderDataset(tmp_path, resolution=8, on_bad_data="skip", max_image_pixels=_LIMIT)
    with _no_bad_warnings():
        ds = ImageFolderDataset(tmp_path, resolution=8)
    assert str(bad) in ds.files and ds.bad_files == []
    x = ds[(ds.files.index(str(bad)), False)]["x"]
    torch.testing.assert_close(x[:, 3, 3], torch.tensor([9, 99, 199]) / 127.5 - 1)


def test_every_file_bad_skip(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.warns(BadDataWarning), pytest.raises(DataError, match="no readable images") as e:
        ImageFolderDataset(tmp_path, resolution=8, on_bad_data="skip")
    assert str(tmp_path / "a.png") in str(e.value)


def test_policy_validation(tmp_path):
    _write_good(tmp_path, ["a.png"])
    with pytest.raises(ValueError, match="on_bad_data"):
        ImageFolderDataset(tmp_path, resolution=8, on_bad_data="ignore")
    with pytest.raises(ValueError, match="on_bad_data"):
        build_dataset("digits", on_bad_data="warn")
    with pytest.raises(ValueError, match="max_image_pixels"):
        ImageFolderDataset(tmp_path, resolution=8, max_image_pixels=0)


# ---------------------------------------------------------------------------------------------
# Faults found when read: truncated files pass the header check
# ---------------------------------------------------------------------------------------------

_TRUNCATED = [("PNG", "png"), ("JPEG", "jpg")]


def _truncated(fmt: str) -> bytes:
    data = _encoded(fmt)
    return data[: len(data) // 2]


@pytest.mark.parametrize("fmt, ext", _TRUNCATED, ids=["png", "jpeg"])
def test_truncated_stop(tmp_path, fmt, ext):
    bad = _folder_with(tmp_path, f"img2_cut.{ext}", _truncated(fmt))
    with _no_bad_warnings():
        ds = ImageFolderDataset(tmp_path, resolution=8)  # the header is intact
    i = ds.files.index(str(bad))
    assert ds[(i - 1, False)]["bad"].item() == 0
    with pytest.raises(DataError, match="cannot decode image") as e:
        ds[(i, False)]
    assert str(bad) in str(e.value) and "--on-bad-data skip" in str(e.value)


@pytest.mark.parametrize("fmt, ext", _TRUNCATED, ids=["png", "jpeg"])
@pytest.mark.parametrize("bad_name", ["img2_cut", "zz_cut"], ids=["middle", "last"])
def test_truncated_skip_substitutes_next(tmp_path, fmt, ext, bad_name):
    bad = _folder_with(tmp_path, f"{bad_name}.{ext}", _truncated(fmt))
    with _no_bad_warnings():
        ds = ImageFolderDataset(tmp_path, resolution=8, on_bad_data="skip")
    assert len(ds) == 6 and ds.bad_files == []
    i = ds.files.index(str(bad))
    with pytest.warns(BadDataWarning) as record:
        item = ds[(i, True)]
    messages = _bad_warnings(record)
    assert len(messages) == 1 and str(bad) in messages[0] and "truncated" in messages[0]
    assert ds.bad_files == [(str(bad), ds.bad_files[0][1])] and "truncated" in ds.bad_files[0][1]
    with _no_bad_warnings():  # known bad: neither retried nor warned about again
        again = ds[(i, True)]
        substitute = ds[((i + 1) % len(ds), True)]  # index+1, wrapping to 0 after the last
    assert item["bad"].item() == 1 and again["bad"].item() == 1 and substitute["bad"].item() == 0
    assert torch.equal(item["x"], substitute["x"]) and torch.equal(item["x"], again["x"])
    assert torch.equal(item["label"], substitute["label"])
    assert len(ds.bad_files) == 1


def test_truncated_skip_label_follows_substitute(tmp_path):
    _write_good(tmp_path / "cat", ["a.png", "b.png"])
    (tmp_path / "cat" / "c.png").write_bytes(_truncated("PNG"))
    _write_good(tmp_path / "dog", ["a.png"], seed=1)
    ds = ImageFolderDataset(tmp_path, resolution=8, on_bad_data="skip")
    assert ds.file_labels == [0, 0, 0, 1]
    with pytest.warns(BadDataWarning, match=re.escape(str(tmp_path / "cat" / "c.png"))):
        item = ds[(2, False)]
    assert item["label"].item() == 1 and item["bad"].item() == 1
    assert torch.equal(item["x"], ds[(3, False)]["x"])


def test_truncated_skip_two_in_a_row(tmp_path):
    # img1 and img2 both cut: index 1 and index 2 both fall through to index 3.
    _write_good(tmp_path, ["img0.png", "img3.png"])
    (tmp_path / "img1.png").write_bytes(_truncated("PNG"))
    (tmp_path / "img2.jpg").write_bytes(_truncated("JPEG"))
    ds = ImageFolderDataset(tmp_path, resolution=8, on_bad_data="skip")
    with pytest.warns(BadDataWarning) as record:
        first = ds[(1, False)]
    assert len(_bad_warnings(record)) == 2
    with _no_bad_warnings():
        second, target = ds[(2, False)], ds[(3, False)]
    assert first["bad"].item() == second["bad"].item() == 1
    assert torch.equal(first["x"], target["x"]) and torch.equal(second["x"], target["x"])
    assert [p for p, _ in ds.bad_files] == [str(tmp_path / "img1.png"), str(tmp_path / "img2.jpg")]


@pytest.mark.parametrize("fmt, ext", _TRUNCATED, ids=["png", "jpeg"])
def test_truncated_skip_loader_workers_agree(tmp_path, fmt, ext):
    bad = _folder_with(tmp_path, f"img2_cut.{ext}", _truncated(fmt), n_good=6)
    steps, batch = 5, 4
    runs = []
    for workers in (0, 2):
        ds = ImageFolderDataset(tmp_path, resolution=8, on_bad_data="skip")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadDataWarning)
            runs.append(_take(make_loader(ds, batch, seed=5, num_workers=workers), steps))
    i = ds.files.index(str(bad))
    sampler = ShardedBatchSampler(len(ds), batch, seed=5)
    reference = ImageFolderDataset(tmp_path, resolution=8, on_bad_data="skip")
    total = 0
    for step, (serial, parallel) in enumerate(zip(*runs, strict=True)):
        assert serial.keys() == parallel.keys() == {"x", "label", "bad"}
        for key in serial:
            assert torch.equal(serial[key], parallel[key]), (step, key)
        keys = sampler.keys(step)
        expected_bad = torch.tensor([int(index == i) for index, _ in keys])
        assert torch.equal(serial["bad"], expected_bad)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadDataWarning)
            expected_x = torch.stack([reference[k]["x"] for k in keys])
        assert torch.equal(serial["x"], expected_x)
        total += int(serial["bad"].sum())
    assert total >= 1  # 20 items over 7 files: the cut one came up


def test_every_file_truncated_skip(tmp_path):
    (tmp_path / "a.png").write_bytes(_truncated("PNG"))
    (tmp_path / "b.jpg").write_bytes(_truncated("JPEG"))
    ds = ImageFolderDataset(tmp_path, resolution=8, on_bad_data="skip")
    with pytest.warns(BadDataWarning), pytest.raises(DataError, match="can be decoded") as e:
        ds[(1, False)]
    assert str(tmp_path) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Latent shards
# ---------------------------------------------------------------------------------------------


def _npy(path: Path, n: int, c: int = 4, r: int = 6, dtype=np.float32, seed: int = 0):
    np.save(path, np.random.default_rng(seed).standard_normal((n, c, r, r)).astype(dtype))


def _st(path: Path, n: int, c: int = 4, r: int = 6, dtype=torch.float32, seed: int = 0):
    latents = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, c, r, r)))
    save_file({"latents": latents.to(dtype)}, str(path))


def _shape_fault(root: Path, odd_first: bool) -> Path:
    root.mkdir()
    odd = root / ("a.npy" if odd_first else "c.npy")
    for name in ("a.npy", "b.safetensors", "c.npy"):
        path = root / name
        c = 8 if path == odd else 4
        (_st if name.endswith(".safetensors") else _npy)(path, 3, c=c, seed=len(name))
    return odd


def _dtype_fault(root: Path) -> Path:
    root.mkdir()
    _npy(root / "a.npy", 3)
    _st(root / "b.safetensors", 2, dtype=torch.int32)
    _npy(root / "c.npy", 4, dtype=np.float16)
    return root / "b.safetensors"


_LATENT_FAULTS = {
    "shape": (lambda root: _shape_fault(root, False), "shape"),
    "shape_first": (lambda root: _shape_fault(root, True), "shape"),
    "int_dtype": (_dtype_fault, "floating point"),
}


@pytest.mark.parametrize("fault", list(_LATENT_FAULTS))
def test_latent_fault_stop(tmp_path, fault):
    make, reason = _LATENT_FAULTS[fault]
    bad = make(tmp_path / "shards")
    with pytest.raises(DataError, match=reason) as e:
        LatentsDataset(tmp_path / "shards")
    assert str(bad) in str(e.value)
    with pytest.raises(DataError, match=re.escape(str(bad))):
        build_dataset(str(tmp_path / "shards"))


@pytest.mark.parametrize("fault", list(_LATENT_FAULTS))
def test_latent_fault_skip(tmp_path, fault):
    make, reason = _LATENT_FAULTS[fault]
    root = tmp_path / "shards"
    bad = make(root)
    with pytest.warns(BadDataWarning) as record:
        ds = LatentsDataset(root, on_bad_data="skip")
    messages = _bad_warnings(record)
    assert len(messages) == 1 and str(bad) in messages[0] and reason in messages[0]
    assert [p for p, _ in ds.bad_files] == [str(bad)]
    kept = sorted(str(p) for p in root.iterdir() if p != bad)
    assert ds.shards == kept
    assert ds.channels == 4 and ds.resolution == 6
    assert len(ds) == sum(inspect_shard(p).num_items for p in kept)
    items = [ds[(i, False)] for i in range(len(ds))]
    assert all(it["x"].shape == (4, 6, 6) and it["bad"].item() == 0 for it in items)
    serial = _take(make_loader(ds, 3, seed=1), 3)
    parallel = _take(make_loader(ds, 3, seed=1, num_workers=2), 3)
    zeros = torch.zeros(3, dtype=torch.int64)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["bad"], zeros) and torch.equal(b["bad"], zeros)
    with pytest.warns(BadDataWarning):
        assert len(build_dataset(str(root), on_bad_data="skip")) == len(ds)


def test_latents_every_shard_bad_skip(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 4, 6, 6), dtype=np.int64))
    (tmp_path / "b.npy").write_bytes(b"")
    with pytest.warns(BadDataWarning), pytest.raises(DataError, match="no readable latent") as e:
        LatentsDataset(tmp_path, on_bad_data="skip")
    assert str(tmp_path) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Odd modes decode to the expected pixels (none of these is bad data)
# ---------------------------------------------------------------------------------------------


def _decode(folder: Path, img: Image.Image, name: str, channels: int, **save) -> torch.Tensor:
    """Save `img` alone in `folder`, read it back at its own size: -> [C, H, W] in [-1, 1]."""
    folder.mkdir(exist_ok=True)
    img.save(folder / name, **save)
    with _no_bad_warnings():
        ds = ImageFolderDataset(folder, resolution=img.size[0], channels=channels)
        item = ds[(0, False)]
    assert item["bad"].item() == 0
    return item["x"]


def _columns(values, rows: int, channels: int) -> torch.Tensor:
    """Expected [C, rows, len(values)] from 8-bit column values (tuples for RGB)."""
    v = torch.tensor(values, dtype=torch.float32).reshape(len(values), -1).T  # [C or 1, W]
    v = v.expand(channels, -1) if v.shape[0] == 1 else v
    return (v / 127.5 - 1).unsqueeze(1).expand(-1, rows, -1)


def _image_from_columns(mode: str, columns, rows: int) -> Image.Image:
    img = Image.new(mode, (len(columns), rows))
    for x, value in enumerate(columns):
        for y in range(rows):
            img.putpixel((x, y), value)
    return img


def test_sixteen_bit_grayscale(tmp_path):
    values = np.array([65535, 32896, 0, 257], dtype=np.uint16)
    img = Image.fromarray(np.tile(values, (4, 1)))
    assert img.mode == "I;16"
    for channels in (1, 3):
        x = _decode(tmp_path / f"c{channels}", img, "deep.png", channels)
        torch.testing.assert_close(x, _columns([255, 128, 0, 1], 4, channels), atol=0, rtol=0)
        assert x[0, 0, 0].item() == 1.0


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_sixteen_bit_modes_in_memory(mode):
    # PIL reads 16-bit PNGs as "I;16"; TIFF and other readers give these (not in IMAGE_EXTENSIONS).
    values = [[65535, 32896, 0, 257]]
    if mode == "I;16B":
        img = Image.frombytes(mode, (4, 1), np.array(values, dtype=">u2").tobytes())
    else:
        img = Image.fromarray(np.array(values, dtype=np.int32))
    assert img.mode == mode
    assert np.asarray(_convert_mode(img, 1)).tolist() == [[255, 128, 0, 1]]


def test_cmyk(tmp_path):
    cmyk = _image_from_columns("CMYK", [(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0)], 3)
    tol = 3 / 127.5  # JPEG (the one CMYK format here) is lossy, even for flat colours
    rgb = _decode(tmp_path / "rgb", cmyk, "cmyk.jpg", 3, quality=100)
    expected = _columns([(0, 255, 255), (0, 0, 0), (255, 255, 255)], 3, 3)
    torch.testing.assert_close(rgb, expected, atol=tol, rtol=0)
    gray = _decode(tmp_path / "gray", cmyk, "cmyk.jpg", 1, quality=100)
    torch.testing.assert_close(gray, _columns([179, 0, 255], 3, 1), atol=tol, rtol=0)


def test_palette_with_transparency(tmp_path):
    img = _image_from_columns("P", [1, 2, 0], 3)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])  # black, red (transparent), green
    rgb = _decode(tmp_path / "rgb", img, "pal.png", 3, transparency=1)
    expected = _columns([(0, 0, 0), (0, 255, 0), (0, 0, 0)], 3, 3)
    torch.testing.assert_close(rgb, expected, atol=0, rtol=0)
    gray = _decode(tmp_path / "gray", img, "pal.png", 1, transparency=1)
    torch.testing.assert_close(gray, _columns([0, 150, 0], 3, 1), atol=0, rtol=0)


def test_rgba_composited_over_black(tmp_path):
    img = _image_from_columns(
        "RGBA", [(200, 100, 50, 128), (10, 20, 30, 255), (255, 255, 255, 0)], 3
    )
    rgb = _decode(tmp_path / "rgb", img, "rgba.png", 3)
    expected = _columns([(100, 50, 25), (10, 20, 30), (0, 0, 0)], 3, 3)  # round(c * a / 255)
    torch.testing.assert_close(rgb, expected, atol=0, rtol=0)
    gray = _decode(tmp_path / "gray", img, "rgba.png", 1)
    # L of the composited colour, PIL's ITU-R 601 weights: 0.299 R + 0.587 G + 0.114 B
    torch.testing.assert_close(gray, _columns([62, 18, 0], 3, 1), atol=0, rtol=0)


def test_la_composited_over_black(tmp_path):
    img = _image_from_columns("LA", [(200, 128), (90, 255), (255, 0)], 3)
    for channels in (1, 3):
        x = _decode(tmp_path / f"c{channels}", img, "la.png", channels)
        torch.testing.assert_close(x, _columns([100, 90, 0], 3, channels), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# End to end: the training CLI in a real process
# ---------------------------------------------------------------------------------------------


def _train_cli(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--preset", "tiny", "--data", str(data), "--cond", "none", "--channels", "1"]
    args += ["--resolution", "8", "--steps", "2", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return prefork.run([sys.executable, TRAIN_SCRIPT, *args], env=env, timeout=300)


@pytest.fixture
def cut_folder(tmp_path) -> tuple[Path, Path]:
    """Seven good images and a truncated one: a global batch of 8 reads every file each step."""
    data = tmp_path / "data"
    bad = data / "img3_cut.png"
    _write_good(data, [f"img{i}.png" for i in range(7)])
    bad.write_bytes(_truncated("PNG"))
    return data, bad


def test_train_cli_stops_on_bad_image(tmp_path, cut_folder):
    data, bad = cut_folder
    result = _train_cli(data, tmp_path / "run")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert str(bad) in result.stderr and "--on-bad-data skip" in result.stderr


@pytest.mark.slow
def test_train_cli_skips_bad_image(tmp_path, cut_folder):
    data, bad = cut_folder
    out = tmp_path / "run"
    result = _train_cli(data, out, "--on-bad-data", "skip")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert str(bad) in result.stderr  # the BadDataWarning
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    counted = [r["bad_items"] for r in records if "bad_items" in r]
    assert counted and sum(counted) == 2  # one substituted item in each of the 2 steps


def test_train_cli_counts_files_left_out_when_the_data_set_is_built(tmp_path):
    # A zero-byte file is found bad before training (not at decode time): it is left out of
    # every epoch and counted as `bad_files` in every metrics line.
    data = tmp_path / "data"
    _write_good(data, [f"img{i}.png" for i in range(8)])
    (data / "empty.png").write_bytes(b"")
    out = tmp_path / "run"
    result = _train_cli(data, out, "--on-bad-data", "skip")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert str(data / "empty.png") in result.stderr  # the BadDataWarning
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["bad_files"] == 1 and r["bad_items"] == 0 for r in records)
