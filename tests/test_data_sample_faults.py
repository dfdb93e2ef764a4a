"""A new user's data and sampling mistakes (issue 14, items 4, 5, 7-13, 15, 23), each with real
files: symbolic-link loops in an image folder, an --out inside the data, a stray huge latent label,
an empty class folder, context shards of another length, latents of another size, options the data
set decides (--channels on digits), --resolution 4 on digits, sampling with --cfg nan or -5, an
--out that cannot be written, a --num far beyond memory, and a hand-edited evaluation cache.

The training and sampling commands run through their `main` (what `python fastsp/train.py` and
`python -m fastsp.sample` call) on tiny runs; the sampling grid also through a real process.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import prefork
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fastsp import builtin_classifier, evaluate, sampling
from fastsp import checkpoint as checkpoint_lib
from fastsp import sample as sample_cli
from fastsp import train as train_cli
from fastsp.diffusion import NoiseSchedule
from fastsp.errors import DataError
from fastsp.image_folder import ImageFolderDataset, find_images
from fastsp.latent_shards import LatentsDataset

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--device", "cpu", "--steps", "1"]


def _images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    return paths


def _latents(folder: Path, n: int = 16, side: int = 8, labels=None, context=None) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    np.save(folder / "s.npy", rng.standard_normal((n, 1, side, side)).astype(np.float32))
    if labels is not None:
        np.save(folder / "s.labels.npy", np.asarray(labels, dtype=np.int64))
    if context is not None:
        np.save(folder / "s.context.npy", rng.standard_normal((n, *context)).astype(np.float32))
    return folder


def _refused(capsys, argv, *expected) -> str:
    """The training command exits 2 with a one-line error holding every `expected` text."""
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


# ---------------------------------------------------------------------------------------------
# Image folders: symbolic links (item 4) and the class-to-label map (item 8)


@pytest.fixture
def linked_folder(tmp_path):
    """Classes a (3 images, a link to its parent: a loop), b (2 images, a link to itself and a
    link to a's first image), c (a link to a folder outside with 2 images), empty (no images)."""
    root = tmp_path / "data"
    a = _images(root / "a", 3)
    _images(root / "b", 2, seed=1)
    outside = _images(tmp_path / "elsewhere", 2, seed=2)
    os.symlink("..", root / "a" / "up")
    os.symlink(".", root / "b" / "self")
    os.symlink(a[0], root / "b" / "same_as_a0.png")
    os.symlink(tmp_path / "elsewhere", root / "c")
    (root / "empty").mkdir()
    return root, a, outside


def test_symlink_loops_count_each_file_once_by_its_real_path(linked_folder):
    root, a, outside = linked_folder
    data = ImageFolderDataset(root, resolution=8, channels=1)
    real = sorted(os.path.realpath(p) for p in data.files)
    assert len(real) == len(set(real)) == 7  # 3 + 2 + 2: no file twice, nothing from a loop
    assert data.class_names == ["a", "b", "c"] and data.class_counts == [3, 2, 2]
    by_class = {name: [] for name in data.class_names}
    for path, label in zip(data.files, data.file_labels, strict=True):
        by_class[data.class_names[label]].append(os.path.realpath(path))
    assert by_class["a"] == [os.path.realpath(p) for p in a]  # never b's images through "up"
    assert by_class["c"] == [os.path.realpath(p) for p in outside]  # a link out is followed
    assert sorted(data.skipped_links) == sorted(
        str(root / p) for p in ("a/up", "b/self", "b/same_as_a0.png")
    )
    assert data.empty_folders == [str(root / "empty")]
    assert len(find_images(str(root))) == 7


def test_training_names_each_label_with_its_folder_and_count(linked_folder, tmp_path, capsys):
    root = linked_folder[0]
    out = tmp_path / "run"
    assert train_cli.main([*TINY, "--data", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "classes (label = folder: images): 0 = 'a': 3, 1 = 'b': 2, 2 = 'c': 2" in printed
    assert "left out 3 symbolic link(s)" in printed
    assert f"not classes (no images inside, so no label): '{root / 'empty'}'" in printed
    assert json.loads((out / "config.json").read_text())["model"]["num_classes"] == 3


# ---------------------------------------------------------------------------------------------
# --out and the data folder (item 5)


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_out_and_data_folder_must_not_hold_each_other(tmp_path, capsys, where):
    data = tmp_path / "runs" / "data"
    _images(data / "x", 2)
    before = sorted(tmp_path.rglob("*"))
    out = {"same": data, "inside": data / "run", "around": tmp_path / "runs"}[where]
    expected = "inside --out" if where == "around" else "the data folder"
    _refused(capsys, [*TINY, "--data", str(data), "--out", str(out)], expected, "--out")
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even the run's lock


# ---------------------------------------------------------------------------------------------
# Latent shards: labels (item 8), context length (item 9), spatial size (item 10)


def test_a_stray_huge_latent_label_is_refused_naming_it(tmp_path, capsys):
    labels = [0] * 16
    labels[3] = 10**6
    data = _latents(tmp_path / "latents", labels=labels)
    out = tmp_path / "run"
    err = _refused(capsys, [*TINY, "--data", str(data), "--out", str(out)], "1000000")
    assert str(data / "s.npy") in err and "2 distinct labels" in err and "0..1" in err
    assert not out.exists()
    # Without labels in the model the same shards are fine; gaps of a class subset are fine too.
    assert train_cli.main([*TINY, "--data", str(data), "--cond", "none", "--out", str(out)]) == 0
    gaps = LatentsDataset(_latents(tmp_path / "gaps", labels=[0, 2, 5, 9] * 4))
    gaps.check_label_range()
    assert gaps.num_classes == 10 and gaps.class_counts == [4, 0, 4, 0, 0, 4, 0, 0, 0, 4]
    with pytest.raises(DataError, match="far beyond"):
        LatentsDataset(_latents(tmp_path / "far", labels=[0, 1, 2, 16] * 4)).check_label_range()


def test_context_shards_set_the_context_length(tmp_path, capsys):
    data = _latents(tmp_path / "latents", context=(12, 32))
    out = tmp_path / "run"
    argv = [*TINY, "--data", str(data), "--cond", "context", "--context-dim", "32"]
    assert train_cli.main([*argv, "--out", str(out)]) == 0  # --context-len is 77 by default
    assert "context len: 12, the data's own (--context-len 77 applies to synthetic data only)" in (
        capsys.readouterr().out
    )
    assert json.loads((out / "config.json").read_text())["train"]["context_len"] == 12


@pytest.mark.parametrize("side", [16, 4])
def test_latents_of_another_size_stop_before_any_file(tmp_path, capsys, side):
    data = _latents(tmp_path / "latents", side=side)
    out = tmp_path / "run"
    argv = [*TINY, "--data", str(data), "--cond", "none", "--resolution", "8", "--out", str(out)]
    _refused(capsys, argv, f"{side}x{side}", f"--resolution {side}")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The digits: --resolution 4 (item 15), --channels 3 (item 23)


def test_digits_below_their_resolution_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    _refused(capsys, [*TINY, "--resolution", "4", "--out", str(out)], "8x8", "--resolution 8")
    assert not out.exists()


def test_options_the_data_decides_are_recorded_as_the_data_has_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main([*TINY, "--channels", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "channels: 1, the data's own (--channels 3 applies to image folders" in printed
    assert "classes (label: items): 0: 157, 1: 149," in printed  # the digits' training split
    for config in (out / "config.json", out / "checkpoints" / "step_00000001" / "config.json"):
        saved = json.loads(config.read_text())
        assert saved["train"]["channels"] == saved["model"]["in_channels"] == 1


# ---------------------------------------------------------------------------------------------
# Sampling: one validation (item 7), --out (item 11), batches (item 12)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "run"
    assert train_cli.main([*TINY, "--steps", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cfg", "nan"], "--cfg must be a finite number >= 0 (1 = no guidance), got nan"),
        (["--cfg", "-5"], "--cfg must be a finite number >= 0 (1 = no guidance), got -5"),
        (["--cfg-rescale", "nan"], "--cfg-rescale must be in [0, 1], got nan"),
        (["--batch-size", "0"], "--num, --steps and --batch-size must be >= 1"),
    ],
)
def test_sample_and_evaluate_refuse_the_same_sampling_options(
    run_dir, tmp_path, capsys, extra, message
):
    png = tmp_path / "grid.png"
    assert sample_cli.main(["--checkpoint", str(run_dir), *extra, "--out", str(png)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not png.exists()
    argv = ["--checkpoint", str(run_dir), "--num", "8", *extra, "--out", str(tmp_path / "e.json")]
    assert evaluate.main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into: chmod 555, or /proc/sys for root (whom file
    modes do not stop)."""
    if os.geteuid() == 0:
        return Path("/proc/sys")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_sample_out_that_cannot_be_written_is_refused_before_sampling(run_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    cases = {
        str(tmp_path): "is a folder; pass a file path",
        str(tmp_path / "a_file" / "grid.png"): "is a file, not a folder",
        str(_read_only_folder(tmp_path) / "new" / "grid.png"): "cannot write in",
    }
    for out, message in cases.items():
        assert sample_cli.main(["--checkpoint", str(run_dir), "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}") and message in err and err.count("\n") == 1


def test_sample_batch_size_is_for_grids_only(run_dir, tmp_path, capsys):
    argv = ["--checkpoint", str(run_dir), "--prompt", "a cat", "--vae", "v", "--text-encoder", "t"]
    assert sample_cli.main([*argv, "--batch-size", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "--batch-size applies to grids" in capsys.readouterr().err


def test_sample_draws_any_num_in_batches_with_a_progress_line(run_dir, tmp_path, monkeypatch):
    seen = []
    generate = sampling.generate

    def recording(model, schedule, num, *args, **kwargs):
        seen.append(num)
        return generate(model, schedule, num, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate", recording)
    png = tmp_path / "grid.png"
    argv = ["--checkpoint", str(run_dir), "--num", "300", "--batch-size", "16", "--steps", "1"]
    assert sample_cli.main([*argv, "--out", str(png)]) == 0
    assert seen == [16] * 18 + [12]  # never more than a batch at once
    with Image.open(png) as image:  # 18 x 17 cells of 8x8 with 1-pixel padding, x16
        assert image.size == ((18 * 9 + 1) * 16, (17 * 9 + 1) * 16)
    # Big grids are enlarged less, to stay within 4,096 pixels: a million digits at 9,001
    assert [sampling.grid_scale(8, n) for n in (300, 1000, 10**6)] == [16, 14, 1]


def test_sample_grid_in_a_real_process_equals_the_batches_drawn_in_memory(run_dir, tmp_path):
    png = tmp_path / "grid.png"
    argv = ["--checkpoint", str(run_dir), "--num", "37", "--batch-size", "5", "--steps", "2"]
    argv += ["--label", "3", "--seed", "7", "--out", str(png)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = prefork.run(
        [sys.executable, "-m", "fastsp.sample", *argv], env=env, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "37/37" in result.stderr and f"wrote 37 samples to {png}" in result.stdout
    loaded = checkpoint_lib.load_model(run_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the process ran (OMP_NUM_THREADS=1): the same float sums
    try:
        batches = sampling.generate_batches(
            loaded.model,
            NoiseSchedule.from_config(loaded.train_config),
            37,
            (1, 8, 8),
            batch_size=5,
            label=3,
            seed=7,
            num_steps=2,
        )
        expected = Image.fromarray(sampling.image_grid(torch.cat(list(batches)))[..., 0])
    finally:
        torch.set_num_threads(threads)
    expected = expected.resize((expected.width * 16, expected.height * 16), Image.NEAREST)
    with Image.open(png) as image:
        assert image.mode == "L" and np.array_equal(np.asarray(image), np.asarray(expected))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


# ---------------------------------------------------------------------------------------------
# The evaluation cache (item 13)


def _write_cache(root: Path, resolution: int = 8) -> tuple[Path, Path]:
    """A valid cache pair as load_or_train_classifier writes it, of an untrained (seeded)
    classifier: what is checked here is the cache, not the classifier."""
    torch.manual_seed(0)
    state = {
        k: v.contiguous()
        for k, v in builtin_classifier.DigitsClassifier(resolution).state_dict().items()
    }
    weights, info = builtin_classifier._cache_files(resolution, root)
    root.mkdir(parents=True, exist_ok=True)
    save_file(state, str(weights))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    fields = {
        "version": builtin_classifier.CLASSIFIER_VERSION,
        "resolution": resolution,
        "sha256": digest,
    }
    fields |= {"heldout_accuracy": 0.5, "heldout_images": 297, "train_seconds": 1.0}
    info.write_text(json.dumps(fields))
    return weights, info


def test_a_hand_edited_or_nan_classifier_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    weights, info = _write_cache(tmp_path / "cache")
    assert (
        builtin_classifier._load_cached(weights, info, 8)[0] is not None
    )  # the valid pair is used
    # NaN weights under a matching checksum: named, never used
    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = torch.full_like(state[name], float("nan"))
    nan_weights, nan_info = _write_cache(tmp_path / "nan")
    save_file(state, str(nan_weights))
    saved = json.loads(nan_info.read_text())
    saved["sha256"] = hashlib.sha256(nan_weights.read_bytes()).hexdigest()
    nan_info.write_text(json.dumps(saved))
    classifier, reason = builtin_classifier._load_cached(nan_weights, nan_info, 8)
    assert classifier is None and reason == f"{nan_weights} holds non-finite weights"
    # A string where a number belongs, or a missing field: rebuilt, with a warning naming the
    # file. (Training the classifier takes seconds on an idle CPU; an untrained one stands in.)
    monkeypatch.setattr(
        builtin_classifier,
        "train_classifier",
        lambda resolution, *a: (builtin_classifier.DigitsClassifier(8), 0.1),
    )
    for edit, why in [
        ({"heldout_accuracy": "high"}, "heldout_accuracy is 'high', not a finite number"),
        ({"heldout_images": None}, "heldout_images is None, not an integer"),
    ]:
        info.write_text(json.dumps({**json.loads(info.read_text()), **edit}))
        lines = []
        _, rebuilt = builtin_classifier.load_or_train_classifier(
            8, tmp_path / "cache", log=lines.append
        )
        assert rebuilt["trained_now"] and lines[0].startswith("warning: rebuilding the cache")
        assert f"{info} is damaged ({why})" in lines[0]
        assert (
            builtin_classifier._load_cached(weights, info, 8)[0] is not None
        )  # a valid pair again
