"""Sample quality of a checkpoint: FID, precision/recall, an Inception-Score analogue, accuracy.

python -m fastsp.evaluate --checkpoint runs/digits                       # 1,000 samples, no CFG
python -m fastsp.evaluate --checkpoint runs/digits --cfg 7.5 --cfg-rescale 0.7 --steps 50
python -m fastsp.evaluate --checkpoint runs/faces --inception-weights \
        weights-inception-2015-12-05-6726825d.pth --real-data /data/faces_heldout
python -m fastsp.evaluate --checkpoint runs/digits --real-split train    # for model selection
python -m fastsp.evaluate --checkpoint runs/digits --cfg-sweep 1,1.25,1.5,2,3 --cfg-rescale 0.7

Generated samples are compared with the held-out real images in the feature space of a feature
network (the math is in fastsp/quality.py):

- Digits models: a small CNN classifier that fastsp trains on the digits training split (about
  five seconds on a CPU, seeded, never tuned on the held-out split), cached under $FASTSP_CACHE
  (default ~/.cache/fastsp) and re-trained when its files are missing or damaged. Its 64-dim
  penultimate layer gives the features of FID and precision/recall (k = 3 nearest neighbours), its
  softmax the Inception-Score analogue and, for class-conditional models, the fraction of samples
  classified as the class they were generated for. The real set is the 297 held-out images; FID
  grows as sample sets shrink, so the output also gives the same metrics for real training images
  against the held-out ones, a floor to read the model's numbers against.
- Letters models (`--data letters`, fastsp/letters.py): the same network and training recipe
  on the letters training split (62 classes), its own cache file; 1,116 held-out images.
- `--cfg-sweep W1,W2,...` scores every scale from one model load, each from the same noise and
  labels, and names the scale of lowest FID against the training split (`cfg_sweep.best_cfg`,
  whose metrics are the headline ones): the guidance gap is the no-CFG FID minus that one.
- `--real-split train` measures against the 1,500 digits training images instead, so that
  settings can be chosen without looking at the held-out split (choose on train, report held-out
  once). The real-vs-real line is then the held-out images against the training ones, one fixed
  number per sample count; it is no floor, since the model and the classifier both learned the
  training images and samples near them score below it. The JSON's `real_split` names the split.
- Other image models: Inception-v3 FID and Inception Score through torch-fidelity, from a weights
  file on disk (nothing is downloaded), against the images of --real-data (or the digits
  held-out split); no precision/recall there.

The results are printed as a table and written as JSON beside the checkpoint
(CHECKPOINT/eval_<settings>.json, or --out). Exit status 0, or 2 on invalid input with a one-line
error naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fastsp import checkpoint as checkpoint_lib
from fastsp import quality
from fastsp.config_fields import SAMPLERS
from fastsp.data import DigitsDataset, ImageFolderDataset
from fastsp.errors import CheckpointError, DataError, EvaluationError
from fastsp.letters import LettersDataset
from fastsp.run_folder import check_output_file
from fastsp.sample import check_sampling, default_labels, generate_batches, schedule_from_config

CLASSIFIER_VERSION = "digits-cnn-v1"  # change when the network or its training changes
# Each built-in data set: its data set class and its classifier's version (change the version
# when the network or its training changes: the cache is keyed by it).
BUILTIN = {
    "digits": (DigitsDataset, CLASSIFIER_VERSION),
    "letters": (LettersDataset, "letters-cnn-v1"),
}
FEATURE_DIM = 64
NEAREST_K = 3  # Kynkaenniemi et al. 2019's default neighbourhood size
DEFAULT_NUM = 1000
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's Inception-v3
REAL_SPLITS = ("heldout", "train")  # the built-in split the samples are measured against
_TRAIN_EPOCHS = 15
_TRAIN_BATCH = 64
_TRAIN_LR = 2e-3
_TRAIN_SEED = 0


# ---------------------------------------------------------------------------------------------
# The digits feature network


class DigitsClassifier(nn.Module):
    """A small CNN on [N, 1, R, R] digits in [-1, 1]: 3 convs -> 64-dim features -> 10 classes.

    The second conv halves images of 16 pixels and more, so every resolution costs about
    0.9 MFLOP per image at most 16x16 and it trains in seconds on a CPU.
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
        checkpoint_lib.atomic_write_bytes(weights_file, blob)
        checkpoint_lib.atomic_write_text(info_file, json.dumps(info, indent=2) + "\n")
    except OSError as error:  # a read-only cache costs a re-training next time, nothing else
        if log is not None:
            log(f"warning: cannot cache the classifier in {root} ({error})")
    return classifier, {**info, "trained_now": True, "cache_file": str(weights_file)}


