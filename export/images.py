"""The labelled images of a parity or calibration set, decoded exactly as the runtime decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cadbcnn_runtime.errors import CadbcnnError, DatasetError
from cadbcnn_runtime.decode import image_files
from cadbcnn_runtime.preprocess import IMAGE_SUFFIXES, load_and_preprocess
from cadbcnn_runtime.spec import ModelSpec


# ---------------------------------------------------------------------------
# Images for parity / calibration
# ---------------------------------------------------------------------------
@dataclass
class ImageSet:
    """Preprocessed images (N, 3, H, W) and labels (−1 when unlabelled)."""

    x: np.ndarray
    labels: np.ndarray
    paths: list[str]

    def subset(self, idx: np.ndarray) -> "ImageSet":
        return ImageSet(self.x[idx], self.labels[idx], [self.paths[i] for i in idx])

    def sample(self, limit: int | None, seed: int = 0) -> "ImageSet":
        """At most LIMIT images, the seeded choice ``load_image_set(…, limit=LIMIT, seed=SEED)`` makes."""
        if limit is None or len(self.x) <= limit:
            return self
        return self.subset(np.sort(np.random.default_rng(seed).choice(len(self.x), limit, replace=False)))

    @property
    def labelled(self) -> bool:
        return len(self.labels) > 0 and bool((self.labels >= 0).all())


def load_image_set(folder: Path, spec: ModelSpec, class_folders: Sequence[str] | Mapping[str, int], *,
                   limit: int | None = None, seed: int = 0) -> ImageSet:
    """Images from DIR (recursively). Sub-folders named like the model's class folders (or mapped to a class index
    by CLASS_FOLDERS) give labels; images elsewhere get −1."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found")
    files = image_files(folder)
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    if limit is not None and len(files) > limit:
        rng = np.random.default_rng(seed)
        files = sorted(files[i] for i in rng.choice(len(files), limit, replace=False))
    index = dict(class_folders) if isinstance(class_folders, Mapping) else {n: i for i, n in enumerate(class_folders)}
    xs, labels, paths = [], [], []
    for f in files:
        try:
            xs.append(load_and_preprocess(f, spec))
        except CadbcnnError:
            continue  # unreadable images do not take part in a parity check
        rel = f.relative_to(folder).parts
        labels.append(index.get(rel[0], -1) if len(rel) > 1 else -1)
        paths.append(str(f))
    if not xs:
        raise DatasetError(f"{folder}: none of the images could be decoded")
    return ImageSet(np.stack(xs), np.asarray(labels), paths)
