"""Review rules compared on per-image predictions (``shift-report --predictions``), without running the model.

A review rule here is a confidence threshold per *predicted* class: an image is reviewed when the runtime already
reviews it for another reason (out of distribution, blank field) or when its calibrated confidence is below the
threshold of the class it was given. A single threshold is the special case of equal thresholds. Every rule is
fitted on the **validation** split's report (its clean images and their synthetic shifts; never the test split,
never external folders) and scored on another report:

* ``spec``: the model file's own threshold (reproduces the runtime's ``needs_review``; a check of the file).
* ``clean``: the lowest threshold at which at most ``clean_risk`` of the *kept* clean validation images are wrong.
  Kept means not already reviewed by the OOD or blank-field check — the spec's rule counts every image.
* ``pooled``: the higher of ``clean`` and the threshold that holds ``shifted_risk`` on the pooled shifted
  validation images (``calibrate --shifted-copies``' rule, with kept counted as above).
* ``per-shift``: the higher of ``clean`` and every shift's own threshold at ``shifted_risk``.
* ``per-class``: for each predicted class, the higher of ``clean`` and the threshold that holds ``shifted_risk`` on
  the pooled shifted validation images *given that class*. Errors under shift concentrate in a few labels
  (over-exposed images read as Pro-B), so a class whose kept predictions are rarely wrong need not pay for one
  that is. The clean threshold is a floor for every class: a class's threshold is only ever raised.
* ``each-shift``: per predicted class, as few clean validation images reviewed as possible while every shift's
  silent-error rate (wrong and kept, among all of that shift's images) is at most ``shifted_risk``
  (``calibration.each_shift_thresholds``; ``calibrate --per-class --each-shift``); floor ``clean`` as above.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cadbcnn_runtime.errors import DatasetError
from cadbcnn_runtime.calibration import each_shift_thresholds
from cadbcnn_runtime.reliability import choose_review_threshold, silent_error_stats

SHIFTED = ("mild", "strong")  # the severities of the synthetic shift sets (fitted on; scored as groups)
RULES = ("spec", "clean", "pooled", "per-shift", "per-class", "each-shift")


@dataclass
class Predictions:
    """The rows of one predictions.csv as arrays (``truth`` is -1 where unknown)."""

    class_names: tuple[str, ...]
    set: np.ndarray
    severity: np.ndarray
    truth: np.ndarray
    healthy: np.ndarray
    label: np.ndarray
    confidence: np.ndarray
    flagged: np.ndarray        # reviewed whatever the confidence: out of distribution, a blank field, or an
    #                            appearance unlike the training images of the predicted class
    needs_review: np.ndarray   # what the runtime said

    @classmethod
    def read(cls, path: Path) -> "Predictions":
        path = Path(path)
        if path.is_dir():
            path = path / "predictions.csv"
        if not path.is_file():
            raise DatasetError(f"{path}: not found; write it with `cadbcnn-train shift-report … --predictions`.")
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            names = tuple(c[2:] for c in reader.fieldnames or () if c.startswith("p_"))
            rows = list(reader)
        if not names or not rows:
            raise DatasetError(f"{path}: no predictions (empty, or not a shift-report predictions.csv).")
        index = {n: i for i, n in enumerate(names)}

        def col(key, fn, dtype):
            return np.array([fn(r[key]) for r in rows], dtype)

        return cls(names, col("set", str, object), col("severity", str, object),
                   col("truth", lambda v: index[v] if v else -1, np.int64), col("healthy", lambda v: v == "1", bool),
                   col("label", index.__getitem__, np.int64), col("confidence", float, np.float64),
                   np.array([r["out_of_distribution"] == "1" or r["low_content"] == "1"
                             or r.get("atypical_appearance") == "1" for r in rows], bool),
                   col("needs_review", lambda v: v == "1", bool))

    def __len__(self) -> int:
        return len(self.label)

    def where(self, mask: np.ndarray) -> "Predictions":
        return Predictions(self.class_names, *(getattr(self, k)[mask] for k in (
            "set", "severity", "truth", "healthy", "label", "confidence", "flagged", "needs_review")))

    @property
    def correct(self) -> np.ndarray:
        return self.label == self.truth


def _threshold(p: Predictions, risk: float) -> float:
    """The lowest confidence at which at most ``risk`` of the kept images are wrong (flagged ones are never kept,
    so they neither count as errors nor as kept images); no kept image at all → 0 (nothing to hold)."""
    keep = ~p.flagged
    if not keep.any():
        return 0.0
    return choose_review_threshold(p.confidence[keep], p.correct[keep], target_risk=risk).threshold


def fit_rules(val: Predictions, *, spec_threshold: float | Sequence[float], clean_risk: float = 0.005,
              shifted_risk: float = 0.02) -> dict[str, np.ndarray]:
    """Every rule's threshold per predicted class, fitted on a validation report's predictions (``spec``: the
    model file's own threshold, one number or one per class)."""
    k = len(val.class_names)
    clean = val.where(val.severity == "clean")
    shifted = val.where(np.isin(val.severity, SHIFTED) & (val.truth >= 0))
    if not len(clean) or not len(shifted):
        raise DatasetError("the validation predictions need the clean split and its shifted sets "
                           "(shift-report --split val --predictions)")
    t_clean = _threshold(clean, clean_risk)
    t_pooled = max(t_clean, _threshold(shifted, shifted_risk))
    t_shift = max([t_clean] + [_threshold(shifted.where(shifted.set == s), shifted_risk)
                               for s in sorted(set(shifted.set))])
    per_class = np.array([max(t_clean, _threshold(shifted.where(shifted.label == c), shifted_risk))
                          for c in range(k)])
    each = each_shift_thresholds(shifted.label, shifted.confidence, shifted.truth, ~shifted.flagged, shifted.set,
                                 clean.label, clean.confidence, ~clean.flagged, n_classes=k, floor=t_clean,
                                 target_risk=shifted_risk)["thresholds"]
    return {"spec": np.broadcast_to(np.asarray(spec_threshold, float), (k,)).copy(), "clean": np.full(k, t_clean),
            "pooled": np.full(k, t_pooled), "per-shift": np.full(k, t_shift), "per-class": per_class,
            "each-shift": np.array(each)}


def review(p: Predictions, thresholds: np.ndarray) -> np.ndarray:
    """needs_review under a rule: flagged, or confidence below the threshold of the predicted class."""
    return p.flagged | (p.confidence < np.asarray(thresholds)[p.label])


def score(p: Predictions, thresholds: np.ndarray, *, benign_index: int) -> dict[str, Any]:
    """Per-set silent-error statistics under a rule, and the pooled figures of each severity group."""
    r = review(p, thresholds)
    sets: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(p.set):  # report order
        m = p.set == name
        labelled = bool((p.truth[m] >= 0).all())
        healthy = bool(p.healthy[m].all())
        sets[name] = {"severity": p.severity[m][0],
                      **silent_error_stats(p.label[m], p.truth[m] if labelled else None, r[m],
                                           healthy=healthy and not labelled, benign_index=benign_index)}
    groups: dict[str, dict[str, Any]] = {}
    for sev in dict.fromkeys(p.severity):
        rows = [s for s in sets.values() if s["severity"] == sev and s["silent_errors"] is not None]
        if rows:
            n = sum(s["n"] for s in rows)
            groups[sev] = {"n": n, "review_rate": sum(s["review_rate"] * s["n"] for s in rows) / n,
                           "silent_error_rate": sum(s["silent_errors"] for s in rows) / n,
                           "over_2pct": sum(s["silent_error_rate"] > 0.02 for s in rows),
                           "worst": max(s["silent_error_rate"] for s in rows)}
    return {"sets": sets, "groups": groups}


def compare(val: Predictions, test: Predictions, *, spec_threshold: float | Sequence[float], benign: str = "Benign",
            clean_risk: float = 0.005, shifted_risk: float = 0.02) -> dict[str, Any]:
    """Fit every rule on ``val``, score each on ``test``; also how often ``spec`` disagrees with the runtime."""
    if val.class_names != test.class_names:
        raise DatasetError(f"the two reports are of models with other classes: {val.class_names} vs {test.class_names}")
    rules = fit_rules(val, spec_threshold=spec_threshold, clean_risk=clean_risk, shifted_risk=shifted_risk)
    b = test.class_names.index(benign)
    return {"class_names": list(test.class_names), "clean_risk": clean_risk, "shifted_risk": shifted_risk,
            "spec_disagrees_with_runtime": int((review(test, rules["spec"]) != test.needs_review).sum()),
            "rules": {name: {"thresholds": t.tolist(), **score(test, t, benign_index=b)} for name, t in rules.items()}}


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def markdown(result: dict[str, Any], *, title: str) -> str:
    """The comparison as tables: the summary per rule, then silent errors (review) per set per rule."""
    names = list(result["rules"])
    out = [f"# {title}", "",
           f"Rules fitted on the validation report (clean ≤ {100 * result['clean_risk']:.2g} %, shifted ≤ "
           f"{100 * result['shifted_risk']:.2g} % wrong among kept), scored on the other report. "
           f"`spec` disagrees with the runtime's own flag on {result['spec_disagrees_with_runtime']} images.", "",
           "| rule | thresholds (" + ", ".join(result["class_names"]) + ") | clean acc / review / **silent** % | "
           "mild: review / **silent** % (sets > 2 %) | strong: review / **silent** % (sets > 2 %) | "
           "worst shifted set % | blank + external silent |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for name in names:
        r = result["rules"][name]
        clean = next(s for s in r["sets"].values() if s["severity"] == "clean")
        g = r["groups"]
        other = [s["silent_errors"] for s in r["sets"].values() if s["severity"] in ("blank", "external")
                 and s["silent_errors"] is not None]

        def grp(sev):
            x = g.get(sev)
            return "—" if x is None else f"{_pct(x['review_rate'])} / **{_pct(x['silent_error_rate'])}** ({x['over_2pct']})"

        worst = max((g[s]["worst"] for s in SHIFTED if s in g), default=None)
        out.append(f"| {name} | " + ", ".join(f"{t:.3f}" for t in r["thresholds"]) + f" | {_pct(clean['accuracy'])} / "
                   f"{_pct(clean['review_rate'])} / **{_pct(clean['silent_error_rate'])}** | {grp('mild')} | "
                   f"{grp('strong')} | {_pct(worst)} | {sum(other)} |")
    out += ["", "Per set: review % / **silent** %.", "",
            "| set | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for s in result["rules"][names[0]]["sets"]:
        cells = []
        for name in names:
            x = result["rules"][name]["sets"][s]
            cells.append(f"{_pct(x['review_rate'])} / **{_pct(x['silent_error_rate'])}**")
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def spec_thresholds_of(report_dir: Path) -> list[float]:
    """The review threshold of each class a shift report was run with (its JSON: the spec's threshold, raised per
    class where its calibration has a ``class_review``)."""
    import json

    from cadbcnn_runtime.calibration import review_thresholds

    path = Path(report_dir) / "shift_report.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not found; pass the folder of a `cadbcnn-train shift-report` run.")
    r = json.loads(path.read_text(encoding="utf-8"))
    if (r.get("calibration") or {}).get("review_score") is not None:
        raise DatasetError(f"{path}: the model carries a learned review score, not a confidence threshold per class; "
                           "compare it with scripts/review_score_study.py")
    return list(review_thresholds(r.get("calibration"), r["class_names"], r["review_threshold"]).values())


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("val", type=Path, help="shift-report --split val --predictions output folder (fitted on)")
    ap.add_argument("test", type=Path, help="shift-report --split test --predictions output folder (scored)")
    ap.add_argument("--out", type=Path, required=True, help="folder for review_rules.md and review_rules.json")
    ap.add_argument("--clean-risk", type=float, default=0.005)
    ap.add_argument("--shifted-risk", type=float, default=0.02)
    ap.add_argument("--title", default="Review rules")
    a = ap.parse_args(argv)
    for risk in (a.clean_risk, a.shifted_risk):
        if not 0 < risk < 1:
            ap.error(f"risks must be in (0, 1), got {risk}")
    result = compare(Predictions.read(a.val), Predictions.read(a.test), spec_threshold=spec_thresholds_of(a.test),
                     clean_risk=a.clean_risk, shifted_risk=a.shifted_risk)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "review_rules.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md = markdown(result, title=a.title)
    (a.out / "review_rules.md").write_text(md, encoding="utf-8")
    print(md)
    return 0
