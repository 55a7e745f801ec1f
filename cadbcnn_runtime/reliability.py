"""Reliability arithmetic: silent errors, calibration, risk–coverage, review threshold, temperature.

numpy only (no torch, no OpenCV, no matplotlib), so the torch-free runtime can
validate a model with it.

The project's key metric is the **silent error**: a wrong label that the model
did *not* route to review (``needs_review`` false). For images of a known class
that is ``label != truth``; for images known to be healthy (other labs' normal
blood) it is any malignant label, i.e. any class other than the benign one.
Always read it beside the **review rate** (the price paid for it) and the
accuracy among the images that were not reviewed.

Conventions: ``confidence`` is the top-class probability in [0, 1]; ``correct``
is a boolean per image; an image is *kept* (not reviewed) when
``confidence >= threshold`` — the runtime reviews ``confidence < threshold``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: Probabilities are clipped to at least this before taking logs (NLL of an exact 0 is infinite).
PROB_FLOOR = 1e-15
#: Search interval of ``fit_temperature``.
T_MIN, T_MAX = 0.05, 20.0


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------
def _vector(x: Any, name: str, dtype: type = np.float64) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    return a


def _confidences(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated (confidence float64, correct bool) pair of equal, non-zero length."""
    c = _vector(confidence, "confidence")
    ok = _vector(correct, "correct", bool)
    if len(c) != len(ok):
        raise ValueError(f"confidence has {len(c)} values but correct has {len(ok)}")
    if len(c) == 0:
        raise ValueError("need at least one image")
    if not (np.isfinite(c).all() and (c >= 0).all() and (c <= 1).all()):
        raise ValueError("confidence values must be finite and within [0, 1]")
    return c, ok


def _probs_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or y.ndim != 1 or len(p) != len(y) or len(p) == 0:
        raise ValueError(f"expected probs (N, K) and labels (N,) with N > 0, got {p.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must be integers in [0, {p.shape[1]})")
    return p, y.astype(np.int64)


# ---------------------------------------------------------------------------
# Softmax and temperature
# ---------------------------------------------------------------------------
def log_softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """log softmax(logits / temperature) along the last axis, in float64 (shift by the max: no overflow)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) along the last axis, in float64."""
    return np.exp(log_softmax(logits, temperature))


def macro_f1(labels: Any, predicted: Any, n_classes: int) -> float:
    """Unweighted mean over ``n_classes`` of the per-class F1 (a class never true nor predicted scores 0,
    as scikit-learn's ``f1_score(average="macro", labels=range(n), zero_division=0)``)."""
    y, p = np.asarray(labels), np.asarray(predicted)
    f1s = []
    for k in range(n_classes):
        tp = np.sum((p == k) & (y == k))
        fp = np.sum((p == k) & (y != k))
        fn = np.sum((p != k) & (y == k))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(np.mean(f1s))


def _nll_at(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(logits, temperature)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: Any, labels: Any, *, tol: float = 1e-6) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on (logits, labels).

    Golden-section search on log T over [``T_MIN``, ``T_MAX``] (0.05 … 20):
    deterministic, no random start. The NLL is convex in 1/T, hence unimodal in
    log T, so the search finds the minimum; when that lies at a bound (e.g. a
    set the model separates perfectly wants T → 0) the bound is returned. Fit it
    on a validation split, never on the images you report on.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or y.ndim != 1 or len(z) != len(y) or len(z) == 0:
        raise ValueError(f"expected logits (N, K) and labels (N,) with N > 0, got {z.shape} and {y.shape}")
    _probs_labels(z, y)  # label range check
    y = y.astype(np.int64)
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = _nll_at(z, y, math.exp(a)), _nll_at(z, y, math.exp(b))
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = _nll_at(z, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = _nll_at(z, y, math.exp(b))
    return math.exp((lo + hi) / 2)


# ---------------------------------------------------------------------------
# Proper scores and calibration
# ---------------------------------------------------------------------------
def nll(probs: Any, labels: Any) -> float:
    """Mean negative log-likelihood −log p[label]; probabilities are floored at ``PROB_FLOOR``."""
    p, y = _probs_labels(probs, labels)
    return float(-np.log(np.maximum(p[np.arange(len(y)), y], PROB_FLOOR)).mean())


def brier(probs: Any, labels: Any) -> float:
    """Multi-class Brier score: mean over images of Σ_k (p_k − onehot_k)², in [0, 2]."""
    p, y = _probs_labels(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


@dataclass(frozen=True)
class Bin:
    """One bin of a reliability diagram: confidences in [lo, hi) (the last bin also holds 1.0)."""

    lo: float
    hi: float
    count: int
    mean_conf: float | None  # None for an empty bin
    acc: float | None


def _bin_index(c: np.ndarray, n_bins: int) -> np.ndarray:
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, c, side="right") - 1, 0, n_bins - 1)