# ---------------------------------------------------------------------------------------------
# Inception-v3 through torch-fidelity


def _import_torch_fidelity():
    try:
        import torch_fidelity
    except Exception as error:  # ImportError, or torchvision failing to load beside this torch
        raise EvaluationError(
            f"--inception-weights needs torch-fidelity, which cannot be imported ({error}): "
            "pip install torch-fidelity (it needs a torchvision that matches your torch)"
        ) from None
    return torch_fidelity


def _to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[N, 1 or 3, H, W] in [-1, 1] -> uint8 [N, 3, H, W], as Inception-v3 takes them."""
    pixels = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


class _Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def inception_metrics(
    fake: torch.Tensor, real: torch.Tensor, weights: str | Path, device: str = "cpu"
) -> dict[str, float]:
    """Inception-v3 FID and Inception Score (torch-fidelity) of fake against real uint8 images."""
    torch_fidelity = _import_torch_fidelity()
    try:
        metrics = torch_fidelity.calculate_metrics(
            input1=_Uint8Images(fake),
            input2=_Uint8Images(real),
            cuda=device == "cuda",
            fid=True,
            isc=True,
            isc_splits=min(10, len(fake)),
            feature_extractor="inception-v3-compat",
            feature_extractor_weights_path=str(weights),
            cache=False,  # no feature cache under $TORCH_HOME
            verbose=False,
        )
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvaluationError(
            f"torch-fidelity could not compute Inception metrics with '{weights}' ({first}); "
            f"is it {INCEPTION_FILE}?"
        ) from None
    return {
        "fid": float(metrics[torch_fidelity.KEY_METRIC_FID]),
        "inception_score": float(metrics[torch_fidelity.KEY_METRIC_ISC_MEAN]),
        "inception_score_std": float(metrics[torch_fidelity.KEY_METRIC_ISC_STD]),
    }


# ---------------------------------------------------------------------------------------------
# The evaluation


def _builtin_data(train: dict[str, Any]) -> str | None:
    """The built-in data set ("digits" or "letters") the run trained on, or None."""
    data = train.get("data")
    return data if data in BUILTIN and train.get("data_format") in ("auto", data) else None


def _check_args(args) -> None:
    """Refuse option values that cannot work, before the checkpoint is read."""
    if args.num <= NEAREST_K:
        raise EvaluationError(
            f"--num must be > {NEAREST_K} (precision/recall use k = {NEAREST_K}), got {args.num}"
        )
    check_sampling(args)  # the rules `python -m fastsp.sample` applies to the same options
    if args.cfg_sweep is not None:
        cfg_scales(args)  # raises on a bad list
        if args.cfg != 1:
            raise EvaluationError("--cfg-sweep scores several scales; pass it or --cfg, not both")
        if args.inception_weights is not None:
            raise EvaluationError(
                "--cfg-sweep scores with the built-in classifier only; for Inception metrics "
                "pass one --cfg per call"
            )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda, but torch sees no CUDA GPU; use --device cpu")
    if args.real_split not in REAL_SPLITS:
        raise EvaluationError(
            f"--real-split must be one of {', '.join(REAL_SPLITS)}, got {args.real_split!r}: "
            "heldout reports, train chooses settings without looking at the held-out digits"
        )


def cfg_scales(args) -> tuple[float, ...]:
    """The CFG scales to score: --cfg-sweep's comma-separated list (e.g. "1,1.5,3"), or --cfg."""
    if args.cfg_sweep is None:
        return (args.cfg,)
    spec = args.cfg_sweep
    try:
        scales = tuple(float(part) for part in (spec.split(",") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        scales = ()
    if not scales or not all(math.isfinite(x) and x >= 0 for x in scales):
        raise EvaluationError(
            f"--cfg-sweep must be a comma-separated list of finite scales >= 0, e.g. "
            f"1,1.25,1.5,2,3; got {spec!r}"
        )
    if len(set(scales)) != len(scales):
        raise EvaluationError(f"--cfg-sweep lists a scale twice ({spec!r}); list each once")
    return scales


def _check_inputs(args, config: dict[str, Any], model) -> torch.Tensor | None:
    """Refuse what cannot be evaluated, before any sample is drawn; the real Inception images."""
    train = config["train"]
    if (args.cfg != 1 or args.cfg_sweep is not None) and model.config.num_classes == 0:
        raise EvaluationError(
            "--cfg and --cfg-sweep need a class-conditional model; this one is unconditional"
        )
    if model.config.context_dim > 0:
        raise EvaluationError(
            "this model is conditioned on a context sequence; evaluating it needs your own "
            "context encoder"
        )
    if train.get("data_format") == "latents" or model.config.in_channels not in (1, 3):
        raise EvaluationError(
            f"this model was trained on {model.config.in_channels}-channel latents or synthetic "
            "data, not images; its samples need a VAE decoder fastsp does not have"
        )
    builtin = _builtin_data(train)
    if args.real_split != "heldout" and args.real_data is not None:
        raise EvaluationError(
            f"--real-split {args.real_split} picks a split of the built-in data, but the real "
            "images are the --real-data folder here; pass only one of them"
        )
    if args.inception_weights is None:
        if args.real_data is not None:
            raise EvaluationError("--real-data is used only with --inception-weights")
        if builtin is None:
            raise EvaluationError(
                f"this checkpoint was trained on '{train.get('data')}', not the built-in digits "
                f"or letters, so no built-in classifier can score it: pass --inception-weights "
                f"{INCEPTION_FILE} and --real-data FOLDER (held-out images)"
            )
        return None
    weights = Path(args.inception_weights)
    if not weights.is_file():
        raise EvaluationError(
            f"Inception weights '{weights}' do not exist: download {INCEPTION_FILE} (torch-"
            "fidelity's Inception-v3, from its GitHub releases) yourself and pass its path; "
            "fastsp downloads nothing"
        )
    _import_torch_fidelity()
    if args.real_data is None:
        if builtin is None:
            raise EvaluationError("--inception-weights needs --real-data FOLDER (held-out images)")
        real = BUILTIN[builtin][0](args.real_split, train["resolution"]).images
    else:
        folder = ImageFolderDataset(
            args.real_data, train["resolution"], model.config.in_channels, random_flip=False
        )
        real = torch.stack([folder[i]["x"] for i in range(len(folder))])
    return _to_uint8_rgb(real)


def _generate_all(model, config, args) -> torch.Tensor:
    """`args.num` samples, labels cycling through the classes, drawn as `python -m
    fastsp.sample` draws them (fastsp.sample.generate_batches: batch b from noise seeded by
    (seed, b))."""
    train = config["train"]
    shape = (model.config.in_channels, train["resolution"], train["resolution"])
    batches = generate_batches(
        model,
        schedule_from_config(train),
        args.num,
        shape,
        batch_size=args.batch_size,
        seed=args.seed,
        num_steps=args.steps,
        sampler=args.sampler,
        guidance_scale=args.cfg,
        guidance_rescale=args.cfg_rescale,
        device=args.device,
    )
    return torch.cat(list(batches))


def _scores(classifier, samples, labels, real_features) -> tuple[dict[str, Any], np.ndarray]:
    """The metrics of samples against real features, and the samples' features."""
    fake_features, fake_probs = classify(classifier, samples)
    precision, recall = quality.precision_recall(real_features, fake_features, NEAREST_K)
    metrics = {
        "fid": quality.fid(real_features, fake_features),
        "precision": precision,
        "recall": recall,
        "inception_score_analogue": quality.inception_score_analogue(fake_probs),
        "class_accuracy": (
            quality.class_accuracy(fake_probs, labels) if labels is not None else None
        ),
    }
    return metrics, fake_features


def _builtin_metrics(
    samples: dict[float, torch.Tensor],
    labels,
    resolution: int,
    classifier,
    info,
    real_split: str = "heldout",
    data: str = "digits",
    sweep: bool = False,
) -> dict[str, Any]:
    """Metrics of the samples of each CFG scale against the built-in `real_split`, each scale's
    FID against the training split (the one a scale is chosen on), and the floor: the other
    split's real images (as many as samples, at most all of them) against the same real set."""
    dataset_class = BUILTIN[data][0]
    other_split = "train" if real_split == "heldout" else "heldout"
    real, other = dataset_class(real_split, resolution), dataset_class(other_split, resolution)
    real_features, real_probs = classify(classifier, real.images)
    train_features = (
        real_features if real_split == "train" else classify(classifier, other.images)[0]
    )
    rows = []
    for scale, images in samples.items():
        metrics, fake_features = _scores(classifier, images, labels, real_features)
        train_fid = quality.fid(train_features, fake_features)
        rows.append({"cfg": scale, "metrics": metrics, "train_split_fid": train_fid})
    # The same metrics for the other split's real images (as many as samples, up to all of them)
    n_samples = len(next(iter(samples.values())))
    n_other = min(n_samples, len(other))
    pick = torch.from_numpy(np.random.default_rng(0).permutation(len(other))[:n_other])
    other_features, other_probs = classify(classifier, other.images[pick])
    ref_precision, ref_recall = quality.precision_recall(real_features, other_features, NEAREST_K)
    reference = {
        f"{other_split}_images": n_other,
        "fid": quality.fid(real_features, other_features),
        "precision": ref_precision,
        "recall": ref_recall,
        "inception_score_analogue": quality.inception_score_analogue(other_probs),
        f"inception_score_analogue_{real_split}": quality.inception_score_analogue(real_probs),
    }
    network = {
        "name": f"fastsp {data} classifier ({BUILTIN[data][1]}), penultimate layer",
        "feature_dim": FEATURE_DIM,
        "resolution": resolution,
        "heldout_accuracy": info["heldout_accuracy"],
        "train_seconds": info["train_seconds"],
        "cache_file": info["cache_file"],
    }
    result = {
        "data": data,
        "metrics": rows[0]["metrics"],
        reference_key(real_split): reference,
        "feature_network": network,
        "real_images": len(real),
    }
    if sweep:
        # the FID-optimal scale on the training split: choosing on the held-out split would
        # make the held-out numbers of the chosen scale optimistic
        best = min(rows, key=lambda row: row["train_split_fid"])
        result["metrics"] = best["metrics"]
        result["cfg_sweep"] = {"rows": rows, "best_cfg": best["cfg"], "chosen_on": "train split"}
    return result


def reference_key(real_split: str) -> str:
    """The JSON key of the floor: "reference_real_train_vs_heldout" for the held-out split."""
    other_split = "train" if real_split == "heldout" else "heldout"
    return f"reference_real_{other_split}_vs_{real_split}"


def evaluate(args: argparse.Namespace, log=None) -> dict[str, Any]:
    """Run the evaluation that the parsed command line describes; return the JSON's contents."""
    start = time.perf_counter()
    _check_args(args)
    checkpoint = checkpoint_lib.resolve_checkpoint(args.checkpoint)
    model, config = checkpoint_lib.load_model(checkpoint, weights=args.weights, device=args.device)
    real_uint8 = _check_inputs(args, config, model)
    resolution = config["train"]["resolution"]
    builtin = _builtin_data(config["train"])
    if builtin is not None:  # before sampling: a cache problem shows at once
        classifier, info = load_or_train_classifier(resolution, log=log, data=builtin)
    labels = default_labels(args.num, model.config.num_classes, None)
    # One model load for every scale of a sweep; each scale starts from the same noise (the
    # batches' seeds depend on --seed only) and the same labels, so scales differ by CFG alone.
    scales = cfg_scales(args)
    samples = {}
    t0 = time.perf_counter()
    for scale in scales:
        if log is not None:
            log(
                f"generating {args.num} samples ({args.sampler}, {args.steps} steps, cfg {scale:g})"
            )
        samples[scale] = _generate_all(
            model, config, argparse.Namespace(**{**vars(args), "cfg": scale})
        )
    generate_seconds = time.perf_counter() - t0
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint.resolve()),
        "step": checkpoint_lib.read_state(checkpoint).get("step"),
        "settings": {
            "num": args.num,
            "steps": args.steps,
            "sampler": args.sampler,
            "cfg": args.cfg,
            "cfg_sweep": list(scales) if args.cfg_sweep is not None else None,
            "cfg_rescale": args.cfg_rescale,
            "seed": args.seed,
            "weights": args.weights,
            "batch_size": args.batch_size,
            "device": args.device,
            "nearest_k": NEAREST_K,
            "labels": "cycling through the classes" if labels is not None else "unconditional",
        },
        "generated_images": args.num,
    }
    if args.real_data is None:
        result["real_split"] = args.real_split
    if builtin is not None:
        result.update(
            _builtin_metrics(
                samples,
                labels,
                resolution,
                classifier,
                info,
                args.real_split,
                builtin,
                sweep=args.cfg_sweep is not None,
            )
        )
    if real_uint8 is not None:
        if log is not None:
            log(f"Inception-v3 features of {args.num} samples and {len(real_uint8)} real images")
        result["inception"] = {
            **inception_metrics(
                _to_uint8_rgb(samples[args.cfg]), real_uint8, args.inception_weights, args.device
            ),
            "weights": str(Path(args.inception_weights).resolve()),
            "real_data": args.real_data or f"{builtin} {args.real_split} split",
            "real_images": len(real_uint8),
        }
    result["seconds"] = {
        "generate": round(generate_seconds, 2),
        "total": round(time.perf_counter() - start, 2),
    }
    return result


