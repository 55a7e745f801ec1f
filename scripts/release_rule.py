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
import sys
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


def validation_score(run: Path) -> tuple[float, float]:
    """(macro-F1, accuracy) on validation of the checkpoint RUN keeps (after precise BN): what candidates are
    ranked by."""
    m = json.loads((run / f"val-{chosen_checkpoint(run)}" / "metrics.json").read_text())
    return m["f1_macro"], m["accuracy"]


def pick(runs: list[Path]) -> tuple[Path | None, Path | None]:
    """(the release among RUNS: the best on validation among those whose OOD gate passed, or None; the best on
    validation). Runs without validation metrics (not through `release.sh post`) take no part."""
    scored = sorted((r for r in runs if (r / "val-best" / "metrics.json").is_file()),
                    key=validation_score, reverse=True)
    passing = [r for r in scored if ood_gate(r) == "passed"]
    return (passing[0] if passing else None), (scored[0] if scored else None)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("choose", help="print the checkpoint (best|last) a release candidate keeps")
    c.add_argument("run")
    p = sub.add_parser("pick", help="print the candidate the release rule ships (exit 1 when none passed the OOD "
                                    "gate; the best on validation is then printed to stderr)")
    p.add_argument("runs", nargs="+")
    p.add_argument("--best-if-none", action="store_true",
                   help="when none passed the gate, print the best on validation instead and exit 3")
    a = ap.parse_args()
    if a.cmd == "choose":
        print(chosen_checkpoint(Path(a.run)))
    else:
        released, best = pick([Path(r) for r in a.runs])
        if released is None:
            print(f"no candidate passed the OOD gate; best on validation: {best or 'none'}", file=sys.stderr)
            if a.best_if_none and best is not None:
                print(best)
                raise SystemExit(3)
            raise SystemExit(1)
        print(released)
