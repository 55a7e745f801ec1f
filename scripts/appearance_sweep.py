"""Choose the appearance check's quantile on the **validation** split only, without rerunning the model:

    cadbcnn-train shift-report MODEL --split val --predictions --out build/rules/NAME-val …   # the model's outputs
    .venv/bin/python scripts/appearance_sweep.py MODEL build/rules/NAME-val ../shared/data/all-leukemia \
        build/release-split.csv --out docs/shift/appearance-sweep

For each quantile: the check (``cadbcnn_runtime.appearance.fit_appearance``) is fitted on the training split's
images per true class; the validation report's clean images and their shifted copies (rebuilt exactly as the shift
report builds them, same seed) get the check's flag; the review rule (``review_rules``; ``--rule``, default the
per-class rule) is refitted on what the check keeps and scored on the same validation report. Test images and
external folders are not read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cadbcnn_runtime.appearance import SMOOTH_SIGMA, AppearanceCheck, appearance_features, atypical, fit_appearance
from cadbcnn_runtime.preprocess import preprocess
from cadbcnn_runtime.spec import ModelSpec
from cadbcnn_train.review_rules import Predictions, fit_rules, score
from cadbcnn_train.shift_report import load_split
from cadbcnn_train.shifts import SHIFTS, shifted

QUANTILES = (0.999, 0.995, 0.99, 0.985, 0.98, 0.97, 0.95)
WATCHED = ("sensor noise σ=10", "gaussian blur σ=3")  # acquisition changes the model reads well
CLEAN = "clean val split"


def features(images, spec, smooth_sigma: float = SMOOTH_SIGMA) -> np.ndarray:
    out = []
    for i in range(0, len(images), 64):
        out.append(appearance_features(np.stack([preprocess(im, spec) for im in images[i:i + 64]]), smooth_sigma))
    return np.concatenate(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="the model the report ran (its spec: input size, class folders)")
    ap.add_argument("val_report", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("split_file", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0, help="the shift report's seed (default 0, as it ran)")
    ap.add_argument("--rule", choices=("per-class", "each-shift"), default="per-class",
                    help="the review rule refitted on what each check keeps (review_rules; the released file: "
                         "each-shift at --shifted-risk 0.015)")
    ap.add_argument("--shifted-risk", type=float, default=0.02)
    ap.add_argument("--smooth-sigma", type=float, default=SMOOTH_SIGMA,
                    help=f"the features' Gaussian smoothing in pixels (default {SMOOTH_SIGMA:g}, the released file's; "
                         "0 = the unsmoothed features of the first released check)")
    a = ap.parse_args()
    report = json.loads((a.val_report / "shift_report.json").read_text())
    spec = ModelSpec.from_onnx(a.model)
    names = tuple(report["class_names"])
    if names != spec.class_names:
        raise SystemExit(f"{a.val_report}: was not run with {a.model} (classes {names})")
    folders = tuple(spec.training["class_folders"])
    pred = Predictions.read(a.val_report)
    train, train_y = load_split(a.data, a.split_file, "train", folders, None)
    val, _ = load_split(a.data, a.split_file, "val", folders, None)
    f_train = features(train, spec, a.smooth_sigma)
    per_set = {CLEAN: features(val, spec, a.smooth_sigma)}
    for s in SHIFTS:
        per_set[s.name] = features(list(shifted(s, val, a.seed)), spec, a.smooth_sigma)
    rows_of = {name: np.flatnonzero(pred.set == name) for name in per_set}
    base_flagged = pred.flagged.copy()
    sev = np.isin(pred.severity, ("clean", "mild", "strong"))
    thr_spec = report["review_threshold"]
    result = {}
    for q in (None, *QUANTILES):
        flagged = base_flagged.copy()
        if q is not None:
            check = AppearanceCheck(fit_appearance(f_train, train_y, names, fitted_on="train", quantile=q,
                                                   smooth_sigma=a.smooth_sigma), names)
            for name, idx in rows_of.items():
                flagged[idx] |= atypical(check.scores(per_set[name], pred.label[idx]))  # rows in image order
        p = pred.where(sev)
        p.flagged = flagged[sev]
        t = fit_rules(p, spec_threshold=thr_spec, shifted_risk=a.shifted_risk)[a.rule]
        s = score(p, t, benign_index=names.index("Benign"))
        clean = s["sets"][CLEAN]
        g = s["groups"]
        result["off" if q is None else str(q)] = {
            "thresholds": t.tolist(), "clean_review": clean["review_rate"], "clean_silent": clean["silent_error_rate"],
            "clean_flagged_by_check": float(flagged[rows_of[CLEAN]].mean() - base_flagged[rows_of[CLEAN]].mean()),
            "mild_review": g["mild"]["review_rate"], "mild_silent": g["mild"]["silent_error_rate"],
            "strong_review": g["strong"]["review_rate"], "strong_silent": g["strong"]["silent_error_rate"],
            "sets_over_2pct": g["mild"]["over_2pct"] + g["strong"]["over_2pct"],
            "worst": max(g["mild"]["worst"], g["strong"]["worst"]),
            "review_of": {n: s["sets"][n]["review_rate"] for n in WATCHED}}
    lines = ["# Appearance check: the quantile chosen on the validation split", "",
             f"Validation report `{a.val_report}`; features smoothed by {a.smooth_sigma:g} px; the `{a.rule}` rule "
             f"(shifted risk {a.shifted_risk:g}) refitted on what each check keeps and scored on the same validation "
             "report (nothing from the test split or external folders). Last column: review % of "
             + " / ".join(WATCHED) + ", which the model reads well.", "",
             "| quantile | thresholds (" + ", ".join(names) + ") | clean review / silent % | mild review / silent % "
             "| strong review / silent % | sets > 2 % | worst set % | noise, blur review % |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for q, r in result.items():
        lines.append(f"| {q} | " + ", ".join(f"{v:.4f}" for v in r["thresholds"])
                     + f" | {100 * r['clean_review']:.1f} / {100 * r['clean_silent']:.2f} | {100 * r['mild_review']:.1f}"
                     f" / {100 * r['mild_silent']:.2f} | {100 * r['strong_review']:.1f} / {100 * r['strong_silent']:.2f}"
                     f" | {r['sets_over_2pct']} | {100 * r['worst']:.1f} | "
                     + " / ".join(f"{100 * v:.0f}" for v in r["review_of"].values()) + " |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "appearance_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / "appearance_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
