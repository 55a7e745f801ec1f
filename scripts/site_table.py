"""The before/after table of docs/SITE_ADAPTATION.md from the validation reports of scripts/site_adaptation.sh.

    python scripts/site_table.py build/site/reports
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEPS = [("released", "released model (v0.1.0)"), ("refit-ood", "+ OOD flag refitted on 400 local images"),
         ("adapt-bn", "+ BatchNorm statistics of 400 unlabelled local images (adapt-bn), flags refitted"),
         ("finetuned", "fine-tuned from the released ONNX (100 labelled / class)")]


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def main(root: Path) -> None:
    print("| model | site test: accuracy | review | OOD | silent errors | verdict | our test: accuracy | review "
          "| silent | BCCD fields: flagged OOD | silent malignant | PBC cells: flagged OOD | silent malignant |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, label in STEPS:
        d = root / key
        if not d.is_dir():
            continue
        r = {p.parent.name: json.loads(p.read_text()) for p in d.glob("*/validation.json")}
        s, o = r["site-test"]["stats"], r["own-test"]["stats"]
        b, c = r["bccd-fields"]["stats"], r["pbc-cells"]["stats"]
        print(f"| {label} | {pct(s['accuracy'])} | {pct(s['review_rate'])} | {pct(s['ood_rate'])} | "
              f"{pct(s['silent_error_rate'])} | {r['site-test']['verdict']} | {pct(o['accuracy'])} | "
              f"{pct(o['review_rate'])} | {pct(o['silent_error_rate'])} | {pct(b['ood_rate'])} | "
              f"{pct(b['silent_error_rate'])} | {pct(c['ood_rate'])} | {pct(c['silent_error_rate'])} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/site/reports"))
