"""The scale-bar shortcut of one ONNX model, without the full shift report: clean split, corner covered, and
another class's corner pasted in (the same sets and numbers as ``cadbcnn-train shift-report``).

    .venv/bin/python scripts/scalebar_check.py MODEL.onnx --data DIR --split-file SPLIT.csv [--split test] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cadbcnn_runtime.classifier import Classifier
from cadbcnn_runtime.evaluation import run_model
from cadbcnn_train import shift_report as S


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split-file", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    clf = Classifier.from_file(a.model, device="cpu")
    benign = S.benign_index(clf.spec, a.model)
    images, truth = S.load_split(a.data, a.split_file, a.split, S.class_folders(clf.spec), None)
    clean = run_model(clf, images)
    sets = {f"clean {a.split} split": S.set_result(clean, truth, healthy=False, benign_index=benign, kind="clean",
                                                   severity="clean"),
            **S.scalebar_sets(clf, images, truth, clean, benign_index=benign, seed=a.seed)}
    print(f"{a.model} ({len(images)} {a.split} images)")
    for name, r in sets.items():
        extra = (f", moved to the donor's class {100 * r['moved_to_donor_class']:.1f} % "
                 f"({100 * r['moved_to_donor_class_silent']:.1f} % silent)" if "moved_to_donor_class" in r else "")
        print(f"  {name}: accuracy {100 * r['accuracy']:.1f} %, review {100 * r['review_rate']:.1f} %, "
              f"silent {100 * r['silent_error_rate']:.1f} %{extra}")
    if a.json:
        a.json.write_text(json.dumps({"model": str(a.model), "split": a.split, "sets": sets}, indent=1))


if __name__ == "__main__":
    main()
