"""Learned review score: the estimated probability that a label is right, from what the runtime already measures.

Why: the per-class confidence thresholds and the appearance check are two separate cuts, each set so that the
worst shifted validation set stays under its silent-error budget. A confident Benign call must then clear 0.999
even when its colours sit where the lab's own Benign images sit, and an image whose colours moved a little is
reviewed even when the model is sure and its features are typical. One score that weighs the evidence together
reviews fewer images at the same silent-error rate (docs/SHIFT.md, "A learned review score").

The score is a logistic regression, one set of weights per *predicted* class, on ``FEATURES``:
the log of the image's appearance distance to each class's training images over that class's cut (the spec's
``appearance`` entry, the same statistics as the appearance check), the logit of the calibrated confidence and the
OOD score (0 without an OOD output). Features are standardised with the fit's mean and scale; an L2 penalty
(``L2``) on the standardised weights, none on the intercept. It is fitted by ``cadbcnn-train calibrate
--review-score`` on the labelled validation images and their shifted copies (never on test or external images),
with thresholds per predicted class chosen on cross-fitted scores (``FOLDS`` folds, all copies of one source image
in one fold) by the each-shift rule; the entry travels in the spec as ``calibration.review_score`` and the runtime
reviews an image whose score is below its class's threshold (or not a number).

numpy only, like the rest of the runtime.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ArgumentError

FEATURES = ("per predicted class: intercept, log(appearance distance / cut) to each class, logit of the "
            "calibrated confidence (clipped to [1e-6, 1 - 1e-6]), OOD score")
L2 = 10.0         # penalty on the standardised weights (sklearn's C = 0.1), chosen before the study (docs/SHIFT.md)
FOLDS = 5         # cross-fitting folds for the thresholds, grouped by source image
CONF_CLIP = 1e-6
RATIO_FLOOR = 1e-6
MAX_ITER = 100


def n_features(n_classes: int) -> int:
    return n_classes * (n_classes + 3)


def design(probs: np.ndarray, ood: np.ndarray | None, ratios: np.ndarray) -> np.ndarray:
    """(N, C·(C+3)) design matrix: for the predicted class's block, [1, log ratios (C), logit confidence, OOD score];
    zeros in the other classes' blocks. ``probs``: calibrated probabilities (N, C); ``ratios``: appearance distance
    / cut to every class (N, C), ``AppearanceCheck.ratios``."""
    probs = np.asarray(probs, np.float64)
    ratios = np.asarray(ratios, np.float64)
    n, c = probs.shape
    if ratios.shape != (n, c):
        raise ValueError(f"expected ({n}, {c}) appearance ratios, got {ratios.shape}")
    k = probs.argmax(1)
    conf = np.clip(probs[np.arange(n), k], CONF_CLIP, 1.0 - CONF_CLIP)
    score = np.zeros(n) if ood is None else np.asarray(ood, np.float64).reshape(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        base = np.column_stack([np.ones(n), np.log(np.maximum(ratios, RATIO_FLOOR)), np.log(conf / (1.0 - conf)),
                                score])
    x = np.zeros((n, c, c + 3))
    x[np.arange(n), k] = base
    return x.reshape(n, -1)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = L2) -> dict[str, Any]:
    """L2-penalised logistic regression of ``y`` (bool) on ``x`` by Newton's method: minimises the summed log loss
    plus ``l2``/2 · |w|² on the standardised columns (a constant column gets scale 1), intercept unpenalised.
    Returns {mean, scale, coef, intercept, iterations}."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or len(x) != len(y) or not len(y):
        raise ValueError(f"expected (N, d) features and N labels, got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features must be finite")
    if y.min() == y.max():
        raise ValueError("the labels hold one value only: a review score needs both right and wrong calls")
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-12] = 1.0
    z = np.column_stack([np.ones(len(x)), (x - mean) / scale])
    pen = np.full(z.shape[1], float(l2))
    pen[0] = 0.0
    w = np.zeros(z.shape[1])
    for it in range(1, MAX_ITER + 1):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - y) + pen * w
        hess = (z * (p * (1.0 - p))[:, None]).T @ z + np.diag(pen) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return {"mean": mean.tolist(), "scale": scale.tolist(), "coef": w[1:].tolist(), "intercept": float(w[0]),
            "iterations": it}


def trust_of(weights: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    """The score P(right) of design rows ``x`` under fitted ``weights`` (no BLAS call: an elementwise sum, so
    OpenBLAS threads do not wake between ORT runs — see quality.content_scores)."""
    z = (np.asarray(x, np.float64) - np.asarray(weights["mean"])) / np.asarray(weights["scale"])
    t = (z * np.asarray(weights["coef"])).sum(1) + float(weights["intercept"])
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-t))


def check_entry(entry: Mapping[str, Any], class_names: Sequence[str]) -> list[str]:
    """What is wrong with a spec's ``calibration.review_score`` entry (empty when nothing is)."""
    if not isinstance(entry, Mapping):
        return ["calibration.review_score must be a mapping"]
    d = n_features(len(class_names))
    problems = []
    try:
        arrays = [np.asarray(entry[key], np.float64) for key in ("mean", "scale", "coef")]
        ok = all(a.shape == (d,) and np.isfinite(a).all() for a in arrays) and bool((arrays[1] > 0).all())
        b = entry["intercept"]
        ok = ok and isinstance(b, (int, float)) and not isinstance(b, bool) and np.isfinite(b)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        problems.append(f"calibration.review_score must hold mean, scale (> 0) and coef of {d} finite numbers and a "
                        "finite intercept")
    thr = entry.get("thresholds")
    if not (isinstance(thr, Mapping) and set(thr) == set(class_names) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and 0.0 <= v <= 1.0
            for v in thr.values())):
        problems.append("calibration.review_score.thresholds must map every class name to a number in [0, 1]")
    return problems


