"""The learned review score against the released rule, on a model's stored shift-report predictions (no model run):

    cadbcnn-train shift-report MODEL --split val --predictions --out build/rules/NAME-val …    # the model's outputs
    cadbcnn-train shift-report MODEL --split test --predictions --out build/rules/NAME-test …  # (reporting only)
    .venv/bin/python scripts/review_score_study.py MODEL build/rules/NAME-val ../shared/data/all-leukemia \
        build/release-split.csv [--test-report build/rules/NAME-test] --out docs/shift/review-score-study

Both rules keep the OOD flag, the field-content check and the appearance check (fitted on the training split at
``--quantile``, as the released file's) and the clean rule's confidence floor; what differs is the last cut:

* **confidence** — per-class confidence thresholds by the each-shift rule (the released file's rule);
* **score** — the learned review score (``cadbcnn_runtime.review_score``): weights fitted on the validation images and
  their shifted copies, thresholds by the same each-shift rule on **cross-fitted** scores (5 folds by source image).

Three readings: (1) validation, the score's rows cross-fitted (what it would review on images its weights did not
see); (2) **leave one shift family out** on validation: the weights and thresholds of both rules fitted without
one family (hue, zoom, brightness, …), silent errors measured on that family — how the rule meets a shift it was
never fitted on, as a new site's may be; (3) with ``--test-report``, the test split, for reporting only (nothing is
chosen on it). Appearance features are rebuilt exactly as the shift report builds its sets (same seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from appearance_sweep import features  # scripts/: the appearance features of decoded images, as the sweep's
from cadbcnn_runtime.appearance import AppearanceCheck, atypical, fit_appearance
from cadbcnn_runtime.calibration import each_shift_thresholds
from cadbcnn_runtime.review_score import ReviewScore, Scored, fit_review_score
from cadbcnn_runtime.spec import ModelSpec
from cadbcnn_train.review_rules import Predictions
from cadbcnn_train.shift_report import load_split
from cadbcnn_train.shifts import SHIFTS, shifted

SEVERITIES = ("clean", "mild", "strong")


def family(shift: str) -> str:
    """hue, zoom, brightness, … ('white balance' is one family)."""
    return "white balance" if shift.startswith("white balance") else shift.split(" ")[0]


class Report:
    """One stored report's rows (clean, mild and strong sets; external folders dropped) with appearance ratios."""

    def __init__(self, path: Path, spec: ModelSpec, data: Path, split_file: Path, split: str, check: AppearanceCheck,
                 seed: int):
        pred = Predictions.read(path)
        rows = np.flatnonzero(np.isin(pred.severity, SEVERITIES))
        pred = pred.where(np.isin(pred.severity, SEVERITIES))
        csv_rows = _csv(path)
        self.set, self.severity, self.truth, self.label = pred.set, pred.severity, pred.truth, pred.label
        self.conf = pred.confidence
        names = spec.class_names
        self.probs = np.array([[float(csv_rows[i][f"p_{n}"]) for n in names] for i in rows])
        self.ood = np.array([float(csv_rows[i]["ood_score"]) for i in rows])
        self.image = np.array([int(csv_rows[i]["image"]) for i in rows])
        self.hard = np.array([csv_rows[i]["out_of_distribution"] == "1" or csv_rows[i]["low_content"] == "1"
                              for i in rows])
        images, _ = load_split(data, split_file, split, tuple(spec.training["class_folders"]), None)
        per_set = {f"clean {split} split": features(images, spec)}
        for s in SHIFTS:
            per_set[s.name] = features(list(shifted(s, images, seed)), spec)
        self.ratios = np.full((len(self.set), len(names)), np.nan)
        for name, f in per_set.items():
            m = self.set == name
            if m.any():
                self.ratios[m] = check.ratios(f)[self.image[m]]
        if np.isnan(self.ratios).any():
            raise SystemExit(f"{path}: sets without rebuilt features: {sorted(set(self.set[np.isnan(self.ratios[:, 0])]))}")
        self.flagged = self.hard | atypical(self.ratios[np.arange(len(self.label)), self.label])
        self.clean = self.severity == "clean"

    def scored(self, rows, floor: float) -> Scored:
        return Scored(self.probs[rows], self.ood[rows], self.ratios[rows], self.truth[rows],
                      self.flagged[rows] | (self.conf[rows] < floor), self.image[rows])


