"""Shift-aware checkpoint selection: which epoch of a run is kept (``best.pt``) and when it stops early.

Selected on clean validation macro-F1 alone, a robust recipe keeps its least robust epoch: clean validation
falls while robustness to another site's images rises (docs/SHIFT.md, the EMA fine-tune). With
``fit --select-shifted N`` every validation image is also scored under ``N`` acquisition shifts of
``shifts.SHIFTS`` and the run keeps the epoch with the highest

    selection score = (clean validation macro-F1 + shifted validation macro-F1) / 2

Only validation images and synthetic shifts take part: the test split and external folders stay for reporting.
The shifted set is built once per run: copy ``c`` of validation image ``i`` gets shift ``(i·N + c + seed) mod K``
(``K`` shifts; so every shift is used about equally, and an image's ``N`` copies get ``N`` different shifts),
random shifts drawing from ``shifts.image_rng(seed, shift name, i·N + c)``. Each shifted image keeps its label.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cadbcnn_runtime.spec import ModelSpec

from .data import ArrayDataset
from .shifts import SHIFTS, Shift, image_rng

#: How the selection score is named in logs, history.csv and summary.json.
CLEAN = "clean validation macro-F1"
SHIFT_AWARE = "(clean + shifted validation macro-F1) / 2"


def selection_score(clean_f1: float, shifted_f1: float | None) -> float:
    """The score a run maximises over epochs: clean macro-F1, or its mean with the shifted set's macro-F1."""
    return clean_f1 if shifted_f1 is None else 0.5 * (clean_f1 + shifted_f1)


def assigned_shifts(n_images: int, copies: int, seed: int, shifts: Sequence[Shift] = SHIFTS) -> list[Shift]:
    """The shift of each shifted copy, in order (image 0's copies first)."""
    return [shifts[(k + seed) % len(shifts)] for k in range(n_images * copies)]


class ShiftedValidation(ArrayDataset):
    """``copies`` shifted versions of each validation image, labels kept, as model inputs (runtime preprocessing)."""

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[int], spec: ModelSpec, *, copies: int,
                 seed: int):
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        self.shifts = assigned_shifts(len(images), copies, seed)
        super().__init__([s.apply(images[k // copies], image_rng(seed, s.name, k)) for k, s in enumerate(self.shifts)],
                         [labels[k // copies] for k in range(len(self.shifts))], spec)

    @classmethod
    def of_split(cls, samples: Sequence, spec: ModelSpec, *, images: dict | None, copies: int,
                 seed: int) -> "ShiftedValidation":
        """The shifted set of a split's samples (``data.Sample``), decoded as ``data.ImageDataset`` decodes them."""
        from .data import ImageDataset
        ds = ImageDataset(samples, spec, images=images)
        return cls([ds.image(i) for i in range(len(ds))], [s.label for s in samples], spec, copies=copies, seed=seed)

