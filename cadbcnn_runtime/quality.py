"""Field-content check: a blank, empty or out-of-focus field of view is routed to review, never classified silently.

The measure is the standard deviation of the luminance after a Gaussian blur (σ = 3 px) at the model's input
size: the blur removes sensor noise, so a uniform field of any grey level or tint, with or without noise, scores
≈ 0–3, while every image of the ALL dataset scores ≥ 10.7 (median 26.6). The threshold is fitted on the training
split (half its 0.1st percentile) and travels in the spec (``quality``); the runtime applies it. It is not tuned
on any external image set.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

MEASURE = "luminance std after Gaussian blur (sigma 3 px) at the model input size, 0-255 scale"
SIGMA = 3.0
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def content_scores(batch: np.ndarray) -> np.ndarray:
    """(N,) content scores for a preprocessed (N, 3, H, W) batch (uint8, or float32 in [0, 1])."""
    x = np.asarray(batch, dtype=np.float32)
    if batch.dtype != np.uint8:
        x = x * 255.0
    # Elementwise, not np.tensordot: a BLAS call wakes OpenBLAS's thread pool, whose threads keep spinning after
    # it and slowed the next ONNX Runtime run by 12-15 % (INT8, batch 8, 2 cores; docs/STATUS.md).
    y = x[:, 0] * _LUMA[0] + x[:, 1] * _LUMA[1] + x[:, 2] * _LUMA[2]  # (N, H, W)
    return np.array([float(cv2.GaussianBlur(im, (0, 0), SIGMA).std()) for im in y], dtype=np.float64)


def fit_quality(scores: np.ndarray, *, fitted_on: str, quantile: float = 0.001, factor: float = 0.5) -> dict[str, Any]:
    """The spec's ``quality`` entry: images scoring below ``factor`` × the ``quantile`` of SCORES need review."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("fit_quality needs at least one image")
    low = float(np.quantile(scores, quantile))
    return {"measure": MEASURE, "min_content": factor * low, "fitted_on": fitted_on,
            "rule": f"{factor:g} x the {100 * quantile:g}th percentile of the {fitted_on} ({low:.2f})",
            "fitted_min": float(scores.min()), "fitted_median": float(np.median(scores))}
