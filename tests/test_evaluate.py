"""Sample-quality metrics (fastsp/quality.py) and the evaluation command (fastsp/evaluate.py)."""

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import prefork
import pytest
import scipy.linalg
import torch

from fastsp import builtin_classifier, evaluate, evaluation, quality
from fastsp import train as train_cli
from fastsp.data import DigitsDataset
from fastsp.errors import EvaluationError

REPO = Path(__file__).resolve().parents[1]
_DIMS = (1, 3, 8, 17)  # feature sizes of the closed-form checks


def _spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _orthogonal(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _closed_form_commuting(mu1, a, mu2, b):
    """|mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 for commuting S1, S2 of eigenvalues a, b."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


# ---------------------------------------------------------------------------------------------
# Frechet distance against closed forms


@pytest.mark.parametrize("d", _DIMS)
def test_frechet_distance_diagonal_matches_closed_form(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 3
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    got = quality.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(_closed_form_commuting(mu1, a, mu2, b), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("d", _DIMS)
def test_frechet_distance_commuting_non_diagonal_matches_closed_form(d):
    rng = np.random.default_rng(100 + d)
    q = _orthogonal(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.05, 9, d), rng.uniform(0.05, 9, d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert d == 1 or not np.allclose(s1, np.diag(np.diag(s1)))  # really non-diagonal
    got = quality.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_closed_form_commuting(mu1, a, mu2, b), rel=1e-9, abs=1e-10)


@pytest.mark.parametrize("d", _DIMS)
def test_frechet_distance_general_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(200 + d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _spd(rng, d), _spd(rng, d, scale=2.5)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(
        s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2))
    )
    assert quality.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)
    # symmetric in its two Gaussians, zero for identical ones
    assert quality.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(reference, rel=1e-8)
    assert quality.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_singular_covariances_stay_finite():
    # dead feature units give zero-variance directions; sqrtm would return complex junk here
    a, b = np.array([0.0, 1.0, 4.0, 0.0]), np.array([0.0, 9.0, 0.0, 0.0])
    mu = np.zeros(4)
    got = quality.frechet_distance(mu, np.diag(a), mu + 1, np.diag(b))
    assert got == pytest.approx(_closed_form_commuting(mu, a, mu + 1, b), rel=1e-12)


def test_fid_of_gaussian_samples_matches_closed_form():
    n, d = 20_000, 8
    rng = np.random.default_rng(0)
    q = _orthogonal(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 0.5
    a, b = rng.uniform(0.5, 4, d), rng.uniform(0.5, 4, d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    x1 = rng.multivariate_normal(mu1, s1, size=n)
    x2 = rng.multivariate_normal(mu2, s2, size=n)
    exact = _closed_form_commuting(mu1, a, mu2, b)
    # Tolerance from the estimator's error to first order (delta method): the mean term moves by
    # 2 dmu.(e1 - e2), std 2 sqrt(dmu^T (S1 + S2) dmu / n); each eigenvalue estimate by
    # a_i sqrt(2 / n) z, moving (sqrt a - sqrt b)^2 by (a - sqrt(ab)) sqrt(2 / n) z; plus the
    # positive bias of plug-in estimates, at most about (tr S1 + tr S2) / n. 5 sigma + that bias.
    dmu = mu1 - mu2
    var = 4 * dmu @ (s1 + s2) @ dmu / n
    var += (2 / n) * (((a - np.sqrt(a * b)) ** 2).sum() + ((b - np.sqrt(a * b)) ** 2).sum())
    tolerance = 5 * math.sqrt(var) + (a.sum() + b.sum()) / n
    got = quality.fid(x1, x2)
    assert abs(got - exact) < tolerance, (got, exact, tolerance)
    assert tolerance < 0.05 * exact  # the check has teeth: 5% of the value or tighter
    assert quality.fid(x1[: n // 2], x1[n // 2 :]) < tolerance  # two samples of one Gaussian


# ---------------------------------------------------------------------------------------------
# Precision and recall, IS analogue, class accuracy


def test_precision_recall_identical_sets():
    x = np.random.default_rng(0).standard_normal((300, 6))
    assert quality.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_far_apart_sets():
    rng = np.random.default_rng(1)
    real, fake = rng.standard_normal((200, 6)), rng.standard_normal((150, 6)) + 100
    assert quality.precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_half_of_the_modes():
    rng = np.random.default_rng(2)
    angles = np.arange(10) * 2 * np.pi / 10
    centers = 50 * np.stack([np.cos(angles), np.sin(angles)], 1)  # 10 modes, 31 apart at least
    real = np.concatenate([c + rng.standard_normal((100, 2)) for c in centers])
    fake = np.concatenate([c + rng.standard_normal((200, 2)) for c in centers[:5]])
    precision, recall = quality.precision_recall(real, fake, k=3)
    assert precision > 0.95  # every fake lies on a real mode
    assert 0.45 < recall <= 0.5  # only the reals of the 5 covered modes are reached


def test_precision_recall_rejects_too_few_points():
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="k must be"):
        quality.precision_recall(x, np.ones((10, 2)), k=3)


def test_inception_score_analogue_extremes():
    confident = np.eye(10)[np.arange(1000) % 10]  # every class equally often, each sure
    assert quality.inception_score_analogue(confident) == pytest.approx(10, rel=1e-12)
    smoothed = 0.99 * confident + 0.01 / 10
    assert 9 < quality.inception_score_analogue(smoothed) < 10
    one_class = np.tile(np.eye(10)[3], (500, 1))
    assert quality.inception_score_analogue(one_class) == pytest.approx(1, rel=1e-12)
    unsure = np.full((500, 10), 0.1)
    assert quality.inception_score_analogue(unsure) == pytest.approx(1, rel=1e-12)


def test_class_accuracy():
    probs = np.eye(10)[[0, 1, 2, 3]]
    assert quality.class_accuracy(probs, torch.tensor([0, 1, 2, 9])) == 0.75
    with pytest.raises(ValueError, match="sum to 1"):
        quality.class_accuracy(np.ones((2, 10)), [0, 1])


# ---------------------------------------------------------------------------------------------
# The digits classifier (trained once per session, at the tiny preset's resolution)

_RESOLUTION = 8


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("fastsp_cache")
    start = time.perf_counter()
    classifier, info = builtin_classifier.load_or_train_classifier(_RESOLUTION, root)
    return root, classifier, info, time.perf_counter() - start


@pytest.fixture
def cache_env(classifier_cache, monkeypatch):
    """FASTSP_CACHE pointing at the session's classifier cache (never the home folder)."""
    monkeypatch.setenv("FASTSP_CACHE", str(classifier_cache[0]))
    return classifier_cache[0]


def test_classifier_trains_caches_and_is_accurate(classifier_cache, cache_env):
    root, _, info, seconds = classifier_cache
    assert info["trained_now"] and info["heldout_accuracy"] > 0.95
    assert sorted(p.suffix for p in root.iterdir()) == [".json", ".safetensors"]
    start = time.perf_counter()
    again, cached = builtin_classifier.load_or_train_classifier(_RESOLUTION)  # from $FASTSP_CACHE
    assert not cached["trained_now"] and time.perf_counter() - start < seconds / 5
    assert cached["heldout_accuracy"] == info["heldout_accuracy"]
    heldout = DigitsDataset("heldout", _RESOLUTION)
    _, probs = builtin_classifier.classify(again, heldout.images)
    assert quality.class_accuracy(probs, heldout.labels) == info["heldout_accuracy"]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garble_json", "delete_json"])
def test_damaged_classifier_cache_is_not_used(classifier_cache, tmp_path, damage):
    for file in classifier_cache[0].iterdir():
        shutil.copy(file, tmp_path / file.name)
    weights, info = builtin_classifier._cache_files(_RESOLUTION, tmp_path)
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip_byte":
        blob = bytearray(weights.read_bytes())
        blob[-5] ^= 0xFF  # inside a tensor: safetensors alone would load it
        weights.write_bytes(bytes(blob))
    elif damage == "garble_json":
        info.write_text("{not json")
    else:
        info.unlink()
    classifier, reason = builtin_classifier._load_cached(weights, info, _RESOLUTION)
    assert classifier is None and isinstance(reason, str)


def test_fid_real_split_far_below_fid_against_noise(classifier_cache):
    classifier = classifier_cache[1]
    train = DigitsDataset("train", _RESOLUTION).images
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(train)))
    half_a, half_b = train[perm[:750]], train[perm[750:]]
    noise = torch.rand(750, 1, _RESOLUTION, _RESOLUTION, generator=torch.Generator().manual_seed(0))
    feats_a, feats_b, feats_noise = (
        builtin_classifier.classify(classifier, x)[0] for x in (half_a, half_b, noise * 2 - 1)
    )
    real_vs_real, real_vs_noise = quality.fid(feats_a, feats_b), quality.fid(feats_a, feats_noise)
    assert real_vs_real < 0.05 * real_vs_noise, (real_vs_real, real_vs_noise)
    precision, recall = quality.precision_recall(feats_a, feats_b)
    assert precision > 0.85 and recall > 0.85
    # k-NN balls around outlying reals are wide: some noise lands in them (precision 0.30 here)
    noise_precision, noise_recall = quality.precision_recall(feats_a, feats_noise)
    assert noise_precision < 0.5 and noise_recall < 0.1


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two 2-step tiny-preset runs on digits at 8x8: class-conditional and unconditional."""
    root = tmp_path_factory.mktemp("eval_runs")
    runs = {}
    for cond in ("class", "none"):
        out = root / cond
        args = ["--preset", "tiny", "--steps", "2", "--cond", cond, "--device", "cpu"]
        assert train_cli.main([*args, "--out", str(out)]) == 0
        runs[cond] = out
    return runs


def _finite_numbers(value):
    if isinstance(value, dict):
        return [x for v in value.values() for x in _finite_numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_cli_end_to_end(tiny_runs, cache_env):
    env = {**os.environ, "FASTSP_CACHE": str(cache_env)}
    result = prefork.run(
        [sys.executable, "-m", "fastsp.evaluate", "--checkpoint", str(tiny_runs["class"])]
        + ["--num", "20", "--steps", "2"],
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FID (digits classifier features)" in result.stdout
    assert "class accuracy (requested class)" in result.stdout
    assert not list(tiny_runs["class"].glob("checkpoints/step_*/eval_*"))  # pruned by the trainer
    (out,) = tiny_runs["class"].glob("eval/step_*/eval_*.json")
    assert out.name == "eval_ddim_s2_cfg1_phi0_n20_ema_seed0.json"
    assert f"wrote {out}" in result.stdout
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert set(metrics) == {
        "fid",
        "precision",
        "recall",
        "inception_score_analogue",
        "class_accuracy",
    }
    assert all(math.isfinite(x) for x in _finite_numbers(report))
    assert metrics["fid"] >= 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert 1 <= metrics["inception_score_analogue"] <= 10 and 0 <= metrics["class_accuracy"] <= 1
    assert report["generated_images"] == 20 and report["real_images"] == 297
    assert report["settings"]["steps"] == 2 and report["settings"]["cfg"] == 1.0
    assert report["feature_network"]["heldout_accuracy"] > 0.95
    assert report["reference_real_train_vs_heldout"]["train_images"] == 20
    checkpoint = tiny_runs["class"] / "checkpoints" / out.parent.name
    assert report["checkpoint"] == str(checkpoint.resolve())


def test_unconditional_model_with_cfg_and_out(tiny_runs, cache_env, tmp_path, capsys):
    out = tmp_path / "sub" / "result.json"
    argv = ["--checkpoint", str(tiny_runs["none"]), "--num", "12", "--steps", "1"]
    assert evaluate.main([*argv, "--batch-size", "5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["class_accuracy"] is None
    assert "class accuracy" not in capsys.readouterr().out
    # seeded: the Python API with the same settings gives the same numbers
    again = evaluation.evaluate_checkpoint(tiny_runs["none"], num=12, steps=1, batch_size=5)
    assert again["metrics"] == report["metrics"]
    with pytest.raises(TypeError, match="unknown options"):
        evaluation.evaluate_checkpoint(tiny_runs["none"], nmu=12)
    assert evaluate.main([*argv, "--cfg", "3"]) == 2
    assert "unconditional" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_exits_2(tiny_runs, capsys):
    assert evaluate.main(["--checkpoint", str(tiny_runs["class"]), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def _other_data_checkpoint(tiny_runs, tmp_path):
    (checkpoint,) = tiny_runs["class"].glob("checkpoints/step_*")
    copy = tmp_path / "other" / checkpoint.name
    shutil.copytree(checkpoint, copy, ignore=shutil.ignore_patterns("eval_*"))
    config = json.loads((copy / "config.json").read_text())
    config["train"]["data"] = str(tmp_path / "my_images")
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num", "0"], "--num must be > 3"),
        (["--steps", "0"], "--steps"),
        (["--cfg-rescale", "1.5"], "--cfg-rescale"),
        (["--cfg", "nan"], "--cfg"),
        (["--inception-weights", "/nonexistent/inception.pth"], "do not exist"),
        (["--real-data", "/somewhere"], "only with --inception-weights"),
        (["--real-split", "test"], "--real-split must be one of heldout, train, got 'test'"),
        (["--real-split", "train", "--real-data", "/somewhere"], "pass only one of them"),
    ],
)
def test_bad_options_exit_2(tiny_runs, cache_env, capsys, extra, message):
    argv = ["--checkpoint", str(tiny_runs["class"]), "--num", "8", "--steps", "1", *extra]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_real_split_train_measures_against_the_training_images(
    tiny_runs, classifier_cache, cache_env, tmp_path, capsys
):
    argv = ["--checkpoint", str(tiny_runs["class"]), "--num", "12", "--steps", "1"]
    files = {split: tmp_path / f"{split}.json" for split in ("heldout", "train")}
    assert evaluate.main([*argv, "--out", str(files["heldout"])]) == 0
    assert "real images (digits held-out)" in capsys.readouterr().out
    assert evaluate.main([*argv, "--real-split", "train", "--out", str(files["train"])]) == 0
    printed = capsys.readouterr().out
    assert "real images (digits train)" in printed and "12 real held-out images" in printed
    heldout, train = (json.loads(f.read_text()) for f in files.values())
    assert heldout["real_split"] == "heldout" and train["real_split"] == "train"
    assert heldout["real_images"] == 297 and train["real_images"] == 1500
    assert "reference_real_train_vs_heldout" not in train
    floor = train["reference_real_heldout_vs_train"]
    assert floor["heldout_images"] == 12
    # the floor is 12 held-out images (the evaluation's fixed pick) against all training images
    classifier = classifier_cache[1]
    train_images = DigitsDataset("train", _RESOLUTION).images
    held_images = DigitsDataset("heldout", _RESOLUTION).images
    pick = torch.from_numpy(np.random.default_rng(0).permutation(len(held_images))[:12])
    expected = quality.fid(
        builtin_classifier.classify(classifier, train_images)[0],
        builtin_classifier.classify(classifier, held_images[pick])[0],
    )
    assert floor["fid"] == pytest.approx(expected, rel=1e-9)
    assert floor["fid"] != pytest.approx(heldout["reference_real_train_vs_heldout"]["fid"])
    # the same samples (seeded), measured against another real set
    assert train["metrics"]["fid"] != pytest.approx(heldout["metrics"]["fid"])
    assert train["metrics"]["class_accuracy"] == heldout["metrics"]["class_accuracy"]
    again = evaluation.evaluate_checkpoint(tiny_runs["class"], num=12, steps=1, real_split="train")
    assert again["metrics"] == train["metrics"]
    with pytest.raises(EvaluationError, match="--real-split must be one of"):
        evaluation.evaluate_checkpoint(tiny_runs["class"], num=12, steps=1, real_split="validation")
    args = evaluate.build_parser().parse_args([*argv, "--real-split", "train"])
    assert (
        evaluate.default_out(Path("c"), args).name
        == "eval_ddim_s1_cfg1_phi0_n12_ema_seed0_train.json"
    )


def test_inception_path_names_what_is_missing(tiny_runs, cache_env, tmp_path, capsys):
    weights = tmp_path / evaluation.INCEPTION_FILE
    weights.write_bytes(b"not really weights")
    argv = ["--checkpoint", str(tiny_runs["class"]), "--num", "8", "--steps", "1"]
    assert evaluate.main([*argv, "--inception-weights", "/nonexistent/w.pth"]) == 2
    err = capsys.readouterr().err
    assert evaluation.INCEPTION_FILE in err and "downloads nothing" in err
    try:
        import torch_fidelity  # noqa: F401
    except Exception:
        assert evaluate.main([*argv, "--inception-weights", str(weights)]) == 2
        assert "pip install torch-fidelity" in capsys.readouterr().err


def test_checkpoint_of_other_data_needs_inception(tiny_runs, cache_env, tmp_path, capsys):
    checkpoint = _other_data_checkpoint(tiny_runs, tmp_path)
    assert evaluate.main(["--checkpoint", str(checkpoint), "--num", "8"]) == 2
    err = capsys.readouterr().err
    assert "not the built-in digits" in err and "--inception-weights" in err
    assert not list(checkpoint.glob("eval_*"))


def test_damaged_or_missing_checkpoint_exits_2(tiny_runs, cache_env, tmp_path, capsys):
    (checkpoint,) = tiny_runs["class"].glob("checkpoints/step_*")
    damaged = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, damaged, ignore=shutil.ignore_patterns("eval_*"))
    ema = damaged / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])
    assert evaluate.main(["--checkpoint", str(damaged), "--num", "8"]) == 2
    assert "ema.safetensors" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(tmp_path / "nothing"), "--num", "8"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The guidance gap: --cfg-sweep and the share of the gap recovered


def test_cfg_sweep_scores_each_scale_as_a_plain_evaluation(tiny_runs, cache_env, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    argv = ["--checkpoint", str(tiny_runs["class"]), "--num", "12", "--steps", "2"]
    assert (
        evaluate.main([*argv, "--cfg-sweep", "1,2.5", "--cfg-rescale", "0.7", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    sweep = report["cfg_sweep"]
    assert [row["cfg"] for row in sweep["rows"]] == [1.0, 2.5]
    assert report["settings"]["cfg_sweep"] == [1.0, 2.5]
    for row in sweep["rows"]:
        # each scale's row equals a plain evaluation with that --cfg (same seed, noise, labels)
        plain = evaluation.evaluate_checkpoint(
            tiny_runs["class"], num=12, steps=2, cfg=row["cfg"], cfg_rescale=0.7
        )
        assert row["metrics"] == plain["metrics"]
        # and its selection FID is the plain evaluation against the training split
        on_train = evaluation.evaluate_checkpoint(
            tiny_runs["class"], num=12, steps=2, cfg=row["cfg"], cfg_rescale=0.7, real_split="train"
        )
        assert row["train_split_fid"] == pytest.approx(on_train["metrics"]["fid"], rel=1e-12)
        assert f"cfg {row['cfg']:g}: FID" in printed
    assert sweep["rows"][0]["metrics"] != sweep["rows"][1]["metrics"]  # guidance changed samples
    best = min(sweep["rows"], key=lambda row: row["train_split_fid"])
    assert sweep["best_cfg"] == best["cfg"] and sweep["chosen_on"] == "train split"
    assert report["metrics"] == best["metrics"]  # the headline numbers are the chosen scale's
    assert f"best CFG (lowest train-split FID); its metrics below | {best['cfg']:g}" in printed
    args = evaluate.build_parser().parse_args([*argv, "--cfg-sweep", "1,2.5"])
    assert evaluate.default_out(Path("c"), args).name == (
        "eval_ddim_s2_cfgsweep1-2.5_phi0_n12_ema_seed0.json"
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cfg-sweep", "1,x"], "--cfg-sweep must be a comma-separated list"),
        (["--cfg-sweep", "1,-2"], "--cfg-sweep must be a comma-separated list"),
        (["--cfg-sweep", ""], "--cfg-sweep must be a comma-separated list"),
        (["--cfg-sweep", "1,2,1"], "lists a scale twice"),
        (["--cfg-sweep", "1,2", "--cfg", "3"], "pass it or --cfg, not both"),
        (["--cfg-sweep", "1,2", "--inception-weights", "w.pth"], "pass one --cfg per call"),
    ],
)
def test_bad_cfg_sweep_exits_2(tiny_runs, cache_env, capsys, extra, message):
    argv = ["--checkpoint", str(tiny_runs["class"]), "--num", "8", "--steps", "1", *extra]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cfg_sweep_of_an_unconditional_model_exits_2(tiny_runs, cache_env, capsys):
    argv = ["--checkpoint", str(tiny_runs["none"]), "--num", "8", "--cfg-sweep", "1,2"]
    assert evaluate.main(argv) == 2
    assert "need a class-conditional model" in capsys.readouterr().err


def test_guidance_gap_share():
    # the paper's Stable Diffusion 2.1 numbers: FID 29.63 (MSE), 24.42 (SP), 18.67 (MSE + CFG)
    share = quality.guidance_gap_share(29.63, 24.42, 18.67)
    assert share == pytest.approx((29.63 - 24.42) / (29.63 - 18.67), rel=1e-15)
    assert quality.format_gap_share(share) == "0.48"
    assert quality.guidance_gap_share(20.0, 10.0, 10.0) == 1.0  # all of the gap
    assert quality.guidance_gap_share(20.0, 22.5, 15.0) == pytest.approx(-0.5)  # worse than MSE
    # no gap (the best scale is no guidance, or guidance is worse): no division by ~0
    for best in (13.0, 13.0 + 1e-12, 13.0 - 1e-9, 15.0, float("nan")):
        assert quality.guidance_gap_share(13.0, 16.1, best) is None
        assert quality.format_gap_share(quality.guidance_gap_share(13.0, 16.1, best)) == "no gap"
