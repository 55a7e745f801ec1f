"""Side-by-side table of several shift reports: accuracy, review rate and silent errors per set.

    .venv/bin/python scripts/compare_shift.py NAME=DIR_OR_JSON [NAME=DIR_OR_JSON ...]

Each argument names a column group and points at a `cadbcnn-train shift-report` output folder (or its JSON).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(arg: str) -> tuple[str, dict]:
    name, _, where = arg.partition("=")
    p = Path(where)
    f = p / "shift_report.json" if p.is_dir() else p
    if not name or not where or not f.is_file():
        raise SystemExit(f"{arg}: expected NAME=DIR_OR_JSON with a shift report there ({f} not found); "
                         "usage:\n" + __doc__)
    return name, json.loads(f.read_text())


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def table(reports: list[tuple[str, dict]]) -> str:
    names = [n for n, _ in reports]
    head = "| set | " + " | ".join(f"{n}: acc / review / **silent** %" for n in names) + " |"
    lines = [head, "|---|" + "---:|" * len(names)]
    sets = list(reports[0][1]["sets"])
    for s in sets:
        cells = []
        for _, r in reports:
            x = r["sets"].get(s)
            cells.append("n/a" if x is None else
                         f"{pct(x['accuracy'])} / {pct(x['review_rate'])} / **{pct(x['silent_error_rate'])}**")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    for g in reports[0][1]["summary"]:
        cells = [f"— / {pct(r['summary'][g]['review_rate'])} / **{pct(r['summary'][g]['silent_error_rate'])}**"
                 if g in r["summary"] else "n/a" for _, r in reports]
        lines.append(f"| *pooled: {g}* | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    if not sys.argv[1:]:
        raise SystemExit(__doc__)
    print(table([load(a) for a in sys.argv[1:]]))
