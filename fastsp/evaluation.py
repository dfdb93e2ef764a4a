"""Measuring the sample quality of a checkpoint: FID, precision/recall, an Inception-Score
analogue, class accuracy.

Generated samples are compared with real images in the feature space of a feature network (the
math is in fastsp/quality.py); `python -m fastsp.evaluate` is the command over this module.

- Digits models: the built-in classifier of fastsp/builtin_classifier.py, trained on the digits
  training split. Its 64-dim penultimate layer gives the features of FID and precision/recall
  (k = 3 nearest neighbours), its softmax the Inception-Score analogue and, for class-conditional
  models, the fraction of samples classified as the class they were generated for. The real set
  is the 297 held-out images; FID grows as sample sets shrink, so the result also gives the same
  metrics for real training images against the held-out ones, a floor to read the model's
  numbers against.
- Letters models (`--data letters`, fastsp/letters.py): the same network and training recipe
  on the letters training split (62 classes), its own cache file; 1,116 held-out images.
- A CFG sweep (`cfg_sweep` "W1,W2,...") scores every scale from one model load, each from the
  same noise and labels, and names the scale of lowest FID against the training split
  (`cfg_sweep.best_cfg`, whose metrics are the headline ones): the guidance gap is the no-CFG FID
  minus that one.
- `real_split` "train" measures against the 1,500 digits training images instead, so that
  settings can be chosen without looking at the held-out split (choose on train, report held-out
  once). The real-vs-real line is then the held-out images against the training ones, one fixed
  number per sample count; it is no floor, since the model and the classifier both learned the
  training images and samples near them score below it. The result's `real_split` names the split.
- Other image models: Inception-v3 FID and Inception Score through torch-fidelity, from a weights
  file on disk (nothing is downloaded), against the images of `real_data` (or the digits
  held-out split); no precision/recall there.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastsp import quality
from fastsp.builtin_classifier import BUILTIN, FEATURE_DIM, classify, load_or_train_classifier
from fastsp.checkpoint import LoadedModel, load_model
from fastsp.config import TrainConfig
from fastsp.errors import EvaluationError
from fastsp.flow import process_from_config
from fastsp.image_folder import ImageFolderDataset
from fastsp.sampling import check_sampling, default_labels, generate_batches

NEAREST_K = 3  # Kynkaenniemi et al. 2019's default neighbourhood size
DEFAULT_NUM = 1000
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's Inception-v3
REAL_SPLITS = ("heldout", "train")  # the built-in split the samples are measured against


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    """What to evaluate and how: the options of `python -m fastsp.evaluate` (its --out aside),
    with the same defaults."""

    checkpoint: str | Path  # a checkpoint folder, or a run folder (its latest)
    num: int = DEFAULT_NUM  # samples to generate
    steps: int = 50  # sampler steps
    sampler: str = "ddim"
    cfg: float = 1.0  # classifier-free guidance scale (1 = none)
    cfg_sweep: str | Sequence[float] | None = None  # scales to score from one load, "1,1.5,3"
    cfg_rescale: float = 0.0  # CFG rescale phi in [0, 1]
    seed: int = 0  # seed of the sampling noise
    device: str = "cpu"
    weights: str = "ema"  # the EMA or the online ("model") weights
    batch_size: int = 500  # samples generated at once
    inception_weights: str | None = None  # a local INCEPTION_FILE: Inception FID and IS
    real_data: str | None = None  # folder of real images for inception_weights
    real_split: str = "heldout"  # the built-in split measured against: "heldout" or "train"


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


def _builtin_data(train: TrainConfig) -> str | None:
    """The built-in data set ("digits" or "letters") the run trained on, or None."""
    data = train.data
    return data if data in BUILTIN and train.data_format in ("auto", data) else None


def _check_settings(settings: EvaluationSettings) -> None:
    """Refuse option values that cannot work, before the checkpoint is read."""
    if settings.num <= NEAREST_K:
        raise EvaluationError(
            f"--num must be > {NEAREST_K} (precision/recall use k = {NEAREST_K}), "
            f"got {settings.num}"
        )
    check_sampling(settings)  # the rules `python -m fastsp.sample` applies to the same options
    if settings.cfg_sweep is not None:
        cfg_scales(settings)  # raises on a bad list
        if settings.cfg != 1:
            raise EvaluationError("--cfg-sweep scores several scales; pass it or --cfg, not both")
        if settings.inception_weights is not None:
            raise EvaluationError(
                "--cfg-sweep scores with the built-in classifier only; for Inception metrics "
                "pass one --cfg per call"
            )
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda, but torch sees no CUDA GPU; use --device cpu")
    if settings.real_split not in REAL_SPLITS:
        raise EvaluationError(
            f"--real-split must be one of {', '.join(REAL_SPLITS)}, got {settings.real_split!r}: "
            "heldout reports, train chooses settings without looking at the held-out digits"
        )


def cfg_scales(settings: EvaluationSettings) -> tuple[float, ...]:
    """The CFG scales to score: --cfg-sweep's comma-separated list (e.g. "1,1.5,3"), or --cfg."""
    if settings.cfg_sweep is None:
        return (settings.cfg,)
    spec = settings.cfg_sweep
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