def _csv(path: Path) -> list[dict]:
    import csv

    with (path / "predictions.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def table(r: Report, review: np.ndarray) -> dict:
    out = {}
    for name in dict.fromkeys(r.set):
        m = r.set == name
        out[name] = {"severity": str(r.severity[m][0]), "n": int(m.sum()), "accuracy": float((r.label[m] == r.truth[m]).mean()),
                     "review": float(review[m].mean()), "silent": float((~review[m] & (r.label[m] != r.truth[m])).mean())}
    return out


def summary(t: dict) -> dict:
    def pool(sev, key):
        return float(np.mean([v[key] for v in t.values() if v["severity"] == sev]))
    shifted_sets = {k: v for k, v in t.items() if v["severity"] != "clean"}
    worst = max(shifted_sets, key=lambda k: shifted_sets[k]["silent"])
    return {"clean_review": pool("clean", "review"), "clean_silent": pool("clean", "silent"),
            "mild_review": pool("mild", "review"), "mild_silent": pool("mild", "silent"),
            "strong_review": pool("strong", "review"), "strong_silent": pool("strong", "silent"),
            "worst_set": worst, "worst_silent": shifted_sets[worst]["silent"],
            "sets_over_2pct": sum(v["silent"] > 0.02 for v in shifted_sets.values())}


def fit_rules(r: Report, rows: np.ndarray, names, floor: float, risk: float):
    """(confidence thresholds, ReviewScore, cross-fitted scores of ROWS) fitted on the report's ROWS only."""
    sh, cl = rows & ~r.clean, rows & r.clean
    kept = ~(r.flagged | (r.conf < floor))
    conf_t = np.asarray(each_shift_thresholds(r.label[sh], r.conf[sh], r.truth[sh], kept[sh], r.set[sh], r.label[cl],
                                              r.conf[cl], kept[cl], n_classes=len(names), floor=floor,
                                              target_risk=risk)["thresholds"])
    entry = fit_review_score(r.scored(cl, floor), r.scored(sh, floor), r.set[sh], class_names=names,
                             target_risk=risk, fitted_on="study")
    return conf_t, ReviewScore(entry, names), entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="the model the reports ran (its spec: classes, floor, input size)")
    ap.add_argument("val_report", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("split_file", type=Path)
    ap.add_argument("--test-report", type=Path, help="the same model's test report (reporting only)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quantile", type=float, default=0.98, help="the appearance check's (the released file's)")
    ap.add_argument("--risk", type=float, default=0.015, help="each shift's silent-error budget (the released file's)")
    ap.add_argument("--seed", type=int, default=0, help="the shift reports' seed (default 0, as they ran)")
    a = ap.parse_args()
    spec = ModelSpec.from_onnx(a.model)
    names = spec.class_names
    floor = float(spec.review_threshold)
    train, train_y = load_split(a.data, a.split_file, "train", tuple(spec.training["class_folders"]), None)
    check = AppearanceCheck(fit_appearance(features(train, spec), np.asarray(train_y), names, fitted_on="train",
                                           quantile=a.quantile), names)
    val = Report(a.val_report, spec, a.data, a.split_file, "val", check, a.seed)
    everything = np.ones(len(val.set), bool)
    conf_t, score, entry = fit_rules(val, everything, names, floor, a.risk)
    result = {"model": a.model.name, "quantile": a.quantile, "risk": a.risk, "floor": floor,
              "confidence_thresholds": dict(zip(names, conf_t.tolist())), "score_thresholds": entry["thresholds"],
              "cross_fit": entry["cross_fit"]}

    def conf_review(r: Report, t):
        return r.flagged | (r.conf < floor) | (r.conf < t[r.label])

    def score_review(r: Report, s: ReviewScore, trust=None):
        trust = s.scores(r.probs, r.ood, r.ratios) if trust is None else trust
        return r.flagged | (r.conf < floor) | s.low(trust, r.label)

    # (1) validation: the score's rows cross-fitted (the rows' own fold left out), thresholds as fitted
    from cadbcnn_runtime.review_score import cross_fitted, design
    x = design(val.probs, val.ood, val.ratios)
    oof = cross_fitted(x, val.probs.argmax(1) == val.truth, val.image)
    result["val"] = {"confidence": summary(table(val, conf_review(val, conf_t))),
                     "score (cross-fitted)": summary(table(val, score_review(val, score, oof)))}
    # (2) leave one shift family out
    lofo = {"confidence": [], "score": []}
    for fam in sorted({family(s) for s in val.set[~val.clean]}):
        held = np.array([family(s) == fam for s in val.set]) & ~val.clean
        t, s, _ = fit_rules(val, ~held, names, floor, a.risk)
        for rule, review in (("confidence", conf_review(val, t)), ("score", score_review(val, s))):
            tab = table(val, review)
            for name in dict.fromkeys(val.set[held]):
                lofo[rule].append({"family": fam, "set": name, **tab[name]})
            lofo[rule].append({"family": fam, "set": "clean (rules without " + fam + ")",
                               **tab["clean val split"]})
    result["leave_one_family_out"] = lofo
    if a.test_report:
        test = Report(a.test_report, spec, a.data, a.split_file, "test", check, a.seed)
        result["test"] = {"confidence": summary(table(test, conf_review(test, conf_t))),
                          "score": summary(table(test, score_review(test, score)))}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "review_score_study.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (a.out / "review_score_study.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    pct2 = lambda v: f"{100 * v:.2f}"  # noqa: E731
    lines = [f"# Learned review score vs per-class confidence thresholds — `{r['model']}`", "",
             f"Appearance check at the {100 * r['quantile']:g}th percentile, each shift ≤ {100 * r['risk']:g} % silent, "
             f"confidence floor {r['floor']:.4f}. Confidence thresholds: "
             + ", ".join(f"{n} {t:.4f}" for n, t in r["confidence_thresholds"].items()) + "; score thresholds: "
             + ", ".join(f"{n} {t:.4f}" for n, t in r["score_thresholds"].items()) + ".", "",
             "| rule | clean review / silent % | mild review / silent % | strong review / silent % | worst set % | sets > 2 % |",
             "|---|---:|---:|---:|---:|---:|"]
    for where in ("val", "test"):
        for rule, s in r.get(where, {}).items():
            lines.append(f"| {where}: {rule} | {pct(s['clean_review'])} / {pct2(s['clean_silent'])} | "
                         f"{pct(s['mild_review'])} / {pct2(s['mild_silent'])} | {pct(s['strong_review'])} / "
                         f"{pct2(s['strong_silent'])} | {s['worst_set']} {pct2(s['worst_silent'])} | "
                         f"{s['sets_over_2pct']} |")
    lines += ["", "## Leave one shift family out (validation)", "",
              "Both rules fitted without the family; silent errors on its sets. Clean review: of the clean validation "
              "images under the rules fitted without that family.", "",
              "| family | set | confidence: review / silent % | score: review / silent % |", "|---|---|---:|---:|"]
    for c, s in zip(r["leave_one_family_out"]["confidence"], r["leave_one_family_out"]["score"]):
        lines.append(f"| {c['family']} | {c['set']} | {pct(c['review'])} / {pct2(c['silent'])} | "
                     f"{pct(s['review'])} / {pct2(s['silent'])} |")
    for rule in ("confidence", "score"):
        rows = [x for x in r["leave_one_family_out"][rule] if not x["set"].startswith("clean")]
        clean = [x["review"] for x in r["leave_one_family_out"][rule] if x["set"].startswith("clean")]
        lines.append(f"\n**{rule}**: held-out sets over 2 % silent: "
                     + (", ".join(f"{x['set']} {pct2(x['silent'])}" for x in rows if x["silent"] > 0.02) or "none")
                     + f"; mean held-out silent {pct2(np.mean([x['silent'] for x in rows]))} % at "
                     f"{pct(np.mean([x['review'] for x in rows]))} % review; clean review {pct(min(clean))}–"
                     f"{pct(max(clean))} %.")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
