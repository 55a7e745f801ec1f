"""Post-hoc calibration: a temperature fitted on held-out labelled images, and the review threshold it implies.

One function for every caller — the trainer (validation split, at the end of ``fit`` or with
``cadbcnn-train calibrate``) and, torch-free, anyone who has a model's logits on labelled images. The result
is the spec's ``calibration`` entry plus a ``review_threshold``; the runtime divides the logits by the
temperature before the softmax, so ``Prediction.confidence`` is the calibrated probability.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .reliability import brier, choose_review_threshold, expected_calibration_error, fit_temperature, nll, softmax

METHOD = "temperature"
#: Default review rule: the lowest confidence at which at most this fraction of kept images is wrong.
TARGET_RISK = 0.005


def fit_calibration(logits: np.ndarray, labels: np.ndarray, *, fitted_on: str,
                    target_risk: float = TARGET_RISK) -> tuple[dict[str, Any], float]:
    """(spec ``calibration`` entry, review threshold) from logits and true labels of held-out images."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    t = fit_temperature(logits, labels)
    before, after = softmax(logits), softmax(logits, t)
    correct = after.argmax(1) == labels
    review = choose_review_threshold(after.max(1), correct, target_risk=target_risk)

    def scores(p: np.ndarray) -> dict[str, float]:
        return {"nll": nll(p, labels), "ece_15": expected_calibration_error(p.max(1), p.argmax(1) == labels),
                "brier": brier(p, labels)}

    entry = {
        "method": METHOD,
        "temperature": float(t),
        "fitted_on": fitted_on,
        "before": scores(before),
        "after": scores(after),
        "review_rule": (f"lowest calibrated confidence at which <= {100 * target_risk:.2g} % of the kept "
                        f"{fitted_on} images are wrong (risk-coverage)"),
        "review_target_risk": float(target_risk),
        "review_achieved": bool(review.achieved),
        "review_coverage": float(review.coverage),
    }
    return entry, float(review.threshold)


def shifted_review(logits: np.ndarray, labels: np.ndarray, *, temperature: float, fitted_on: str,
                   target_risk: float) -> tuple[dict[str, Any], float]:
    """A second review rule on held-out images under synthetic acquisition shifts (labels kept): the lowest
    calibrated confidence at which at most ``target_risk`` of the kept shifted images are wrong. The temperature
    stays the one fitted on the clean images; a caller reviews below the higher of the two thresholds
    (``hold_on_shifted`` does both). Returns (the calibration entry's ``shifted_review`` record, that threshold)."""
    p = softmax(np.asarray(logits, dtype=np.float64), temperature)
    labels = np.asarray(labels, dtype=np.int64)
    r = choose_review_threshold(p.max(1), p.argmax(1) == labels, target_risk=target_risk)
    return {"fitted_on": fitted_on, "target_risk": float(target_risk), "threshold": float(r.threshold),
            "achieved": bool(r.achieved), "coverage": float(r.coverage),
            "accuracy": float(np.mean(p.argmax(1) == labels))}, float(r.threshold)


def hold_on_shifted(entry: dict[str, Any], review: float, logits: np.ndarray, labels: np.ndarray, *,
                    fitted_on: str, target_risk: float) -> tuple[dict[str, Any], float]:
    """A clean calibration (``fit_calibration``'s entry and threshold) whose review rule must also hold on shifted
    held-out images: (a new entry with the ``shifted_review`` record and the combined rule, the higher threshold)."""
    record, threshold = shifted_review(logits, labels, temperature=entry["temperature"], fitted_on=fitted_on,
                                       target_risk=target_risk)
    rule = (f"{entry['review_rule']}; and <= {100 * target_risk:.2g} % of the kept {fitted_on} "
            "(the higher threshold of the two)")
    return {**entry, "shifted_review": record, "review_rule": rule}, max(float(review), threshold)


