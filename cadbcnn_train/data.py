"""Folder-per-class datasets, leakage-aware splits, augmentation.

Decoding and resizing go through ``cadbcnn_runtime.preprocess`` — the very
function the runtime ships — so training, evaluation and deployment see the
same pixels. Augmentation runs on training images only, before it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from cadbcnn_runtime.errors import DatasetError, ImageError
from cadbcnn_runtime.preprocess import IMAGE_SUFFIXES, decode_bytes, preprocess, read_file
from cadbcnn_runtime.spec import ModelSpec

log = logging.getLogger(__name__)

#: Known class folders of the ALL dataset, in output order, with display names.
#: Other datasets fall back to sorted folder names used as display names.
KNOWN_CLASSES: dict[str, str] = {"Benign": "Benign", "Early": "Early Pre-B", "Pre": "Pre-B", "Pro": "Pro-B"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    digest: str = ""  # sha1 of the file bytes (exact-duplicate detection)


@dataclass
class LoadedDataset:
    root: Path
    class_folders: tuple[str, ...]
    class_names: tuple[str, ...]
    samples: list[Sample]
    images: dict[Path, np.ndarray] | None  # decoded RGB cache, or None
    skipped: list[tuple[str, str]]          # (path, reason) of unreadable files

    def counts(self, samples: Iterable[Sample] | None = None) -> dict[str, int]:
        c = Counter(s.label for s in (self.samples if samples is None else samples))
        return {self.class_names[i]: c.get(i, 0) for i in range(len(self.class_names))}


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def class_layout(root: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(folder names in output order, display names) for a folder-per-class root."""
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found. Pass --data DIR with one sub-folder per class.")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and any(is_image(f) for f in d.iterdir()))
    if not folders:
        raise DatasetError(f"{root}: no class folders with images ({', '.join(IMAGE_SUFFIXES)}) found. "
                           "Expected DIR/<class>/<image> — one sub-folder per class.")
    if len(folders) < 2:
        raise DatasetError(f"{root}: only one class folder ({folders[0]!r}) holds images; a classifier needs at "
                           "least two. Add a folder per class.")
    if set(folders) == set(KNOWN_CLASSES):
        folders = list(KNOWN_CLASSES)
        return tuple(folders), tuple(KNOWN_CLASSES[f] for f in folders)
    return tuple(folders), tuple(folders)


def scan(root: Path, *, max_per_class: int | None = None, seed: int = 0,
         class_folders: Sequence[str] | None = None) -> tuple[tuple[str, ...], tuple[str, ...], list[Sample]]:
    root = Path(root)
    folders, names = class_layout(root)
    if class_folders is not None and tuple(class_folders) != folders:
        raise DatasetError(f"{root}: class folders {list(folders)} differ from the model's {list(class_folders)}.")
    samples: list[Sample] = []
    rng = random.Random(seed)
    for label, folder in enumerate(folders):
        files = sorted(f for f in (root / folder).iterdir() if is_image(f))
        if max_per_class is not None and len(files) > max_per_class:
            files = sorted(rng.sample(files, max_per_class))
        samples += [Sample(f, label) for f in files]
    return folders, names, samples


def load(root: Path, *, max_per_class: int | None = None, seed: int = 0, cache: bool = True,
         class_folders: Sequence[str] | None = None, only: set[Path] | None = None) -> LoadedDataset:
    """Scan, hash and decode every image once; unreadable ones are skipped and reported."""
    folders, names, samples = scan(root, max_per_class=max_per_class, seed=seed, class_folders=class_folders)
    if only is not None:
        samples = [s for s in samples if s.path in only]
    kept: list[Sample] = []
    images: dict[Path, np.ndarray] | None = {} if cache else None
    skipped: list[tuple[str, str]] = []
    for s in samples:
        try:
            data = read_file(s.path)
            img = decode_bytes(data, name=str(s.path))
        except ImageError as exc:
            log.warning("skipping unreadable image: %s", exc)
            skipped.append((str(s.path), str(exc)))
            continue
        kept.append(Sample(s.path, s.label, hashlib.sha1(data).hexdigest()))
        if images is not None:
            images[s.path] = img
    if len({s.label for s in kept}) < 2:
        raise DatasetError(f"{root}: fewer than two classes have readable images ({len(skipped)} skipped).")
    return LoadedDataset(Path(root), folders, names, kept, images, skipped)


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------
def _file_number(path: Path) -> int | None:
    nums = re.findall(r"\d+", path.stem)
    return int(nums[-1]) if nums else None


