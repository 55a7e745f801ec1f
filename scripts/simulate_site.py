"""Simulate a new site from our own data (docs/SITE_ADAPTATION.md): another stain protocol in HED space and a
lower magnification, applied to every image the same way (with a little per-image variation), keeping labels.

    python scripts/simulate_site.py --data ../shared/data/all-leukemia --split build/release-split.csv --out build/site

Writes, under OUT:
  data/<class folder>/…      the site's images: 100 per class from our train split ("local labelled images"),
                             30 per class from our val split, and our whole test split
  data/split.csv             which is which (for `cadbcnn-train fit --split-file`)
  local/<class folder>/…     the 100-per-class local images alone (for `refit-ood --data` and fine-tuning)
  test/<class folder>/…      the site's test images (our test split, shifted) for `cadbcnn-infer validate`
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cadbcnn_train.transforms import hed_to_rgb, rgb_to_hed, zoom  # noqa: E402


def site_shift(img: np.ndarray, rng: np.random.Generator, *, h_scale: float, e_scale: float, magnification: float,
               jitter: float = 0.05) -> np.ndarray:
    """The site's look: haematoxylin × h_scale, eosin × e_scale (± jitter per image), field × magnification."""
    hed = rgb_to_hed(img)
    hed[..., 0] *= h_scale * rng.uniform(1 - jitter, 1 + jitter)
    hed[..., 1] *= e_scale * rng.uniform(1 - jitter, 1 + jitter)
    return zoom(hed_to_rgb(hed), magnification, fill="tile")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True, help="The release split CSV (path,label,split).")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=100, help="Local labelled images per class (train split).")
    ap.add_argument("--val-per-class", type=int, default=30)
    ap.add_argument("--h-scale", type=float, default=1.35)
    ap.add_argument("--e-scale", type=float, default=0.70)
    ap.add_argument("--magnification", type=float, default=0.70)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rows = list(csv.DictReader(a.split.open()))
    rng = np.random.default_rng(a.seed)
    chosen: list[tuple[dict, str]] = []
    for split, per in (("train", a.per_class), ("val", a.val_per_class), ("test", None)):
        for label in sorted({r["label"] for r in rows}):
            group = [r for r in rows if r["split"] == split and r["label"] == label]
            if per is not None:
                group = [group[i] for i in sorted(rng.choice(len(group), min(per, len(group)), replace=False))]
            chosen += [(r, split) for r in group]
    out_rows = []
    for i, (r, split) in enumerate(chosen):
        img = cv2.cvtColor(cv2.imread(str(a.data / r["path"]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        shifted = site_shift(img, np.random.default_rng([a.seed, i]), h_scale=a.h_scale, e_scale=a.e_scale,
                             magnification=a.magnification)
        bgr = cv2.cvtColor(shifted, cv2.COLOR_RGB2BGR)
        name = Path(r["path"]).name
        dests = [a.out / "data" / r["label"] / name]
        dests.append(a.out / ("local" if split == "train" else "test" if split == "test" else "val") / r["label"] / name)
        for d in dests:
            d.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        out_rows.append({"path": f"{r['label']}/{name}", "label": r["label"], "split": split})
    with (a.out / "data" / "split.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        w.writeheader()
        w.writerows(out_rows)
    counts = {s: sum(1 for _, t in chosen if t == s) for s in ("train", "val", "test")}
    print(f"site images under {a.out}: {counts} (H ×{a.h_scale}, E ×{a.e_scale}, magnification ×{a.magnification})")


if __name__ == "__main__":
    main()