def reliability_bins(confidence: Any, correct: Any, n_bins: int = 15) -> list[Bin]:
    """Equal-width bins on [0, 1]: count, mean confidence and accuracy of each (empty bins included)."""
    c, ok = _confidences(confidence, correct)
    idx = _bin_index(c, n_bins)
    out = []
    for i in range(n_bins):
        m = idx == i
        n = int(m.sum())
        out.append(Bin(i / n_bins, (i + 1) / n_bins, n,
                       float(c[m].mean()) if n else None, float(ok[m].mean()) if n else None))
    return out


def expected_calibration_error(confidence: Any, correct: Any, n_bins: int = 15) -> float:
    """ECE: Σ_bins (n_bin / N) · |accuracy_bin − mean confidence_bin| over equal-width bins on [0, 1]."""
    bins = reliability_bins(confidence, correct, n_bins)
    n = sum(b.count for b in bins)
    return float(sum(b.count / n * abs(b.acc - b.mean_conf) for b in bins if b.count))


# ---------------------------------------------------------------------------
# Risk–coverage and the review threshold
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RiskCoverage:
    """Selective-prediction curve: keep images with confidence >= ``thresholds[i]``.

    One point per distinct confidence, most confident first (tied images are kept
    or reviewed together). ``coverage[i]`` is the kept fraction, ``risk[i]`` the
    error rate among the kept images. ``aurc`` is the area under the step curve
    (each image contributes the risk at the point that first keeps it, / N);
    without ties it equals the usual mean of the N prefix risks.
    """

    thresholds: np.ndarray
    coverage: np.ndarray
    risk: np.ndarray
    kept: np.ndarray      # images kept at each point
    errors: np.ndarray    # wrong images among them
    aurc: float


def risk_coverage(confidence: Any, correct: Any) -> RiskCoverage:
    """Risk–coverage curve of ``confidence`` as the selection score (see ``RiskCoverage``)."""
    c, ok = _confidences(confidence, correct)
    order = np.argsort(-c, kind="mergesort")
    c_sorted, wrong = c[order], ~ok[order]
    last_of_group = np.r_[c_sorted[1:] != c_sorted[:-1], True]
    kept = np.flatnonzero(last_of_group) + 1
    errors = np.cumsum(wrong)[kept - 1]
    coverage = kept / len(c)
    risk = errors / kept
    aurc = float((risk * np.diff(np.r_[0, kept])).sum() / len(c))
    return RiskCoverage(c_sorted[last_of_group], coverage, risk, kept, errors, aurc)


@dataclass(frozen=True)
class ReviewThreshold:
    """Outcome of ``choose_review_threshold``.

    ``threshold``: review images with confidence < threshold. ``achieved``: false
    when no threshold meets ``target_risk`` (with ``min_coverage``); then
    ``threshold`` is 1.0, which reviews everything except images whose
    confidence is exactly 1.0 (a saturated softmax) — ``coverage``/``risk``
    describe those. ``risk`` is None when nothing is kept.
    """

    threshold: float
    coverage: float
    risk: float | None
    n: int
    n_kept: int
    target_risk: float
    achieved: bool


