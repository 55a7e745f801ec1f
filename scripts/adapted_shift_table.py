"""Per shifted set: the released file adapted without labels (``cadbcnn-export adapt-bn``) on that shift's copies of
the *validation* split, scored on the same shift of the *test* split, beside the same file unadapted.

A lab adapts once per microscope; this asks what that buys on each synthetic "site" of the shift report. The
adaptation sees unlabelled validation images only (never a test image). The review rule stays the released
file's (temperature, per-class thresholds); adapt-bn refits the OOD flag and the appearance check on the same
validation images, as it does for a lab. Random shifts (HED jitter, sensor noise) draw the validation copies with
another seed than the test copies.

    python scripts/adapted_shift_table.py models/cadbcnn.onnx ../shared/data/all-leukemia build/release-split.csv \\
        --out docs/shift/adapt-bn [--shift NAME …] [--images 256] [--reference-images 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cadbcnn_export.adapt_bn import adapt_model  # noqa: E402
from cadbcnn_runtime.classifier import Classifier  # noqa: E402
from cadbcnn_runtime.errors import CadbcnnError  # noqa: E402
from cadbcnn_runtime.evaluation import run_model  # noqa: E402
from cadbcnn_train.shift_report import benign_index, class_folders, load_split, set_result  # noqa: E402
from cadbcnn_train.shifts import SHIFTS, shifted  # noqa: E402

CLEAN = "clean (control)"
TEST_SEED, VAL_SEED = 0, 1  # the shift report's test copies use seed 0


def score(model: Path, images, truth, benign: int, severity: str, kind: str) -> dict:
    with Classifier.from_file(model, device="cpu", threads=2) as clf:
        r = set_result(run_model(clf, images), truth, healthy=False, benign_index=benign, kind=kind,
                       severity=severity)
    return {k: r[k] for k in ("n", "accuracy", "review_rate", "silent_error_rate", "accuracy_non_reviewed")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("split", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shift", action="append", default=[], help="a shift name (repeatable; default: all)")
    ap.add_argument("--images", type=int, default=256, help="validation copies adapt-bn measures the statistics on")
    ap.add_argument("--reference-images", type=int, default=256)
    a = ap.parse_args()
    names = {s.name for s in SHIFTS} | {CLEAN}
    unknown = [n for n in a.shift if n not in names]
    if unknown:
        ap.error(f"unknown shift(s) {unknown}; choose from {sorted(names)}")
    spec = Classifier.from_file(a.model, device="cpu").spec
    folders = class_folders(spec)
    benign = benign_index(spec, a.model)
    val, _ = load_split(a.data, a.split, "val", folders, None)
    test, truth = load_split(a.data, a.split, "test", folders, None)
    todo = [(CLEAN, "clean", "clean", None)] + [(s.name, s.kind, s.severity, s) for s in SHIFTS]
    todo = [t for t in todo if not a.shift or t[0] in a.shift]
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, kind, severity, s in todo:
        t0 = time.time()
        test_imgs = test if s is None else list(shifted(s, test, TEST_SEED))
        val_imgs = val if s is None else list(shifted(s, val, VAL_SEED))
        row = {"set": name, "kind": kind, "severity": severity,
               "released": score(a.model, test_imgs, truth, benign, severity, kind)}
        with tempfile.TemporaryDirectory(prefix="cadbcnn-adapt-table-") as tmp:
            site = Path(tmp) / "site"
            site.mkdir()
            for i, im in enumerate(val_imgs):  # unlabelled: a flat folder
                cv2.imwrite(str(site / f"{i:04d}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
            out = Path(tmp) / "adapted.onnx"
            try:
                adapt_model(a.model, out, site, a.data, reference_split=a.split, images=a.images,
                            reference_images=a.reference_images, log=lambda *_: None)
                row["adapted"] = score(out, test_imgs, truth, benign, severity, kind)
            except CadbcnnError as exc:
                row["adapted"] = {"refused": str(exc)}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        ad = row["adapted"]
        print(f"{name}: released {100 * row['released']['accuracy']:.1f} % → adapted "
              + (f"{100 * ad['accuracy']:.1f} % (review {100 * ad['review_rate']:.1f} %, silent "
                 f"{100 * ad['silent_error_rate']:.2f} %)" if "accuracy" in ad else f"refused: {ad['refused']}")
              + f" [{row['seconds']:.0f} s]", flush=True)
        (a.out / "results.json").write_text(json.dumps({"model": str(a.model), "images": a.images,
                                                        "reference_images": a.reference_images, "rows": rows},
                                                       indent=2) + "\n")
    write_table(rows, a.out / "table.md")
    return 0


def write_table(rows: list[dict], path: Path) -> None:
    def cells(r: dict) -> str:
        if "accuracy" not in r:
            return "refused | | "
        return (f"{100 * r['accuracy']:.1f} | {100 * r['review_rate']:.1f} | "
                f"**{100 * r['silent_error_rate']:.1f}**")
    lines = ["| set | severity | released: acc % | review % | silent % | adapted (adapt-bn on the shift's "
             "unlabelled validation copies): acc % | review % | silent % |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['set']} | {r['severity']} | {cells(r['released'])} | {cells(r['adapted'])} |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