def _groups(samples: Sequence[Sample], mode: str, block_size: int) -> list[int]:
    """Group id per sample: exact duplicates always share a group; in ``grouped`` mode
    blocks of consecutive file numbers within a class do too (union-find)."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    keys: dict[tuple, int] = {}
    for i, s in enumerate(samples):
        link = [("hash", s.digest)] if s.digest else []
        if mode == "grouped":
            num = _file_number(s.path)
            block = (num if num is not None else i) // block_size
            link.append(("block", s.label, s.path.parent.name, block))
        for key in link:
            if key in keys:
                union(i, keys[key])
            else:
                keys[key] = i
    return [find(i) for i in range(len(samples))]


def make_split(samples: Sequence[Sample], *, mode: str = "stratified", ratios=(0.70, 0.15, 0.15),
               seed: int = 0, block_size: int = 20) -> list[str]:
    """Assign every sample to train/val/test, stratified by class, never splitting a group."""
    if mode not in ("stratified", "grouped"):
        raise DatasetError(f"unknown split mode {mode!r}; use 'stratified' or 'grouped'")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise DatasetError(f"split ratios {ratios} must sum to 1")
    group_of = _groups(samples, mode, block_size)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_of):
        members[g].append(i)
    by_class: dict[int, list[int]] = defaultdict(list)
    for g, idx in members.items():
        label = Counter(samples[i].label for i in idx).most_common(1)[0][0]
        by_class[label].append(g)
    rng = random.Random(seed)
    assignment = [""] * len(samples)
    for label in sorted(by_class):
        groups = sorted(by_class[label])
        rng.shuffle(groups)
        total = sum(len(members[g]) for g in groups)
        target = [r * total for r in ratios]
        have = [0, 0, 0]
        for g in groups:
            # Give the group to the split that is furthest below its target share.
            k = max(range(3), key=lambda j: (target[j] - have[j]) / max(target[j], 1e-9))
            have[k] += len(members[g])
            for i in members[g]:
                assignment[i] = SPLITS[k]
    return assignment


def split_csv_text(root: Path, samples: Sequence[Sample], assignment: Sequence[str],
                   class_folders: Sequence[str]) -> tuple[str, str]:
    """The ``path,label,split`` table (paths relative to the data root) and its sha256, the split's identity."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "split"])
    for s, split in zip(samples, assignment):
        w.writerow([s.path.relative_to(root).as_posix(), class_folders[s.label], split])
    text = buf.getvalue()
    return text, hashlib.sha256(text.encode()).hexdigest()


def write_split_csv(path: Path, root: Path, samples: Sequence[Sample], assignment: Sequence[str],
                    class_folders: Sequence[str]) -> str:
    """Write the split table (``split_csv_text``) to ``path``; return its sha256."""
    text, sha = split_csv_text(root, samples, assignment, class_folders)
    Path(path).write_text(text, encoding="utf-8")
    return sha


def split_rows(path: Path) -> list[dict[str, str]]:
    path = Path(path)
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise DatasetError(f"{path}: split file not found; pass the split.csv written by `cadbcnn-train fit`") from None
    if not rows or set(rows[0]) != {"path", "label", "split"}:
        raise DatasetError(f"{path}: not a split file (expected the header 'path,label,split')")
    return rows


