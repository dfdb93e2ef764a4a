"""Sample-quality math on feature vectors: FID, precision/recall, an Inception-Score analogue.

Everything runs in float64 numpy/scipy on features that some network (fastsp's digits classifier,
or Inception-v3) extracted: `[N, D]` arrays, one row per image. `fastsp.evaluate` is the command
line that produces the features and calls these.

- FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to two feature sets.
  The matrix square root is taken through the eigenvalues of a symmetric PSD matrix, so it stays
  real and finite for singular covariances (dead ReLU units, fewer samples than dimensions).
- Precision and recall (Kynkaenniemi et al. 2019): each set's manifold is the union of balls around
  its points with radius the distance to the point's k-th nearest neighbour in its own set.
- Inception Score analogue (Salimans et al. 2016) on any classifier's softmax.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "class_accuracy",
    "feature_statistics",
    "fid",
    "format_gap_share",
    "frechet_distance",
    "guidance_gap_share",
    "inception_score_analogue",
    "precision_recall",
]

_CHUNK = 1024  # query rows per block of the pairwise-distance matrix (bounds memory at 50k x 50k)


def _as_features(x, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"{name} must be [N, D] with N >= 2, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds non-finite values")
    return a


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D]."""
    a = _as_features(features, "features")
    return a.mean(axis=0), np.atleast_2d(np.cov(a, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric matrix (negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# Frechet distance of N(mu1, S1), N(mu2, S2) (Dowson & Landau 1982; FID, Heusel et al. 2017 eq. 6):
#   d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}),
# with Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(sqrt(S1) S2 sqrt(S1))): S1 S2 is similar to that PSD
# matrix, so its eigenvalues are real and >= 0 and no complex sqrtm is needed.
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance of N(mu1, sigma1), N(mu2, sigma2); means [D], covs [D, D]."""
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
            f"sigma2 {s2.shape}"
        )
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    return float(max(value, 0.0))  # rounding can leave -1e-12 for identical Gaussians


# FID (Heusel et al. 2017): the Frechet distance of Gaussians fitted to two feature sets.
def fid(features_a, features_b) -> float:
    """FID between features [Na, D] and [Nb, D] (sample means, unbiased covariances)."""
    mu_a, sigma_a = feature_statistics(features_a)
    mu_b, sigma_b = feature_statistics(features_b)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


def _min_sq_dists(query: np.ndarray, points: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each query row to its k smallest distances in `points`: [Nq, k]."""
    out = np.empty((query.shape[0], k))
    sq_points = (points**2).sum(1)
    for start in range(0, query.shape[0], _CHUNK):
        q = query[start : start + _CHUNK]
        d2 = (q**2).sum(1)[:, None] + sq_points[None, :] - 2 * q @ points.T
        out[start : start + _CHUNK] = np.sort(np.partition(d2, k - 1, axis=1)[:, :k], axis=1)
    return np.clip(out, 0, None)


def _inside(query: np.ndarray, points: np.ndarray, radii2: np.ndarray) -> np.ndarray:
    """Whether each query row lies in some ball (points[j], radius^2 radii2[j]): bool [Nq]."""
    found = np.zeros(query.shape[0], dtype=bool)
    sq_points = (points**2).sum(1)
    for start in range(0, query.shape[0], _CHUNK):
        q = query[start : start + _CHUNK]
        d2 = (q**2).sum(1)[:, None] + sq_points[None, :] - 2 * q @ points.T
        found[start : start + _CHUNK] = (d2 <= radii2[None, :] * (1 + 1e-9) + 1e-12).any(1)
    return found


# Improved precision and recall (Kynkaenniemi et al. 2019, eqs. 1-2): f(x, S) = 1 if
# |x - s| <= |s - NN_k(s, S)| for some s in S; precision = mean f(fake, real), recall = mean f(real,
# fake).
def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of fake features [Nf, D] against real features [Nr, D].

    Precision: the fraction of fakes inside the real manifold; recall: the fraction of reals inside
    the fake manifold. Each needs more than `k` points in the set that spans the manifold.
    """
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    if not isinstance(k, int) or k < 1 or min(len(real), len(fake)) <= k:
        raise ValueError(f"k must be an integer in [1, N - 1] for both sets, got k={k!r}")
    # the k-th neighbour within a set, not counting the point itself (its distance 0 comes first)
    real_r2 = _min_sq_dists(real, real, k + 1)[:, k]
    fake_r2 = _min_sq_dists(fake, fake, k + 1)[:, k]
    precision = _inside(fake, real, real_r2).mean()
    recall = _inside(real, fake, fake_r2).mean()
    return float(precision), float(recall)


def _as_probs(probs) -> np.ndarray:
    p = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"probs must be [N, classes], got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1, atol=1e-4):
        raise ValueError("probs must be finite, non-negative rows that sum to 1 (a softmax)")
    return p


# Inception Score (Salimans et al. 2016): IS = exp(E_x KL(p(y|x) || p(y))), p(y) = E_x p(y|x);
# here on one split, with any classifier's softmax in place of Inception-v3's.
def inception_score_analogue(probs) -> float:
    """exp(mean KL(p(y|x) || p(y))) of softmax rows [N, classes]; 1 (one class) to classes."""
    p = _as_probs(probs)
    marginal = p.mean(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(marginal)), 0.0)
    return float(np.exp(terms.sum(1).mean()))


def class_accuracy(probs, labels) -> float:
    """The fraction of rows of probs [N, classes] whose argmax equals labels [N]."""
    p = _as_probs(probs)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"{p.shape[0]} rows of probs but {y.shape[0]} labels")
    return float((p.argmax(1) == y).mean())


# The share of the guidance gap a loss recovers without guidance (issue 16; the paper's Stable
# Diffusion 2.1 numbers give (29.63 - 24.42) / (29.63 - 18.67) = 0.48):
#   share = (FID_MSE - FID_SP) / (FID_MSE - FID_MSE,bestCFG), all three without CFG but the last.
def guidance_gap_share(
    fid_mse: float, fid_sp: float, fid_mse_best_cfg: float, min_gap: float = 1e-6
) -> float | None:
    """(fid_mse - fid_sp) / (fid_mse - fid_mse_best_cfg), or None when there is no gap to recover:
    guidance does not lower MSE's FID by more than `min_gap` (the best scale is 1, or a tie).

    1 recovers all of what guidance gains, 0 none, < 0 is worse than MSE; > 1 beats guided MSE.
    """
    gap = fid_mse - fid_mse_best_cfg
    if not gap > min_gap:  # also catches NaN
        return None
    return (fid_mse - fid_sp) / gap


def format_gap_share(share: float | None) -> str:
    """A table cell: "no gap" for None, else the share to two decimals (e.g. "0.48")."""
    return "no gap" if share is None else f"{share:.2f}"