def _check_inputs(settings: EvaluationSettings, loaded: LoadedModel) -> torch.Tensor | None:
    """Refuse what cannot be evaluated, before any sample is drawn; the real Inception images."""
    train, model_config = loaded.train_config, loaded.model_config
    if (settings.cfg != 1 or settings.cfg_sweep is not None) and model_config.num_classes == 0:
        raise EvaluationError(
            "--cfg and --cfg-sweep need a class-conditional model; this one is unconditional"
        )
    if model_config.context_dim > 0:
        raise EvaluationError(
            "this model is conditioned on a context sequence; evaluating it needs your own "
            "context encoder"
        )
    if train.data_format == "latents" or model_config.in_channels not in (1, 3):
        raise EvaluationError(
            f"this model was trained on {model_config.in_channels}-channel latents or synthetic "
            "data, not images; its samples need a VAE decoder fastsp does not have"
        )
    builtin = _builtin_data(train)
    if settings.real_split != "heldout" and settings.real_data is not None:
        raise EvaluationError(
            f"--real-split {settings.real_split} picks a split of the built-in data, but the real "
            "images are the --real-data folder here; pass only one of them"
        )
    if settings.inception_weights is None:
        if settings.real_data is not None:
            raise EvaluationError("--real-data is used only with --inception-weights")
        if builtin is None:
            raise EvaluationError(
                f"this checkpoint was trained on '{train.data}', not the built-in digits "
                f"or letters, so no built-in classifier can score it: pass --inception-weights "
                f"{INCEPTION_FILE} and --real-data FOLDER (held-out images)"
            )
        return None
    weights = Path(settings.inception_weights)
    if not weights.is_file():
        raise EvaluationError(
            f"Inception weights '{weights}' do not exist: download {INCEPTION_FILE} (torch-"
            "fidelity's Inception-v3, from its GitHub releases) yourself and pass its path; "
            "fastsp downloads nothing"
        )
    _import_torch_fidelity()
    if settings.real_data is None:
        if builtin is None:
            raise EvaluationError("--inception-weights needs --real-data FOLDER (held-out images)")
        real = BUILTIN[builtin][0](settings.real_split, train.resolution).images
    else:
        folder = ImageFolderDataset(
            settings.real_data, train.resolution, model_config.in_channels, random_flip=False
        )
        real = torch.stack([folder[i]["x"] for i in range(len(folder))])
    return _to_uint8_rgb(real)


