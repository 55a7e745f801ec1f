"""The OOD score's statistics in numpy — the one home of the fitting math, torch-free.

The score (``cadbcnn_train.ood.OODHead`` in the graph) has one or more *parts*, each a squared Mahalanobis
distance divided by its feature dimension:

* ``fused`` — the fused, pooled feature vector, to the nearest class mean under one shared covariance (≈ 1 for a
  typical training image);
* the *stages* (models trained from v0.2.0 on) — the mean and standard deviation over the feature map of the
  first three ResNet stages of each branch, each to a single Gaussian (Lee et al. 2018: several layers). The
  low-level stages see what the fused features were trained to ignore — noise, flat fields, stripes, another
  lab's background — so the flag no longer depends on how one seed's fused features happen to fall
  (docs/OOD.md: the single score failed the release gate on 3 of 5 models, the multi-stage rule on none).

With several parts the graph's score is max_p s_p / c_p: every part's own threshold is folded into its scale
c_p (``scaled``), so the combined threshold is 1 and an image is flagged when any part finds it atypical
(``part_scales``: the union rule). Fitting needs features and class labels (or pseudo-labels); thresholds come
from held-out in-distribution images. Used by training (``fit-ood``), by the torch-free refit of an exported
model (``cadbcnn-export refit-ood``) and by the INT8 export, which refits the statistics on the quantised
model's own features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHOD = "mahalanobis-shared-cov"
METHOD_MULTI = "mahalanobis-multilayer"   # the fused part and one Gaussian per stage, max of the scaled scores
FUSED = "fused"           # the name of the part on the fused features (always present)
FLAG_RATE = 0.02          # the threshold flags this fraction of held-out in-distribution images
STRICT_RATE = 0.005       # of which the stages alone may flag at most this fraction (the rest: the fused part)
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


def scaled(stats: OODStatistics, scale: float) -> OODStatistics:
    """STATS whose score is divided by SCALE: ‖(f − μ)W‖² / (c D) = ‖f (W/√c) − μW/√c‖² / D, so the graph's
    structure stays that of a plain part and only its two constants change."""
    if not scale > 0:
        raise ValueError(f"an OOD part's scale must be positive, got {scale}")
    r = 1.0 / np.sqrt(float(scale))
    return OODStatistics(stats.whitening * r, stats.means_w * r, stats.classes, stats.shrinkage)


def combined_scores(parts: dict[str, OODStatistics], features: dict[str, np.ndarray]) -> np.ndarray:
    """The graph's OOD score from the stored (scaled) PARTS and each part's FEATURES: the maximum over parts."""
    return np.max([parts[n].scores(features[n]) for n in parts], axis=0)


def flag_counts(n: int, flag_rate: float = FLAG_RATE, strict_rate: float = STRICT_RATE) -> tuple[int, int]:
    """How many of N held-out images the rule flags in all, and how many of them the stages alone: exactly as
    many as ``threshold_for`` flags at FLAG_RATE and at STRICT_RATE."""
    if not 0 < flag_rate < 1 or not 0 <= strict_rate <= flag_rate:
        raise ValueError(f"flag rates {flag_rate}, {strict_rate} must satisfy 0 <= strict <= flag < 1")

    def flagged(rate: float) -> int:  # np.quantile(..., 1 - rate, method="higher") keeps the rest
        return max(0, n - 1 - int(np.ceil((1 - rate) * (n - 1) - 1e-9)))

    return flagged(flag_rate), flagged(strict_rate)


def _between(scores: np.ndarray, k: int) -> float:
    """A threshold that flags the K highest SCORES, half-way to the next score down (K = 0: a hair above the
    highest), so that no held-out image sits exactly on it: rounding in the graph (FP16 storage, another
    execution provider) must not flip the images the rule was fitted on."""
    s = np.sort(np.asarray(scores, np.float64))
    if not 0 <= k < len(s):
        raise ValueError(f"cannot flag {k} of {len(s)} scores and keep one")
    return float(s[-1] * (1 + 1e-6) + 1e-12) if k == 0 else float((s[len(s) - k - 1] + s[len(s) - k]) / 2)


def part_scales(held: dict[str, np.ndarray], *, flagged: int, strict: int) -> tuple[dict[str, float], float, str]:
    """The scale of every part and the combined threshold, from the raw part scores of held-out in-distribution
    images (HELD: name → scores, with the ``FUSED`` part). Returns (scales, threshold, the rule in words).

    One part: scale 1 and the threshold flags the FLAGGED highest scores (the rule of every model before v0.2.0).
    Several (the union rule): each stage is normalised by its own score at the same quantile, so that no stage
    dominates by its dimension; the stages together flag the STRICT most atypical images; the fused part flags the
    highest of the rest, FLAGGED in all. Every part's threshold is folded into its scale, so the combined score
    max_p s_p / c_p has threshold 1 (and a user's ``--ood-threshold`` moves every part's threshold by one factor).
    The budget is shared: the fused part flags STRICT fewer held-out images than it would alone, so the in-domain
    review rate stays where a single-part model has it.
    """
    fused = np.asarray(held[FUSED], np.float64)
    n = len(fused)
    if not 0 <= strict <= flagged < n:
        raise ValueError(f"cannot flag {flagged} (stages {strict}) of {n} held-out images and keep one")
    stages = [k for k in held if k != FUSED]
    if not stages:
        return {FUSED: 1.0}, threshold_flagging(fused, flagged), f"flags the {flagged} highest of {n} scores"
    norm = {k: max(_between(held[k], flagged), 1e-12) for k in stages}
    m = np.max([np.asarray(held[k], np.float64) / norm[k] for k in stages], axis=0)
    t = _between(m, strict)
    by_stage = m > t
    rest = fused[~by_stage]
    k = flagged - int(by_stage.sum())
    c_fused = _between(rest, k)
    scales = {FUSED: c_fused, **{s: norm[s] * t for s in stages}}
    rule = (f"flagged when any part exceeds its own threshold (each folded into the part's scale, combined "
            f"threshold 1): the {len(stages)} stages together flag the {int(by_stage.sum())} most atypical of {n} "
            f"held-out images (each stage normalised at its {flagged}-th highest score), the fused part the next "
            f"{k}")
    return scales, 1.0, rule


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


def fit_parts(features: dict[str, np.ndarray], labels: np.ndarray, num_classes: int, *,
              shrinkage: float | str = SHRINKAGE) -> dict[str, OODStatistics]:
    """Every part's Gaussian(s) from FEATURES (name → (N, D)): class-conditional with one shared covariance on the
    fused features (LABELS; SHRINKAGE), a single Gaussian per stage with Ledoit–Wolf shrinkage (128–512-d
    statistics of a few hundred to a few thousand images)."""
    parts = {FUSED: fit_statistics(features[FUSED], labels, num_classes, shrinkage=shrinkage)}
    for k, f in features.items():
        if k != FUSED:
            parts[k] = fit_statistics(f, np.zeros(len(f), int), 1, shrinkage="auto")
    return parts


def describe_parts(raw: dict[str, OODStatistics], scales: dict[str, float]) -> list[dict]:
    """What a model spec records of each part (no arrays): name, dimension, Gaussians, shrinkage, scale."""
    return [{"name": k, "dim": st.dim, "gaussians": len(st.classes), "shrinkage": round(st.shrinkage, 6),
             "scale": float(scales[k])} for k, st in raw.items()]


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


def threshold_rule(flag_rate: float, n: int, what: str, *, union: bool = False) -> str:
    """The threshold's rule in words. One part: a percentile of the held-out scores. UNION (several parts): the
    threshold is 1 on the combined score and the union rule (the spec's ``rule``) sets every part's scale."""
    if not union:
        return f"{100 * (1 - flag_rate):g}th percentile of {what} ({n} images)"
    return (f"union rule fitted to flag {100 * flag_rate:g} % of {what} ({n} images) in all; threshold 1 on the "
            f"combined score, each part's threshold folded into its scale (see 'rule')")
