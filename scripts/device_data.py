"""Copy the training and validation images of a split into an ignored folder of the checkout, for the lent GPU
machine (`scripts/device_release.sh`; docs/STATUS.md, "GPU sessions"), and check that the tree that travels fits.

    python scripts/device_data.py build/release-split.csv ../shared/data/all-leukemia build/device-data

`../shared` does not travel to the device, and everything that does travel — tracked files present in the working
tree, untracked files git does not ignore, and the carried paths — must fit in 64 MiB. The images are copied
unchanged (no re-encoding: the device trains on the very bytes this machine trains on), under their class folders
in ``OUT/<the dataset folder's name>/`` (the spec records that name), with ``split.csv`` holding their rows only. The test images stay here: the test split, the shift report and the
external folders are measured on this machine from the weights that come back.

With ``--teacher MODEL.onnx`` it also writes ``teacher.json`` beside ``split.csv`` (``cadbcnn-train teacher`` on the copied training
images, 242 KB for the release split): the released model's answers travel where its 67 MB cannot, and a model
trained from scratch there can distil them (``fit --consistency W --teacher``).

Exits 2, having written nothing, when the images and the tree together would not fit, and says what takes the
room (the released model files are 105 MB of the tracked tree: move them aside for the device call).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64.0
SPLITS = ("train", "val")


def travelling_bytes(root: Path = ROOT) -> tuple[int, list[tuple[int, str]]]:
    """Bytes of the files that travel without a carry (tracked and present, untracked and not ignored), and the
    largest of them."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    sizes = []
    for name in {n for n in out.decode().split("\0") if n}:
        p = root / name
        if p.is_file() and not p.is_symlink():
            sizes.append((p.stat().st_size, name))
    sizes.sort(reverse=True)
    return sum(s for s, _ in sizes), sizes[:5]


def rows_of(split_csv: Path, splits: tuple[str, ...]) -> list[dict[str, str]]:
    from cadbcnn_runtime.errors import DatasetError
    from cadbcnn_train.data import split_rows

    try:
        return [r for r in split_rows(split_csv) if r["split"] in splits]
    except DatasetError as exc:
        raise SystemExit(f"error: {exc}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("split_csv", type=Path)
    ap.add_argument("data", type=Path, help="the dataset root the split's paths are relative to")
    ap.add_argument("out", type=Path, help="an ignored folder of the checkout, e.g. build/device-data")
    ap.add_argument("--splits", default=",".join(SPLITS), help="which splits to copy (default: train,val)")
    ap.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="what may travel in all (the device's 64 MiB)")
    ap.add_argument("--teacher", type=Path, default=None,
                    help="also write OUT/teacher.json: this exported model's logits on the copied training images, "
                         "for `fit --consistency W --teacher` (device_release.sh: TEACHER=OUT/teacher.json)")
    a = ap.parse_args(argv)
    splits = tuple(s.strip() for s in a.splits.split(",") if s.strip())
    rows = rows_of(a.split_csv, splits)
    if not rows:
        print(f"error: {a.split_csv} has no rows of split {', '.join(splits)}")
        return 2
    missing = [r["path"] for r in rows if not (a.data / r["path"]).is_file()]
    if missing:
        print(f"error: {len(missing)} images of {a.split_csv} are not under {a.data} (first: {missing[0]}); pass the "
              "dataset root the split was drawn from")
        return 2
    out = a.out.resolve()
    try:
        rel = out.relative_to(ROOT)
    except ValueError:
        print(f"error: {a.out} is outside the checkout ({ROOT}); only the checkout travels to the device")
        return 2
    ignored = subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=ROOT).returncode == 0
    if not ignored:
        print(f"error: {rel} is not ignored by git; use a folder under build/ so it travels only when carried")
        return 2
    images = sum((a.data / r["path"]).stat().st_size for r in rows)
    tree, largest = travelling_bytes()
    total = tree + images
    mib = 2**20
    print(f"{len(rows)} images ({', '.join(splits)}): {images / mib:.1f} MiB; the tree that travels without them: "
          f"{tree / mib:.1f} MiB; together {total / mib:.1f} of {a.limit_mib:g} MiB")
    if total > a.limit_mib * mib:
        print("error: too large to travel; nothing written. Largest files of the tree:")
        for s, name in largest:
            print(f"  {s / mib:7.1f} MiB  {name}")
        print("Move the released model files aside for the device call (mkdir -p build/aside && mv models/*.onnx "
              "build/aside/; after it: git checkout -- models/), or copy fewer splits (--splits).")
        return 2
    if out.exists():
        shutil.rmtree(out)
    # under the dataset's own folder name: the spec records it (training.dataset, and the citation of all-leukemia)
    root = out / a.data.resolve().name
    for r in rows:
        dst = root / r["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(a.data / r["path"], dst)
    with open(root / "split.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "split"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    if a.teacher is not None:  # the student's training images, read from the copy (the paths fit runs with)
        from cadbcnn_train.consistency import write_teacher

        t = write_teacher(a.teacher, root, root / "teacher.json", split_file=root / "split.csv", split="train",
                          log=lambda m: None)
        print(f"teacher: logits of {t['model']} on {len(t['logits'])} training images → "
              f"{rel.as_posix()}/{root.name}/teacher.json")
    print(f"→ {rel.as_posix()}/{root.name} (carry=[\"{rel.as_posix()}\"]; on the device: scripts/device_release.sh "
          f"train {rel.as_posix()}/{root.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