def _generate_all(loaded: LoadedModel, settings: EvaluationSettings) -> torch.Tensor:
    """`settings.num` samples, labels cycling through the classes, drawn as `python -m
    fastsp.sample` draws them (fastsp.sampling.generate_batches: batch b from noise seeded by
    (seed, b))."""
    resolution = loaded.train_config.resolution
    shape = (loaded.model_config.in_channels, resolution, resolution)
    batches = generate_batches(
        loaded.model,
        process_from_config(loaded.train_config),
        settings.num,
        shape,
        batch_size=settings.batch_size,
        seed=settings.seed,
        num_steps=settings.steps,
        sampler=settings.sampler,
        guidance_scale=settings.cfg,
        guidance_rescale=settings.cfg_rescale,
        device=settings.device,
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


def evaluate(
    settings: EvaluationSettings, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the evaluation `settings` describe; return the results (what the command writes as
    JSON). `log` receives progress lines and warnings."""
    start = time.perf_counter()
    _check_settings(settings)
    loaded = load_model(settings.checkpoint, weights=settings.weights, device=settings.device)
    real_uint8 = _check_inputs(settings, loaded)
    resolution = loaded.train_config.resolution
    builtin = _builtin_data(loaded.train_config)
    if builtin is not None:  # before sampling: a cache problem shows at once
        classifier, info = load_or_train_classifier(resolution, log=log, data=builtin)
    labels = default_labels(settings.num, loaded.model_config.num_classes, None)
    # One model load for every scale of a sweep; each scale starts from the same noise (the
    # batches' seeds depend on --seed only) and the same labels, so scales differ by CFG alone.
    scales = cfg_scales(settings)
    samples = {}
    t0 = time.perf_counter()
    for scale in scales:
        if log is not None:
            how = f"{settings.sampler}, {settings.steps} steps, cfg {scale:g}"
            log(f"generating {settings.num} samples ({how})")
        samples[scale] = _generate_all(loaded, dataclasses.replace(settings, cfg=scale))
    generate_seconds = time.perf_counter() - t0
    result: dict[str, Any] = {
        "checkpoint": str(loaded.checkpoint.resolve()),
        "step": loaded.step,
        "settings": {
            "num": settings.num,
            "steps": settings.steps,
            "sampler": settings.sampler,
            "cfg": settings.cfg,
            "cfg_sweep": list(scales) if settings.cfg_sweep is not None else None,
            "cfg_rescale": settings.cfg_rescale,
            "seed": settings.seed,
            "weights": settings.weights,
            "batch_size": settings.batch_size,
            "device": settings.device,
            "nearest_k": NEAREST_K,
            "labels": "cycling through the classes" if labels is not None else "unconditional",
        },
        "generated_images": settings.num,
    }
    if settings.real_data is None:
        result["real_split"] = settings.real_split
    if builtin is not None:
        result.update(
            _builtin_metrics(
                samples,
                labels,
                resolution,
                classifier,
                info,
                settings.real_split,
                builtin,
                sweep=settings.cfg_sweep is not None,
            )
        )
    if real_uint8 is not None:
        if log is not None:
            real_images = f"{len(real_uint8)} real images"
            log(f"Inception-v3 features of {settings.num} samples and {real_images}")
        result["inception"] = {
            **inception_metrics(
                _to_uint8_rgb(samples[settings.cfg]),
                real_uint8,
                settings.inception_weights,
                settings.device,
            ),
            "weights": str(Path(settings.inception_weights).resolve()),
            "real_data": settings.real_data or f"{builtin} {settings.real_split} split",
            "real_images": len(real_uint8),
        }
    result["seconds"] = {
        "generate": round(generate_seconds, 2),
        "total": round(time.perf_counter() - start, 2),
    }
    return result


def evaluate_checkpoint(
    checkpoint: str | Path, log: Callable[[str], None] | None = None, **options
) -> dict[str, Any]:
    """`evaluate` with keyword settings (EvaluationSettings' fields, the command line's options),
    e.g. num=200, cfg=3, cfg_rescale=0.7.

    Returns the dict the command writes as JSON (nothing is written here).
    """
    known = sorted(field.name for field in dataclasses.fields(EvaluationSettings))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown options {unknown}; known: {known}")
    return evaluate(EvaluationSettings(checkpoint=checkpoint, **options), log=log)