def choose_review_threshold(confidence: Any, correct: Any, *, target_risk: float = 0.005,
                            min_coverage: float = 0.0) -> ReviewThreshold:
    """The lowest confidence threshold whose kept images have an error rate <= ``target_risk``.

    Use a validation split. Candidates are the observed confidences, so the
    threshold is always the confidence of the least confident kept image, and
    tied images are kept or reviewed together. All correct → the lowest observed
    confidence (coverage 1). A candidate also needs coverage >= ``min_coverage``
    (guards against "keep three images, zero errors"); the lowest qualifying
    threshold has the largest coverage, so if it falls short nothing qualifies.
    If nothing qualifies: threshold 1.0, ``achieved=False``.
    """
    if not 0.0 <= target_risk <= 1.0 or not 0.0 <= min_coverage <= 1.0:
        raise ValueError(f"target_risk and min_coverage must be in [0, 1], got {target_risk}, {min_coverage}")
    rc = risk_coverage(confidence, correct)
    n = len(np.asarray(confidence))
    good = (rc.errors <= target_risk * rc.kept + 1e-12) & (rc.coverage >= min_coverage - 1e-12)
    if good.any():
        i = int(np.flatnonzero(good)[-1])
        return ReviewThreshold(float(rc.thresholds[i]), float(rc.coverage[i]), float(rc.risk[i]), n,
                               int(rc.kept[i]), target_risk, True)
    at_one = rc.thresholds >= 1.0
    kept = int(rc.kept[at_one][-1]) if at_one.any() else 0
    risk = float(rc.risk[at_one][-1]) if kept else None
    return ReviewThreshold(1.0, kept / n, risk, n, kept, target_risk, False)


# ---------------------------------------------------------------------------
# Silent errors
# ---------------------------------------------------------------------------
def _rate(count: int, n: int) -> float | None:
    return count / n if n else None


def silent_error_stats(pred: Sequence[int] | np.ndarray, truth: Sequence[int] | np.ndarray | None,
                       needs_review: Sequence[bool] | np.ndarray, *, healthy: bool = False, benign_index: int = 0,
                       out_of_distribution: Sequence[bool] | np.ndarray | None = None) -> dict[str, Any]:
    """Silent-error arithmetic of one image set.

    Three kinds of set:

    * labelled (``truth`` given): silent error = ``pred != truth`` and not reviewed;
      ``accuracy`` over all images, ``accuracy_non_reviewed`` over the kept ones.
    * healthy (``healthy=True``, ``truth`` must be None): every image is benign, so
      silent error = a label other than ``benign_index`` and not reviewed;
      ``malignant_rate`` counts malignant labels with or without review.
    * unlabelled (``truth`` None, not healthy): only ``review_rate`` and ``ood_rate``
      mean anything; the error fields are None.

    Rates are fractions of all ``n`` images; any rate over zero images is None.
    ``ood_rate`` is None unless ``out_of_distribution`` is given.
    """
    p = _vector(pred, "pred", np.int64)
    review = _vector(needs_review, "needs_review", bool)
    if len(review) != len(p):
        raise ValueError(f"pred has {len(p)} values but needs_review has {len(review)}")
    if healthy and truth is not None:
        raise ValueError("a healthy set has no class labels: pass truth=None with healthy=True")
    n, kept = len(p), ~review
    stats: dict[str, Any] = {
        "n": n, "labelled": truth is not None, "healthy": healthy, "accuracy": None,
        "review_rate": _rate(int(review.sum()), n), "ood_rate": None, "silent_errors": None,
        "silent_error_rate": None, "accuracy_non_reviewed": None, "n_non_reviewed": int(kept.sum()),
        "malignant_rate": None,
    }
    if out_of_distribution is not None:
        ood = _vector(out_of_distribution, "out_of_distribution", bool)
        if len(ood) != n:
            raise ValueError(f"pred has {n} values but out_of_distribution has {len(ood)}")
        stats["ood_rate"] = _rate(int(ood.sum()), n)
    if truth is not None:
        t = _vector(truth, "truth", np.int64)
        if len(t) != n:
            raise ValueError(f"pred has {n} values but truth has {len(t)}")
        wrong = p != t
        stats["accuracy"] = _rate(int((~wrong).sum()), n)
        stats["accuracy_non_reviewed"] = _rate(int((~wrong & kept).sum()), int(kept.sum()))
    elif healthy:
        wrong = p != benign_index
        stats["malignant_rate"] = _rate(int(wrong.sum()), n)
    else:
        return stats
    silent = int((wrong & kept).sum())
    stats["silent_errors"] = silent
    stats["silent_error_rate"] = _rate(silent, n)
    return stats