def evaluate_checkpoint(checkpoint: str | Path, log=None, **options) -> dict[str, Any]:
    """`evaluate` from Python: options are the command line's, e.g. num=200, cfg=3, cfg_rescale=0.7.

    Returns the dict the command writes as JSON (nothing is written here).
    """
    args = build_parser().parse_args(["--checkpoint", str(checkpoint)])
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise TypeError(f"unknown options {unknown}; known: {sorted(vars(args))}")
    vars(args).update(options)
    return evaluate(args, log=log)


def default_out(checkpoint: Path, args: argparse.Namespace) -> Path:
    """CHECKPOINT/eval_<sampler>_s<steps>_cfg<w>_phi<phi>_n<num>_<weights>_seed<seed>[_train]
    [_inception].json (_train: measured against the training split; a sweep's cfg<w> is
    cfgsweep<w1>-<w2>-...)"""
    cfg = (
        f"cfg{args.cfg:g}"
        if args.cfg_sweep is None
        else "cfgsweep" + "-".join(f"{x:g}" for x in cfg_scales(args))
    )
    tag = (
        f"{args.sampler}_s{args.steps}_{cfg}_phi{args.cfg_rescale:g}_n{args.num}_"
        f"{args.weights}_seed{args.seed}"
    )
    if args.real_split != "heldout":
        tag += f"_{args.real_split}"
    suffix = "_inception" if args.inception_weights is not None else ""
    return checkpoint / f"eval_{tag}{suffix}.json"


