"""The OOD score's statistics in numpy — the one home of the fitting math, torch-free.

The score (``cadbcnn_train.ood.OODHead`` in the graph) is the squared Mahalanobis distance of the fused, pooled
feature vector to the nearest class mean, under one shared covariance, divided by the feature dimension
(≈ 1 for a typical training image). Fitting it needs features and class labels (or pseudo-labels); the
threshold is a quantile of the scores of held-out in-distribution images. Used by training (``fit-ood``), by
the torch-free refit of an exported model (``cadbcnn-export refit-ood``) and by the INT8 export, which refits
the statistics on the quantised model's own features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHOD = "mahalanobis-shared-cov"
FLAG_RATE = 0.02          # the threshold flags this fraction of held-out in-distribution images
SHRINKAGE = 0.01          # the covariance's shrinkage towards a scaled identity (the training default)


@dataclass(frozen=True)
class OODStatistics:
    """whitening Σ^-1/2 (D, D) and the whitened class means (K, D), float64."""

    whitening: np.ndarray
    means_w: np.ndarray
    classes: tuple[int, ...]      # which class index each row of means_w belongs to
    shrinkage: float

    @property
    def dim(self) -> int:
        return int(self.whitening.shape[0])

    def scores(self, features: np.ndarray) -> np.ndarray:
        """The OOD score of each row of FEATURES (N, D), as the graph computes it (in float64)."""
        z = np.asarray(features, np.float64) @ self.whitening
        d2 = ((z[:, None, :] - self.means_w[None]) ** 2).sum(-1)
        return d2.min(1) / self.dim


def ledoit_wolf(centered: np.ndarray) -> float:
    """The Ledoit–Wolf shrinkage intensity for the covariance of CENTERED (N, D) rows (sklearn's estimator)."""
    x = np.asarray(centered, np.float64)
    n, d = x.shape
    emp = x.T @ x / n
    mu = np.trace(emp) / d
    x2 = x * x
    beta = ((x2.T @ x2).sum() / n - (emp ** 2).sum()) / (n * d)
    delta = ((emp - mu * np.eye(d)) ** 2).sum() / d
    return 0.0 if delta == 0 else float(min(beta, delta) / delta)


def fit_statistics(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
                   shrinkage: float | str = SHRINKAGE) -> OODStatistics:
    """Class means and a shrunk shared covariance of FEATURES (N, D) with integer LABELS (N,).

    ``shrinkage="auto"``: the Ledoit–Wolf intensity, never below ``SHRINKAGE`` (for small local sets, where
    N is near or below D and the sample covariance is singular)."""
    f = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    if f.ndim != 2 or len(f) != len(labels):
        raise ValueError(f"features {f.shape} and labels {labels.shape} do not match")
    present = tuple(k for k in range(num_classes) if (labels == k).any())
    if not present:
        raise ValueError("no labelled features to fit the OOD statistics on")
    means = np.stack([f[labels == k].mean(0) for k in present])
    centered = f - means[np.searchsorted(present, labels)]
    if shrinkage == "auto":
        shrinkage = max(SHRINKAGE, ledoit_wolf(centered))
    shrinkage = float(shrinkage)
    cov = centered.T @ centered / max(len(f) - 1, 1)
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / d * np.eye(d)
    evals, evecs = np.linalg.eigh(cov)
    whitening = evecs @ np.diag(1.0 / np.sqrt(np.clip(evals, 1e-12, None))) @ evecs.T
    return OODStatistics(whitening, means @ whitening, present, shrinkage)


def threshold_for(scores: np.ndarray, flag_rate: float = FLAG_RATE) -> float:
    """The threshold that flags at most FLAG_RATE of SCORES (held-out in-distribution images)."""
    if not 0 < flag_rate < 1:
        raise ValueError(f"flag rate {flag_rate} must be in (0, 1)")
    return float(np.quantile(np.asarray(scores, np.float64), 1 - flag_rate, method="higher"))


def threshold_flagging(scores: np.ndarray, k: int) -> float:
    """The threshold that flags exactly the K highest SCORES (fewer only where scores tie at the boundary)."""
    s = np.sort(np.asarray(scores, np.float64))
    if not 0 <= k < len(s):
        raise ValueError(f"cannot flag {k} of {len(s)} scores and keep one")
    return float(s[len(s) - k - 1])


def threshold_rule(flag_rate: float, n: int, what: str) -> str:
    return f"{100 * (1 - flag_rate):g}th percentile of {what} ({n} images)"
