"""A tiny synthetic image-folder dataset (numpy + OpenCV, no torch): for tests, demos and smoke runs.

Trivially separable classes — a class colour plus noise and a dark blob standing in for a cell — so a model
that learns anything learns these. The predictions mean nothing clinically.
"""

from __future__ import annotations

from pathlib import Path

import cadbcnn_runtime  # noqa: F401 — sets OpenCV's pixel limit before cv2 loads
import cv2
import numpy as np

CLASS_COLOURS = {"Benign": (200, 60, 60), "Early": (60, 200, 60), "Pre": (60, 60, 200), "Pro": (200, 200, 60)}


def make_dataset(root: Path, *, per_class: int = 12, size: int = 48, classes=tuple(CLASS_COLOURS), seed: int = 0,
                 fmt: str = ".png") -> Path:
    """Trivially separable classes: a class colour plus noise and a random dark blob (a 'cell')."""
    rng = np.random.default_rng(seed)
    for c in classes:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        colour = np.array(CLASS_COLOURS.get(c, rng.integers(0, 255, 3)), np.float32)
        for i in range(per_class):
            img = np.clip(colour + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
            cx, cy = rng.integers(size // 4, 3 * size // 4, 2)
            cv2.circle(img, (int(cx), int(cy)), size // 6, (40, 20, 80), -1)
            cv2.imwrite(str(d / f"{c}-{i + 1:03d}{fmt}"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return root