def format_table(result: dict[str, Any]) -> str:
    """The results as a two-column text table (metric | value)."""
    rows = [
        ("checkpoint", result["checkpoint"]),
        ("generated images", str(result["generated_images"])),
    ]
    if "metrics" in result:
        split = result.get("real_split", "heldout")
        m, ref = result["metrics"], result[reference_key(split)]
        net = result["feature_network"]
        other = "train" if split == "heldout" else "heldout"
        names = {"heldout": "held-out", "train": "train"}
        data = result.get("data", "digits")
        classes = BUILTIN[data][0].num_classes
        sweep = result.get("cfg_sweep")
        if sweep is not None:
            for row in sweep["rows"]:
                r = row["metrics"]
                rows.append(
                    (
                        f"cfg {row['cfg']:g}: FID / precision / recall (train-split FID)",
                        f"{r['fid']:.3f} / {r['precision']:.4f} / {r['recall']:.4f} "
                        f"({row['train_split_fid']:.3f})",
                    )
                )
            best = f"{sweep['best_cfg']:g}"
            rows.append(("best CFG (lowest train-split FID); its metrics below", best))
        rows += [
            (f"real images ({data} {names[split]})", str(result["real_images"])),
            (f"FID ({data} classifier features)", f"{m['fid']:.3f}"),
            (f"precision (k={NEAREST_K})", f"{m['precision']:.4f}"),
            (f"recall (k={NEAREST_K})", f"{m['recall']:.4f}"),
            (f"Inception Score analogue (max {classes})", f"{m['inception_score_analogue']:.3f}"),
        ]
        if m["class_accuracy"] is not None:
            rows.append(("class accuracy (requested class)", f"{m['class_accuracy']:.4f}"))
        rows += [
            (
                f"reference FID, {ref[f'{other}_images']} real {names[other]} images",
                f"{ref['fid']:.3f}",
            ),
            ("reference precision / recall", f"{ref['precision']:.4f} / {ref['recall']:.4f}"),
            (f"reference IS analogue ({names[other]})", f"{ref['inception_score_analogue']:.3f}"),
            ("classifier held-out accuracy", f"{net['heldout_accuracy']:.4f}"),
        ]
    if "inception" in result:
        inc = result["inception"]
        rows += [
            ("real images (Inception)", str(inc["real_images"])),
            ("FID (Inception-v3)", f"{inc['fid']:.3f}"),
            (
                "Inception Score",
                f"{inc['inception_score']:.3f} +- {inc['inception_score_std']:.3f}",
            ),
        ]
    rows.append(
        (
            "seconds (generation / total)",
            f"{result['seconds']['generate']:.1f} / {result['seconds']['total']:.1f}",
        )
    )
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}} | value", f"{'-' * width}-|-{'-' * 10}"]
    lines += [f"{name:<{width}} | {value}" for name, value in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastsp.evaluate", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder, or a run folder (its latest)"
    )
    parser.add_argument(
        "--num", type=int, default=DEFAULT_NUM, help=f"samples to generate (default {DEFAULT_NUM})"
    )
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    parser.add_argument(
        "--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)"
    )
    parser.add_argument(
        "--cfg-sweep",
        default=None,
        metavar="W1,W2,...",
        help="score each of these CFG scales (e.g. 1,1.25,1.5,2,3) from one model load, the "
        "same noise and labels, and name the one of lowest FID on the training split",
    )
    parser.add_argument("--cfg-rescale", type=float, default=0.0, help="CFG rescale phi in [0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--weights", default="ema", choices=("ema", "model"), help="EMA (default) or online weights"
    )
    parser.add_argument(
        "--batch-size", type=int, default=500, help="samples generated at once (default 500)"
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default CHECKPOINT/eval_<settings>.json)"
    )
    parser.add_argument(
        "--inception-weights",
        default=None,
        help=f"a local {INCEPTION_FILE} (torch-fidelity's Inception-v3) for Inception FID and IS",
    )
    parser.add_argument(
        "--real-data", default=None, help="folder of real images for --inception-weights"
    )
    parser.add_argument(
        "--real-split",
        default="heldout",
        metavar="{heldout,train}",
        help="digits split the samples are measured against: heldout (default, for reporting) "
        "or train (for choosing settings without the held-out split)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.out:  # before any sample is drawn: a result that cannot be written is refused now
            check_output_file(args.out)
        result = evaluate(args, log=log)
    except (ValueError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out(Path(result["checkpoint"]), args)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        checkpoint_lib.atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    except OSError as error:
        print(f"error: cannot write {out} ({error}); pass another --out", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
