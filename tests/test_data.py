"""Data sets, the sharded batch sampler and the loader (fastsp/data.py, latent_shards.py,
data_stream.py)."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastsp.data import DigitsDataset, SyntheticDataset, build_dataset
from fastsp.data_stream import ShardedBatchSampler, make_loader
from fastsp.errors import DataError
from fastsp.image_folder import ImageFolderDataset
from fastsp.latent_shards import LatentsDataset

# Odd sizes: the dataset length is no multiple of any batch, so batches straddle epochs.
_SAMPLER_CASES = [(37, 8), (5, 16), (100, 12)]  # (dataset_len, global_batch)


def _take(iterable, n):
    return list(itertools.islice(iter(iterable), n))


def _stack_items(dataset, keys):
    items = [dataset[k] for k in keys]
    return {name: torch.stack([it[name] for it in items]) for name in items[0]}


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------


def _bilinear_ref(img: np.ndarray, out: int) -> np.ndarray:
    """Half-pixel-center bilinear resize of a square float64 image, written out per axis."""
    n = img.shape[0]
    src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w = src - i0
    m = np.zeros((out, n))
    m[np.arange(out), i0] += 1 - w
    m[np.arange(out), i1] += w
    return m @ img @ m.T


def test_digits_split():
    from sklearn.datasets import load_digits

    train, held = DigitsDataset("train"), DigitsDataset("heldout")
    assert (len(train), len(held)) == (1500, 297)
    assert set(train.indices.tolist()).isdisjoint(held.indices.tolist())
    assert len(set(train.indices.tolist()) | set(held.indices.tolist())) == 1797
    again = DigitsDataset("train")
    assert np.array_equal(train.indices, again.indices)
    assert torch.equal(train.images, again.images)
    assert (train.num_classes, train.channels, train.has_context) == (10, 1, False)
    assert train.context_shape is None
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert sorted(held.labels.unique().tolist()) == list(range(10))
    assert torch.equal(train.labels, torch.from_numpy(load_digits().target[train.indices]))
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("test")
    with pytest.raises(ValueError, match="resolution"):
        DigitsDataset("train", resolution=4)


@pytest.mark.parametrize("resolution", [8, 16, 32, 24])
def test_digits_values(resolution):
    from sklearn.datasets import load_digits

    ds = DigitsDataset("heldout", resolution=resolution)
    assert ds.images.shape == (297, 1, resolution, resolution)
    assert ds.images.dtype == torch.float32
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    item = ds[(3, True)]
    assert item["x"].shape == (1, resolution, resolution)
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert torch.equal(item["x"], ds[(3, False)]["x"])  # digits ignore flip
    source = load_digits().images[ds.indices].astype(np.float64) / 8.0 - 1.0  # [N, 8, 8]
    for i in (0, 41, 296):
        ref = _bilinear_ref(source[i], resolution)
        np.testing.assert_allclose(ds.images[i, 0].numpy(), ref, atol=1e-5, rtol=0)
    if resolution == 8:
        np.testing.assert_allclose(ds.images[:, 0].numpy(), source, atol=1e-6, rtol=0)
    if resolution % 8 == 0:
        # Bilinear upsampling preserves the image mean up to the border rows (mass is conserved
        # in the interior), so the pooled image stays close to the source.
        pooled = torch.nn.functional.avg_pool2d(ds.images, resolution // 8)[:, 0].numpy()
        assert np.abs(pooled - source).mean() < 0.15
        np.testing.assert_allclose(pooled.mean(), source.mean(), atol=0.02)


# ---------------------------------------------------------------------------------------------
# Image folder
# ---------------------------------------------------------------------------------------------


def _rand_image(rng, w, h, mode="RGB"):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _make_class_folder(root, rng, counts=(3, 2, 4)):
    names = ["cat", "dog", "zebra"][: len(counts)]
    for name, count in zip(names[::-1], counts[::-1], strict=True):  # creation order irrelevant
        (root / name).mkdir(parents=True)
        for j in range(count):
            _rand_image(rng, 23 + 3 * j, 17 + 5 * j).save(root / name / f"img{j}.png")
    return names


def test_image_folder_classes(tmp_path):
    rng = np.random.default_rng(0)
    names = _make_class_folder(tmp_path, rng)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / ".hidden.png").write_bytes(b"junk")  # hidden files are skipped
    ds = ImageFolderDataset(tmp_path, resolution=12)
    assert ds.class_names == names
    assert (len(ds), ds.num_classes, ds.channels, ds.resolution) == (9, 3, 3, 12)
    labels = [ds[(i, False)]["label"].item() for i in range(len(ds))]
    assert labels == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    for i in range(len(ds)):
        x = ds[(i, False)]["x"]
        assert x.shape == (3, 12, 12) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0


def test_image_folder_unlabeled_and_extensions(tmp_path):
    rng = np.random.default_rng(1)
    for j, ext in enumerate([".png", ".JPG", ".jpeg", ".bmp", ".webp"]):
        _rand_image(rng, 20, 30).save(tmp_path / f"a{j}{ext}", format=None)
    ds = ImageFolderDataset(tmp_path, resolution=8, channels=1)
    assert (len(ds), ds.num_classes, ds.class_names) == (5, 0, [])
    item = ds[(2, False)]
    assert item["x"].shape == (1, 8, 8) and item["label"].item() == 0


@pytest.mark.parametrize("size", [(60, 20), (20, 60)])
def test_image_folder_resize_center_crop(tmp_path, size):
    # Three bands (red, green, blue) across the long side; the center crop keeps the green band.
    w, h = size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    long_axis = 1 if w > h else 0
    for band in range(3):
        sl = [slice(None), slice(None)]
        sl[long_axis] = slice(band * max(w, h) // 3, (band + 1) * max(w, h) // 3)
        pixels[tuple(sl) + (band,)] = 255
    Image.fromarray(pixels).save(tmp_path / "bands.png")
    x = ImageFolderDataset(tmp_path, resolution=10)[(0, False)]["x"]
    assert x.shape == (3, 10, 10)
    inner = x[:, 2:8, 2:8]  # away from the crop's edges, where bicubic blends in the next band
    torch.testing.assert_close(inner[1], torch.ones_like(inner[1]), atol=0.02, rtol=0)
    torch.testing.assert_close(inner[0], -torch.ones_like(inner[0]), atol=0.02, rtol=0)
    torch.testing.assert_close(inner[2], -torch.ones_like(inner[2]), atol=0.02, rtol=0)
    assert x[1].mean() > 0.8  # the crop is (almost) all green band


def test_image_folder_flip(tmp_path):
    _rand_image(np.random.default_rng(2), 31, 19).save(tmp_path / "a.png")
    ds = ImageFolderDataset(tmp_path, resolution=16)
    plain, flipped = ds[(0, False)]["x"], ds[(0, True)]["x"]
    assert torch.equal(flipped, torch.flip(plain, dims=(-1,)))
    assert not torch.equal(flipped, plain)
    no_flip = ImageFolderDataset(tmp_path, resolution=16, random_flip=False)
    assert torch.equal(no_flip[(0, True)]["x"], plain)


def test_image_folder_modes(tmp_path):
    rng = np.random.default_rng(3)
    base = _rand_image(rng, 16, 16)
    base.convert("RGBA").save(tmp_path / "rgba.png")
    base.convert("L").save(tmp_path / "l.png")
    base.convert("P").save(tmp_path / "p.png")
    base.convert("P").save(tmp_path / "p_trans.png", transparency=0)
    base.save(tmp_path / "rgb.png")
    Image.new("L", (16, 16), 200).save(tmp_path / "zgray.png")
    for channels in (3, 1):
        ds = ImageFolderDataset(tmp_path, resolution=16, channels=channels)
        for i in range(len(ds)):
            assert ds[(i, False)]["x"].shape == (channels, 16, 16)
    ds = ImageFolderDataset(tmp_path, resolution=16)
    files = [p.rsplit("/", 1)[-1] for p in ds.files]
    rgb, rgba = ds[(files.index("rgb.png"), False)]["x"], ds[(files.index("rgba.png"), False)]["x"]
    assert torch.equal(rgb, rgba)
    expected = torch.from_numpy(np.asarray(base, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(rgb, expected)
    gray = ds[(files.index("zgray.png"), False)]["x"]
    torch.testing.assert_close(gray, torch.full((3, 16, 16), 200 / 127.5 - 1))


def test_image_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as e:
        ImageFolderDataset(missing, resolution=8)
    assert str(missing) in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images found") as e:
        ImageFolderDataset(empty, resolution=8)
    assert str(empty) in str(e.value) and ".png" in str(e.value)

    for name, payload in [("noise.png", np.random.default_rng(4).bytes(300)), ("zero.jpg", b"")]:
        bad = tmp_path / name.split(".")[0]
        (bad / "cls").mkdir(parents=True)
        _rand_image(np.random.default_rng(5), 9, 9).save(bad / "cls" / "good.png")
        (bad / "cls" / name).write_bytes(payload)
        with pytest.raises(DataError, match="cannot read image") as e:
            ImageFolderDataset(bad, resolution=8)
        assert str(bad / "cls" / name) in str(e.value) and "remove" in str(e.value)

    mixed = tmp_path / "mixed"
    _make_class_folder(mixed, np.random.default_rng(6), counts=(1,))
    _rand_image(np.random.default_rng(7), 9, 9).save(mixed / "stray.png")
    with pytest.raises(DataError, match="both directly") as e:
        ImageFolderDataset(mixed, resolution=8)
    assert str(mixed) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Latents
# ---------------------------------------------------------------------------------------------


def _npy_shard(root, name, n, rng, c=4, r=6, labels=True, context=None, dtype=np.float32):
    lat = rng.standard_normal((n, c, r, r)).astype(dtype)
    np.save(root / f"{name}.npy", lat)
    lab = rng.integers(0, 7, n) if labels else None
    if labels:
        np.save(root / f"{name}.labels.npy", lab)
    ctx = None
    if context is not None:
        ctx = rng.standard_normal((n, *context)).astype(np.float32)
        np.save(root / f"{name}.context.npy", ctx)
    return lat, lab, ctx


def _st_shard(root, name, n, rng, c=4, r=6, labels=True, context=None):
    tensors = {"latents": torch.from_numpy(rng.standard_normal((n, c, r, r)).astype(np.float32))}
    if labels:
        tensors["labels"] = torch.from_numpy(rng.integers(0, 7, n))
    if context is not None:
        tensors["context"] = torch.from_numpy(rng.standard_normal((n, *context)).astype("f4"))
    save_file(tensors, str(root / f"{name}.safetensors"))
    return (
        tensors["latents"].numpy(),
        tensors["labels"].numpy() if labels else None,
        tensors["context"].numpy() if context is not None else None,
    )


def _check_latents(ds, shards, scale):
    lat = np.concatenate([s[0] for s in shards])
    assert len(ds) == len(lat)
    for i in range(len(ds)):
        item = ds[(i, True)]  # flip is ignored by default
        assert item["x"].dtype == torch.float32
        expected = torch.from_numpy(lat[i].astype(np.float32)) * scale
        torch.testing.assert_close(item["x"], expected, atol=1e-6, rtol=1e-6)
        if shards[0][1] is not None:
            assert item["label"].item() == np.concatenate([s[1] for s in shards])[i]
            assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
        if shards[0][2] is not None:
            ctx = np.concatenate([s[2] for s in shards])[i]
            assert torch.equal(item["context"], torch.from_numpy(ctx))


def test_latents_npy(tmp_path):
    rng = np.random.default_rng(8)
    shards = [_npy_shard(tmp_path, name, n, rng) for name, n in [("a", 5), ("b", 3), ("c", 11)]]
    ds = LatentsDataset(tmp_path, latent_scale=0.18215)
    assert (ds.channels, ds.resolution, ds.has_context, ds.context_shape) == (4, 6, False, None)
    assert ds.num_classes == max(s[1].max() for s in shards) + 1
    _check_latents(ds, shards, 0.18215)


def test_latents_safetensors_and_mixed(tmp_path):
    rng = np.random.default_rng(9)
    shards = [_st_shard(tmp_path, "s0", 2, rng, context=(3, 5))]
    shards.append(_npy_shard(tmp_path, "s1", 7, rng, context=(3, 5), dtype=np.float16))
    shards.append(_st_shard(tmp_path, "s2", 4, rng, context=(3, 5)))
    ds = LatentsDataset(tmp_path, latent_scale=2.5)
    assert (ds.has_context, ds.context_shape, len(ds)) == (True, (3, 5), 13)
    _check_latents(ds, shards, 2.5)
    assert torch.equal(
        LatentsDataset(tmp_path, random_flip=True)[(4, True)]["x"],
        torch.flip(LatentsDataset(tmp_path)[(4, False)]["x"], dims=(-1,)),
    )


def test_latents_unlabeled(tmp_path):
    rng = np.random.default_rng(10)
    shards = [_st_shard(tmp_path, "x", 3, rng, labels=False)]
    ds = LatentsDataset(tmp_path)
    assert ds.num_classes == 0 and ds[(1, False)]["label"].item() == 0
    _check_latents(ds, shards, 1.0)


def test_latents_errors(tmp_path):
    rng = np.random.default_rng(11)
    chans = tmp_path / "chans"
    chans.mkdir()
    _npy_shard(chans, "a", 3, rng, c=4)
    _st_shard(chans, "b", 3, rng, c=8)
    with pytest.raises(DataError, match="shape") as e:
        LatentsDataset(chans)
    assert str(chans / "b.safetensors") in str(e.value)

    ints = tmp_path / "ints"
    ints.mkdir()
    np.save(ints / "a.npy", np.zeros((2, 4, 6, 6), dtype=np.int32))
    with pytest.raises(DataError, match="floating") as e:
        LatentsDataset(ints)
    assert str(ints / "a.npy") in str(e.value)

    short = tmp_path / "short"
    short.mkdir()
    _npy_shard(short, "a", 3, rng, labels=False)
    np.save(short / "a.labels.npy", np.arange(2))
    with pytest.raises(DataError, match="labels") as e:
        LatentsDataset(short)
    assert str(short / "a.npy") in str(e.value)

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(DataError, match="no latent shards") as e:
        LatentsDataset(nothing)
    assert str(nothing) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Synthetic and build_dataset
# ---------------------------------------------------------------------------------------------


def test_synthetic():
    ds = SyntheticDataset(50, 3, 8, num_classes=7, context_len=4, context_dim=5, seed=3)
    a, b = ds[(13, False)], SyntheticDataset(50, 3, 8, 7, 4, 5, seed=3)[(13, True)]
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["context"], b["context"])
    assert a["x"].shape == (3, 8, 8) and a["context"].shape == (4, 5)
    assert a["label"].item() == 13 % 7
    g = torch.Generator().manual_seed(3 * 1_000_003 + 13)
    assert torch.equal(a["x"], torch.randn(3, 8, 8, generator=g))
    assert not torch.equal(a["x"], ds[(14, False)]["x"])
    assert ds.context_shape == (4, 5) and ds.has_context


def test_build_dataset_synthetic_options():
    # The trainer builds its synthetic set through build_dataset: classes, context and seed.
    kwargs = dict(resolution=8, channels=3, num_classes=7, context_len=4, context_dim=5)
    ds = build_dataset("synthetic", data_format="synthetic", seed=3, **kwargs)
    assert isinstance(ds, SyntheticDataset) and len(ds) == 10_000
    assert ds.num_classes == 7 and ds.has_context and ds.context_shape == (4, 5)
    item = ds[(13, False)]
    assert item["x"].shape == (3, 8, 8) and item["context"].shape == (4, 5)
    assert item["label"].item() == 13 % 7
    same = build_dataset("synthetic", seed=3, **kwargs)[(13, False)]
    other = build_dataset("synthetic", seed=4, **kwargs)[(13, False)]
    assert torch.equal(item["x"], same["x"]) and torch.equal(item["context"], same["context"])
    assert not torch.equal(item["x"], other["x"])
    assert not torch.equal(item["context"], other["context"])
    assert torch.equal(item["x"], SyntheticDataset(50, 3, 8, 7, 4, 5, seed=3)[13]["x"])

    plain = build_dataset("synthetic", resolution=8, channels=3)  # the defaults: no classes
    assert plain.num_classes == 0 and not plain.has_context and plain.seed == 0
    assert "context" not in plain[0] and plain[5]["label"].item() == 0
    with pytest.raises(ValueError, match="context_len and context_dim"):
        build_dataset("synthetic", context_len=4)


def test_build_dataset(tmp_path):
    assert isinstance(build_dataset("digits", resolution=16), DigitsDataset)
    assert len(build_dataset("digits", split="heldout")) == 297
    syn = build_dataset("synthetic", resolution=8, channels=4)
    assert isinstance(syn, SyntheticDataset) and syn[(0, False)]["x"].shape == (4, 8, 8)

    missing = tmp_path / "gone"
    with pytest.raises(DataError) as e:
        build_dataset(str(missing))
    assert str(e.value) == (
        f"data folder '{missing}' does not exist; pass --data PATH to a folder of images (one "
        f"subfolder per class) or of latent shards, or --data digits for the built-in data set"
    )

    images, latents = tmp_path / "images", tmp_path / "latents"
    _make_class_folder(images, np.random.default_rng(12), counts=(2, 1))
    latents.mkdir()
    _npy_shard(latents, "a", 4, np.random.default_rng(13))
    assert isinstance(build_dataset(str(images), resolution=8), ImageFolderDataset)
    assert isinstance(build_dataset(str(latents), latent_scale=0.5), LatentsDataset)
    with pytest.raises(DataError, match="no latent shards"):
        build_dataset(str(images), data_format="latents")
    with pytest.raises(DataError, match="no images found"):
        build_dataset(str(latents), data_format="images")
    with pytest.raises(ValueError, match="data_format"):
        build_dataset("digits", data_format="video")


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, batch", _SAMPLER_CASES)
def test_sampler_deterministic_and_epochs(n, batch):
    a = _take(ShardedBatchSampler(n, batch, seed=5), 20)
    b = _take(ShardedBatchSampler(n, batch, seed=5), 20)
    assert a == b
    assert a != _take(ShardedBatchSampler(n, batch, seed=6), 20)
    assert all(len(keys) == batch for keys in a)
    stream = [k for keys in a for k in keys]
    epochs = len(stream) // n
    assert epochs >= 2
    for e in range(epochs):
        assert sorted(i for i, _ in stream[e * n : (e + 1) * n]) == list(range(n))
    assert {f for _, f in stream} == {False, True}
    assert all(isinstance(i, int) and isinstance(f, bool) for i, f in stream)


@pytest.mark.parametrize("n, batch", _SAMPLER_CASES)
@pytest.mark.parametrize("world_size", [2, 4])
def test_sampler_ranks_concatenate(n, batch, world_size):
    one = _take(ShardedBatchSampler(n, batch, seed=1), 12)  # crosses several epoch boundaries
    ranks = [
        _take(ShardedBatchSampler(n, batch, r, world_size, seed=1), 12) for r in range(world_size)
    ]
    for step in range(12):
        assert [k for r in range(world_size) for k in ranks[r][step]] == one[step]


@pytest.mark.parametrize("n, batch", _SAMPLER_CASES)
def test_sampler_resume(n, batch):
    full = _take(ShardedBatchSampler(n, batch, rank=1, world_size=2, seed=9), 15)
    for k in (1, 4, 7, 11):
        resumed = _take(ShardedBatchSampler(n, batch, 1, 2, seed=9, start_step=k), 15 - k)
        assert resumed == full[k:]


def test_sampler_validation():
    with pytest.raises(ValueError, match="divisible"):
        ShardedBatchSampler(100, 10, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        ShardedBatchSampler(100, 8, rank=4, world_size=4)
    with pytest.raises(ValueError, match="dataset_len"):
        ShardedBatchSampler(0, 8)


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------


def test_loader_digits():
    ds = DigitsDataset("train", resolution=16)
    for rank in (0, 1):
        sampler = ShardedBatchSampler(len(ds), 24, rank, 2, seed=4, start_step=3)
        batches = _take(make_loader(ds, 24, rank, 2, seed=4, start_step=3), 70)  # > 1 epoch
        for keys, batch in zip(sampler, batches, strict=False):
            assert batch["x"].shape == (12, 1, 16, 16) and batch["x"].dtype == torch.float32
            assert batch["label"].shape == (12,) and batch["label"].dtype == torch.int64
            ref = _stack_items(ds, keys)  # the per-item DataLoader path
            assert torch.equal(batch["x"], ref["x"]) and torch.equal(batch["label"], ref["label"])


def test_loader_image_folder(tmp_path):
    _make_class_folder(tmp_path, np.random.default_rng(14))
    ds = ImageFolderDataset(tmp_path, resolution=8)
    batches = _take(make_loader(ds, 6, rank=1, world_size=2, seed=2), 5)
    sampler = ShardedBatchSampler(len(ds), 6, 1, 2, seed=2)
    for keys, batch in zip(sampler, batches, strict=False):
        assert batch["x"].shape == (3, 3, 8, 8) and batch["label"].shape == (3,)
        ref = _stack_items(ds, keys)
        assert torch.equal(batch["x"], ref["x"]) and torch.equal(batch["label"], ref["label"])


def test_loader_latents_context(tmp_path):
    rng = np.random.default_rng(15)
    _st_shard(tmp_path, "a", 5, rng, context=(2, 3))
    _npy_shard(tmp_path, "b", 4, rng, context=(2, 3))
    ds = LatentsDataset(tmp_path)
    batch = _take(make_loader(ds, 4, seed=0, start_step=2), 1)[0]
    assert batch["x"].shape == (4, 4, 6, 6) and batch["context"].shape == (4, 2, 3)
    ref = _stack_items(ds, ShardedBatchSampler(len(ds), 4, seed=0).keys(2))
    assert all(torch.equal(batch[k], ref[k]) for k in ("x", "label", "context"))


def test_loader_workers_match(tmp_path):
    _make_class_folder(tmp_path, np.random.default_rng(16))
    ds = ImageFolderDataset(tmp_path, resolution=8)
    serial = _take(make_loader(ds, 4, seed=7, start_step=1), 6)
    parallel = _take(make_loader(ds, 4, seed=7, start_step=1, num_workers=2), 6)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["label"], b["label"])


def test_digit_arrays_equal_scikit_learns_load_digits():
    from sklearn.datasets import load_digits

    from fastsp.data import load_digit_arrays

    images, targets = load_digit_arrays()
    digits = load_digits()
    assert images.dtype == digits.images.dtype and targets.dtype == np.int64
    assert np.array_equal(images, digits.images) and np.array_equal(targets, digits.target)
