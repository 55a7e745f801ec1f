"""The release rule, beside `scripts/release.sh` which applies it (and `scripts/experiments.py report`, which
states it in docs/EXPERIMENTS.md).

    python scripts/release_rule.py choose RUN     # prints best|last: the checkpoint a candidate keeps

* A candidate keeps the better of its best-on-validation and last checkpoint on validation macro-F1 after
  precise BN (ties: best). A run trained with `--select-shifted N` keeps its best: that run already scored
  every epoch on clean *and* shifted validation images (after precise BN), and best.pt is its maximum.
* The release is the best on validation among the candidates that pass every gate of `release.sh ship`
  (export parity gates and the OOD gate); test scores play no part.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def history(run: Path) -> list[dict]:
    """A run's history.csv as rows keyed by column name (values as floats)."""
    with open(run / "history.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def chosen_checkpoint(run: Path) -> str:
    """The release rule: 'best' or 'last', whichever scores the higher validation macro-F1 after precise BN;
    'best' for a run that selected on shifted validation images too (a clean re-evaluation cannot see its score)."""
    config = run / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("select_shifted", 0):
        return "best"
    f1 = {c: json.loads((run / f"val-{c}" / "metrics.json").read_text())["f1_macro"] for c in ("best", "last")}
    return "best" if f1["best"] >= f1["last"] else "last"


def ood_gate(run: Path) -> str:
    """The OOD release gate's verdict for a run (written by `scripts/release.sh gate`), as a table cell."""
    p = run / "ood-gate" / "ood_report.json"
    if not p.is_file():
        return "not run"
    gate = json.loads(p.read_text()).get("gate")
    if gate is None:
        return "not run"
    return "passed" if gate["passed"] else "failed: " + "; ".join(gate["failed"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("choose", help="print the checkpoint (best|last) a release candidate keeps")
    c.add_argument("run")
    a = ap.parse_args()
    print(chosen_checkpoint(Path(a.run)))