def clean_rule_on_kept(entry: dict[str, Any], logits: np.ndarray, labels: np.ndarray, flagged: np.ndarray, *,
                       target_risk: float) -> tuple[dict[str, Any], float]:
    """``fit_calibration``'s review rule with only the images the runtime keeps counted as kept: images flagged
    out of distribution or blank are reviewed whatever their confidence, so they are neither kept images nor
    errors of the rule. (``fit_calibration`` counts every image — the rule for a model without those flags.)
    Returns (the entry with the rule's record replaced, the threshold)."""
    p = softmax(np.asarray(logits, dtype=np.float64), entry["temperature"])
    labels = np.asarray(labels, dtype=np.int64)
    keep = ~np.asarray(flagged, bool)
    r = choose_review_threshold(p.max(1)[keep], (p.argmax(1) == labels)[keep], target_risk=target_risk)
    kept = int(keep.sum())
    return {**entry,
            "review_rule": (f"lowest calibrated confidence at which <= {100 * target_risk:.2g} % of the kept "
                            f"{entry['fitted_on']} images are wrong (risk-coverage; the {len(keep) - kept} images "
                            "flagged out of distribution or blank are reviewed anyway and not counted as kept)"),
            "review_achieved": bool(r.achieved), "review_coverage": float(r.coverage * kept / max(len(keep), 1))}, \
        float(r.threshold)


def per_class_review(probs: np.ndarray, labels: np.ndarray, flagged: np.ndarray | None, *,
                     class_names: Sequence[str], floor: float, target_risk: float, fitted_on: str) -> dict[str, Any]:
    """A review threshold for each *predicted* class: the lowest calibrated confidence at which at most
    ``target_risk`` of the kept images given that class are wrong, never below ``floor`` (the clean rule).
    ``flagged`` images (out of distribution, blank field: reviewed whatever their confidence) are never kept, so
    they count neither as kept images nor as errors. A class no kept image was given keeps ``floor``.
    Returns the calibration entry's ``class_review`` record; ``thresholds`` is what the runtime applies."""
    p = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    pred, conf = p.argmax(1), p.max(1)
    correct = pred == labels
    kept = np.ones(len(p), bool) if flagged is None else ~np.asarray(flagged, bool)
    thresholds, n, achieved = {}, {}, {}
    for c, name in enumerate(class_names):
        m = kept & (pred == c)
        r = choose_review_threshold(conf[m], correct[m], target_risk=target_risk) if m.any() else None
        thresholds[name] = max(float(floor), 0.0 if r is None else float(r.threshold))
        n[name] = int(m.sum())
        achieved[name] = True if r is None else bool(r.achieved)
    return {"thresholds": thresholds, "floor": float(floor), "target_risk": float(target_risk),
            "fitted_on": fitted_on, "kept_images": n, "achieved": achieved, "accuracy": float(correct.mean())}


def hold_per_class(entry: dict[str, Any], review: float, logits: np.ndarray, labels: np.ndarray,
                   flagged: np.ndarray | None, *, class_names: Sequence[str], fitted_on: str,
                   target_risk: float) -> dict[str, Any]:
    """A clean calibration (``fit_calibration``'s entry and threshold) whose review rule must also hold on shifted
    held-out images *per predicted class*: the entry with a ``class_review`` record. The spec's
    ``review_threshold`` stays ``review`` (the floor of every class); the runtime raises it per class."""
    record = per_class_review(softmax(np.asarray(logits, dtype=np.float64), entry["temperature"]), labels, flagged,
                              class_names=class_names, floor=review, target_risk=target_risk, fitted_on=fitted_on)
    rule = (f"{entry['review_rule']}; raised per predicted class until <= {100 * target_risk:.2g} % of the kept "
            f"{fitted_on} given that class are wrong")
    return {**entry, "class_review": record, "review_rule": rule}


def review_thresholds(calibration: Mapping[str, Any] | None, class_names: Sequence[str],
                      review_threshold: float) -> dict[str, float]:
    """The threshold the runtime applies to each predicted class: ``review_threshold``, raised where the spec's
    ``calibration.class_review.thresholds`` says so."""
    per_class = ((calibration or {}).get("class_review") or {}).get("thresholds") or {}
    return {n: max(float(review_threshold), float(per_class.get(n, 0.0))) for n in class_names}


def describe_thresholds(thresholds: Mapping[str, float]) -> str:
    """'0.877' when every class has the same threshold, else 'Benign 0.9996, Early Pre-B 0.877, …'."""
    values = set(thresholds.values())
    if len(values) == 1:
        return f"{values.pop():.3f}"
    return ", ".join(f"{n} {t:.4g}" for n, t in thresholds.items())


def temperature_of(calibration: dict[str, Any] | None) -> float:
    return 1.0 if not calibration else float(calibration["temperature"])