def read_split_csv(path: Path, root: Path, samples: Sequence[Sample],
                   class_folders: Sequence[str]) -> list[str]:
    """The split of every sample; every sample must have a row."""
    table = {r["path"]: r for r in split_rows(path)}
    out = []
    for s in samples:
        rel = s.path.relative_to(root).as_posix()
        row = table.get(rel)
        if row is None:
            raise DatasetError(f"{path}: has no row for {rel}; regenerate the split or pass the matching --data")
        if row["label"] != class_folders[s.label] or row["split"] not in SPLITS:
            raise DatasetError(f"{path}: row for {rel} has label {row['label']!r} / split {row['split']!r}, "
                               f"which does not match the dataset")
        out.append(row["split"])
    return out


def split_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------
# Augmentation (training only, on RGB uint8 HWC, before preprocessing)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Augment:
    flips: bool = True
    rot90: bool = True
    brightness: float = 0.10
    contrast: float = 0.10
    color: float = 0.05
    crop_scale: float | None = 0.80  # min area fraction of a random-resized crop; None disables

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape[:2]
        if self.crop_scale is not None and rng.random() < 0.5:
            area = rng.uniform(self.crop_scale, 1.0) * h * w
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            ch = int(round(min(h, np.sqrt(area / ratio))))
            cw = int(round(min(w, np.sqrt(area * ratio))))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            img = cv2.resize(img[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_LINEAR)
        if self.flips:
            if rng.random() < 0.5:
                img = img[:, ::-1]
            if rng.random() < 0.5:
                img = img[::-1]
        if self.rot90:
            img = np.rot90(img, int(rng.integers(0, 4)))
        if self.brightness or self.contrast or self.color:
            x = img.astype(np.float32)
            gain = rng.uniform(1 - self.contrast, 1 + self.contrast)
            gain = gain * rng.uniform(1 - self.color, 1 + self.color, size=3).astype(np.float32)
            mean = x.mean()
            x = (x - mean) * gain + mean * rng.uniform(1 - self.brightness, 1 + self.brightness)
            img = np.clip(x + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(img)


class ArrayDataset(Dataset):
    """Decoded RGB uint8 images (HWC) and their labels → (model input tensor, label), through the runtime's
    preprocessing: images made in memory (``augment.stain_copies``) beside an ``ImageDataset`` of files."""

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[int], spec: ModelSpec):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images for {len(labels)} labels")
        self.images, self.labels, self.spec = list(images), [int(k) for k in labels], spec

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return torch.from_numpy(preprocess(self.images[i], self.spec)), self.labels[i]


class ImageDataset(Dataset):
    """Samples → (model input tensor, label) through the runtime's preprocessing; with ``with_clean``
    (model input tensor, the un-augmented image's tensor, label), for ``fit --consistency``; with ``targets``
    (one row per sample) (model input tensor, that row, label), for ``fit --consistency --teacher``."""

    def __init__(self, samples: Sequence[Sample], spec: ModelSpec, *, images: dict | None = None,
                 augment: Augment | None = None, with_clean: bool = False, targets: torch.Tensor | None = None):
        if with_clean and targets is not None:
            raise ValueError("with_clean and targets both fill the middle item; pass one")
        if targets is not None and len(targets) != len(samples):
            raise ValueError(f"targets has {len(targets)} rows for {len(samples)} samples")
        self.samples = list(samples)
        self.spec = spec
        self.images = images
        self.augment = augment
        self.with_clean = with_clean
        self.targets = targets

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int) -> np.ndarray:
        s = self.samples[i]
        if self.images is not None and s.path in self.images:
            return self.images[s.path]
        return decode_bytes(read_file(s.path), name=str(s.path))

    def __getitem__(self, i: int):
        img = clean = self.image(i)
        if self.augment is not None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
            img = self.augment(img, np.random.default_rng(seed))
        x = torch.from_numpy(preprocess(img, self.spec))
        if self.with_clean:
            return x, torch.from_numpy(preprocess(clean, self.spec)), self.samples[i].label
        if self.targets is not None:
            return x, self.targets[i], self.samples[i].label
        return x, self.samples[i].label
