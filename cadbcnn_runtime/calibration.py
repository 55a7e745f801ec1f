"""Post-hoc calibration: a temperature fitted on held-out labelled images, and the review threshold it implies.

One function for every caller — the trainer (validation split, at the end of ``fit`` or with
``cadbcnn-train calibrate``) and, torch-free, anyone who has a model's logits on labelled images. The result
is the spec's ``calibration`` entry plus a ``review_threshold``; the runtime divides the logits by the
temperature before the softmax, so ``Prediction.confidence`` is the calibrated probability.
"""

from __future__ import annotations

from typing import Any

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


def temperature_of(calibration: dict[str, Any] | None) -> float:
    return 1.0 if not calibration else float(calibration["temperature"])
