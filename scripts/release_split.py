"""Regenerate a released model's split.csv from its spec, and check it against the spec's split counts.

The release run's split.csv is not in git. `cadbcnn-train fit` draws it from the data, the seed and the split mode
recorded in the spec (`training.seed`, `training.split`), so it can be drawn again; the per-split, per-class counts
the spec recorded (`training.split_counts`) must come out equal, else the data folder is not the one trained on.

    python scripts/release_split.py models/cadbcnn.onnx build/release-split.csv [--data ../shared/data/all-leukemia]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cadbcnn_runtime.spec import ModelSpec  # noqa: E402
from cadbcnn_train import data as D  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a released cadbcnn ONNX file")
    ap.add_argument("out", type=Path, help="where to write split.csv")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/all-leukemia"))
    a = ap.parse_args()

    spec = ModelSpec.from_onnx(a.model)
    tr = spec.training
    want = tr.get("split_counts")
    if not want or "seed" not in tr or "split" not in tr:
        raise SystemExit(f"{a.model}: the spec records no seed/split/split_counts; this model's split cannot be redrawn")
    ds = D.load(a.data, seed=int(tr["seed"]), cache=False, class_folders=tr.get("class_folders"))
    assignment = D.make_split(ds.samples, mode=str(tr["split"]), seed=int(tr["seed"]))
    got = Counter((split, spec.class_names[s.label]) for s, split in zip(ds.samples, assignment))
    got_nested = {split: {c: got[(split, c)] for c in spec.class_names} for split in D.SPLITS}
    if got_nested != {k: dict(v) for k, v in want.items()}:
        raise SystemExit(f"{a.data}: the redrawn split's counts {got_nested} differ from the spec's {want}; "
                         "is this the dataset the model was trained on?")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sha = D.write_split_csv(a.out, ds.root, ds.samples, assignment, ds.class_folders)
    print(f"{a.out}: {len(ds.samples)} images, counts equal the spec's, sha256 {sha[:12]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