class ReviewScore:
    """A spec's ``calibration.review_score``, ready to apply: ``scores(probs, ood, ratios)`` → P(right), and
    ``low(scores, predicted)`` → the images it sends to review (below their class's threshold, or not a number)."""

    def __init__(self, entry: Mapping[str, Any], class_names: Sequence[str]):
        problems = check_entry(entry, class_names)
        if problems:
            raise ArgumentError("; ".join(problems))
        self.weights = {k: entry[k] for k in ("mean", "scale", "coef", "intercept")}
        self.thresholds = {n: float(entry["thresholds"][n]) for n in class_names}
        self._t = np.array([self.thresholds[n] for n in class_names])

    def scores(self, probs: np.ndarray, ood: np.ndarray | None, ratios: np.ndarray) -> np.ndarray:
        return trust_of(self.weights, design(probs, ood, ratios))

    def low(self, scores: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        return ~(np.asarray(scores, np.float64) >= self._t[np.asarray(predicted, np.int64)])


def cross_fitted(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, folds: int = FOLDS,
                 l2: float = L2) -> np.ndarray:
    """Out-of-fold scores: each row scored by a fit without its group's fold (``groups % folds``; a source image
    and all its shifted copies share a group)."""
    groups = np.asarray(groups, np.int64)
    out = np.empty(len(y), np.float64)
    for f in range(folds):
        held = groups % folds == f
        if not held.any():
            continue
        if held.all():
            raise ValueError(f"cross-fitting needs at least two groups; got one ({len(y)} rows)")
        out[held] = trust_of(fit_logistic(x[~held], y[~held], l2=l2), x[held])
    return out


def fit_review_score(clean: "Scored", shifted: "Scored", shifts: Sequence[str], *, class_names: Sequence[str],
                     target_risk: float, fitted_on: str, l2: float = L2, folds: int = FOLDS) -> dict[str, Any]:
    """The spec's ``calibration.review_score`` entry from labelled validation images (CLEAN) and their shifted
    copies (SHIFTED, ``shifts``: the shift of each copy). Weights are fitted on both; thresholds per predicted
    class are chosen by the each-shift rule (``calibration.each_shift_thresholds``: every shift at most
    ``target_risk`` silent errors, fewest clean images reviewed) on **cross-fitted** scores, so the rule is set on
    scores of images the weights did not see. ``flagged`` images (OOD, blank field, appearance check, below the
    confidence floor) are reviewed anyway and never kept."""
    from .calibration import each_shift_thresholds

    x = np.concatenate([design(s.probs, s.ood, s.ratios) for s in (clean, shifted)])
    y = np.concatenate([s.probs.argmax(1) == s.labels for s in (clean, shifted)])
    groups = np.concatenate([clean.groups, shifted.groups])
    oof = cross_fitted(x, y, groups, folds=folds, l2=l2)
    oc, os_ = oof[:len(clean.labels)], oof[len(clean.labels):]
    r = each_shift_thresholds(shifted.probs.argmax(1), os_, shifted.labels, ~shifted.flagged, shifts,
                              clean.probs.argmax(1), oc, ~clean.flagged, n_classes=len(class_names), floor=0.0,
                              target_risk=target_risk)
    weights = fit_logistic(x, y, l2=l2)
    thresholds = {n: float(t) for n, t in zip(class_names, r["thresholds"])}
    return {"method": "logistic regression per predicted class", "features": FEATURES, "l2": float(l2),
            **{k: weights[k] for k in ("mean", "scale", "coef", "intercept")}, "thresholds": thresholds,
            "target_risk": float(target_risk), "fitted_on": fitted_on,
            "cross_fit": {"folds": int(folds), "grouped_by": "source image", "achieved": r["achieved"],
                          "worst_shift": r["worst_shift"], "clean_reviewed": r["clean_reviewed"],
                          "clean_images": int(len(clean.labels))},
            "rule": (f"needs review when the learned score (P(label right) from confidence, OOD score and appearance "
                     f"distances) is below its predicted class's threshold, chosen on cross-fitted scores so that "
                     f"<= {100 * target_risk:.2g} % of each shift's images among the {fitted_on} are silent errors")}


class Scored:
    """What a review-score fit reads of a set of labelled images: calibrated probabilities (N, C), OOD scores (N,)
    or None, appearance ratios (N, C), true labels, whether the runtime reviews the image anyway (``flagged``), and
    the group of each image (its source image: copies of one image share a group)."""

    def __init__(self, probs, ood, ratios, labels, flagged, groups):
        self.probs = np.asarray(probs, np.float64)
        self.ood = None if ood is None else np.asarray(ood, np.float64)
        self.ratios = np.asarray(ratios, np.float64)
        self.labels = np.asarray(labels, np.int64)
        self.flagged = np.asarray(flagged, bool)
        self.groups = np.asarray(groups, np.int64)
        n = len(self.labels)
        if not (len(self.probs) == len(self.ratios) == len(self.flagged) == len(self.groups) == n
                and (self.ood is None or len(self.ood) == n)):
            raise ValueError("expected one row of probabilities, ratios, label, flag and group per image")
