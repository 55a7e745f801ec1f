"""Post-hoc calibration: a temperature fitted on held-out labelled images, and the review threshold it implies.

One function for every caller — the trainer (validation split, at the end of ``fit`` or with
``cadbcnn-train calibrate``) and, torch-free, anyone who has a model's logits on labelled images. The result
is the spec's ``calibration`` entry plus a ``review_threshold``; the runtime divides the logits by the
temperature before the softmax, so ``Prediction.confidence`` is the calibrated probability.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def _class_threshold(conf: np.ndarray, correct: np.ndarray, *, floor: float, target_risk: float
                     ) -> tuple[float, bool]:
    """One predicted class's pooled rule: (the lowest confidence at which at most ``target_risk`` of its kept
    images are wrong, never below ``floor``; achieved). No kept image: (``floor``, True)."""
    if not len(conf):
        return float(floor), True
    r = choose_review_threshold(conf, correct, target_risk=target_risk)
    return max(float(floor), float(r.threshold)), bool(r.achieved)


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
        thresholds[name], achieved[name] = _class_threshold(conf[m], correct[m], floor=floor,
                                                            target_risk=target_risk)
        n[name] = int(m.sum())
    return {"thresholds": thresholds, "floor": float(floor), "target_risk": float(target_risk),
            "fitted_on": fitted_on, "kept_images": n, "achieved": achieved, "accuracy": float(correct.mean())}


def each_shift_review(probs: np.ndarray, labels: np.ndarray, flagged: np.ndarray | None, shifts: Sequence[str], *,
                      clean_probs: np.ndarray, clean_flagged: np.ndarray | None, class_names: Sequence[str],
                      floor: float, target_risk: float, fitted_on: str) -> dict[str, Any]:
    """A review threshold for each *predicted* class such that in **every shift's** images (``shifts``: the shift
    of each image) at most ``target_risk`` are silent errors (wrong and not reviewed; the denominator is all of
    that shift's images, as in the shift report), reviewing as few of the clean validation images (``clean_probs``)
    as it can; never below ``floor``. ``flagged`` images are reviewed whatever their confidence.

    ``per_class_review`` holds the risk on each class's pooled shifted images: a class whose errors cluster in one
    shift can then exceed the target there, and one whose errors are spread thin pays for a margin no shift needs.
    This rule fits the constraint the shift report checks (``each_shift_thresholds``). Returns the
    ``class_review`` record, with ``rule`` "each shift" and the worst shift's silent-error rate on these images."""
    p = np.asarray(probs, dtype=np.float64)
    cp = np.asarray(clean_probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    kept = np.ones(len(p), bool) if flagged is None else ~np.asarray(flagged, bool)
    c_kept = np.ones(len(cp), bool) if clean_flagged is None else ~np.asarray(clean_flagged, bool)
    pred = p.argmax(1)
    r = each_shift_thresholds(pred, p.max(1), labels, kept, shifts, cp.argmax(1), cp.max(1), c_kept,
                              n_classes=len(class_names), floor=floor, target_risk=target_risk)
    return {"thresholds": {n: float(t) for n, t in zip(class_names, r["thresholds"])}, "floor": float(floor),
            "target_risk": float(target_risk), "rule": "each shift", "fitted_on": fitted_on,
            "kept_images": {n: int((kept & (pred == c)).sum()) for c, n in enumerate(class_names)},
            "achieved": r["achieved"], "worst_shift": r["worst_shift"], "clean_reviewed": r["clean_reviewed"],
            "accuracy": float((pred == labels).mean())}


def each_shift_thresholds(pred: np.ndarray, conf: np.ndarray, labels: np.ndarray, kept: np.ndarray,
                          shifts: Sequence[str], clean_pred: np.ndarray, clean_conf: np.ndarray,
                          clean_kept: np.ndarray, *, n_classes: int, floor: float, target_risk: float,
                          max_moves: int = 1000) -> dict[str, Any]:
    """``each_shift_review`` on arrays: predicted class, confidence and truth of each shifted image, whether the
    runtime keeps it (not flagged), its shift; predicted class, confidence and kept of each clean image.

    Thresholds are observed confidences, as ``choose_review_threshold``'s. A local search from the per-class
    pooled rule's thresholds: each step takes the best of moving one class's threshold, or raising one and
    lowering another as far as every shift still holds — fewest clean images reviewed while every shift holds (while
    some shift does not: least total excess over the shifts' budgets), ties to fewer shifted images reviewed —
    until no step improves. Not achieved (``achieved`` False) when no thresholds ≤ 1 hold every shift."""
    pred, conf, kept = np.asarray(pred, np.int64), np.asarray(conf, np.float64), np.asarray(kept, bool)
    clean_pred, clean_conf = np.asarray(clean_pred, np.int64), np.asarray(clean_conf, np.float64)
    clean_kept = np.asarray(clean_kept, bool)
    wrong_kept = kept & (pred != np.asarray(labels, np.int64))
    shifts = np.asarray(shifts)
    if not len(shifts) == len(pred) == len(conf) == len(wrong_kept):
        raise ValueError("expected one prediction, confidence, label, kept flag and shift name per shifted image")
    names, g_of = np.unique(shifts, return_inverse=True)
    n_of = np.bincount(g_of, minlength=len(names))
    budget = target_risk * n_of + 1e-9
    k = n_classes
    cands, silent, c_rev, s_rev, start = [], [], [], [], []
    for c in range(k):
        m = kept & (pred == c)
        cand = np.unique(np.r_[float(floor), conf[m][conf[m] >= floor], 1.0])
        cands.append(cand)
        top = np.searchsorted(cand, conf, side="right") - 1  # confidence x is kept at every candidate <= x
        w = wrong_kept & (pred == c)
        s = np.zeros((len(names), len(cand) + 1))
        np.add.at(s, (g_of[w], top[w] + 1), 1)
        silent.append(s[:, ::-1].cumsum(1)[:, ::-1][:, 1:])  # silent[g, j]: kept wrong images at candidate j
        cm = clean_kept & (clean_pred == c)
        c_rev.append(np.searchsorted(np.sort(clean_conf[cm]), cand, side="left"))  # confidence < cand
        s_rev.append(np.searchsorted(np.sort(conf[m]), cand, side="left"))
        t0, _ = _class_threshold(conf[m], ~w[m], floor=floor, target_risk=target_risk)  # the pooled rule's
        start.append(min(int(np.searchsorted(cand, t0, side="left")), len(cand) - 1))
    j = np.array(start)

    def totals(jj: np.ndarray, without: Sequence[int] = ()) -> np.ndarray:
        return sum((silent[c][:, jj[c]] for c in range(k) if c not in without), np.zeros(len(names)))

    def cost(jj: np.ndarray) -> tuple[float, int, int]:
        return (float(np.maximum(totals(jj) - budget, 0).sum()), int(sum(c_rev[c][jj[c]] for c in range(k))),
                int(sum(s_rev[c][jj[c]] for c in range(k))))

    best = cost(j)
    for _ in range(max_moves):
        options = []
        for a in range(k):
            # one class moves: its lowest candidate with the least excess over the budgets
            excess = np.maximum(totals(j, (a,))[:, None] + silent[a] - budget[:, None], 0).sum(0)
            options.append(np.r_[j[:a], int(np.flatnonzero(excess <= excess.min() + 1e-12)[0]), j[a + 1:]])
            if best[0] > 0:
                continue
            for b in range(k):  # a raised, b lowered as far as every shift still holds
                if b == a:
                    continue
                slack = budget[:, None] - totals(j, (a, b))[:, None] - silent[a][:, j[a] + 1:]
                lowest = np.max([np.searchsorted(-silent[b][g], -slack[g], side="left") for g in range(len(names))],
                                axis=0)
                for ja, jb in zip(range(j[a] + 1, len(cands[a])), lowest):
                    if jb < j[b]:
                        jj = j.copy()
                        jj[a], jj[b] = ja, jb
                        options.append(jj)
        scored = sorted((cost(jj), tuple(jj)) for jj in options)
        if not scored or not scored[0][0] < best:
            break
        best, j = scored[0][0], np.array(scored[0][1])
    rates = totals(j) / n_of
    worst = int(np.argmax(rates))
    return {"thresholds": [float(cands[c][j[c]]) for c in range(k)], "achieved": best[0] == 0.0,
            "worst_shift": {"shift": str(names[worst]), "silent_error_rate": float(rates[worst])},
            "clean_reviewed": best[1]}


def hold_per_class(entry: dict[str, Any], review: float, logits: np.ndarray, labels: np.ndarray,
                   flagged: np.ndarray | None, *, class_names: Sequence[str], fitted_on: str,
                   target_risk: float, each_shift: EachShift | None = None) -> dict[str, Any]:
    """A clean calibration (``fit_calibration``'s entry and threshold) whose review rule must also hold on shifted
    held-out images *per predicted class*: the entry with a ``class_review`` record. The spec's
    ``review_threshold`` stays ``review`` (the floor of every class); the runtime raises it per class.

    Without ``each_shift`` each class holds ``target_risk`` on its pooled shifted images (``per_class_review``);
    with it, every shift holds it (``each_shift_review``: the shift of each image and the clean images it counts)."""
    p = softmax(np.asarray(logits, dtype=np.float64), entry["temperature"])
    if each_shift is None:
        record = per_class_review(p, labels, flagged, class_names=class_names, floor=review, target_risk=target_risk,
                                  fitted_on=fitted_on)
        rule = (f"{entry['review_rule']}; raised per predicted class until <= {100 * target_risk:.2g} % of the kept "
                f"{fitted_on} given that class are wrong")
    else:
        record = each_shift_review(
            p, labels, flagged, each_shift.shifts, class_names=class_names, floor=review, target_risk=target_risk,
            fitted_on=fitted_on, clean_probs=softmax(np.asarray(each_shift.clean_logits, dtype=np.float64),
                                                     entry["temperature"]), clean_flagged=each_shift.clean_flagged)
        rule = (f"{entry['review_rule']}; raised per predicted class until <= {100 * target_risk:.2g} % of each "
                f"shift's images among the {fitted_on} are silent errors, reviewing the fewest clean images")
    return {**entry, "class_review": record, "review_rule": rule}


@dataclass(frozen=True)
class EachShift:
    """What ``hold_per_class`` needs to hold the rule on every shift: the shift of each shifted image, and the
    clean validation images' logits and flags (the rule reviews as few of them as it can)."""

    shifts: Sequence[str]
    clean_logits: np.ndarray
    clean_flagged: np.ndarray | None = None


def review_thresholds(calibration: Mapping[str, Any] | None, class_names: Sequence[str],
                      review_threshold: float) -> dict[str, float]:
    """The confidence threshold the runtime applies to each predicted class: ``review_threshold``, raised where the
    spec's ``calibration.class_review.thresholds`` says so — unless the calibration carries a learned review score
    (``review_score``), which then replaces the per-class confidence thresholds (``class_review`` stays in the spec
    for runtimes that do not read the score)."""
    if (calibration or {}).get("review_score") is not None:
        return {n: float(review_threshold) for n in class_names}
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
