"""Copy one split of a split.csv into a folder-per-class tree (for --parity-data, --calibration-data, --data).

    python scripts/split_folder.py runs/release-s0/split.csv ../shared/data/all-leukemia test build/test-split
"""

import csv
import shutil
import sys
from pathlib import Path

split_csv, root, split, dest = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
n = 0
with open(split_csv, newline="") as f:
    for row in csv.DictReader(f):
        if row["split"] == split:
            target = dest / row["label"] / Path(row["path"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / row["path"], target)
            n += 1
print(f"{n} {split} images → {dest}")
