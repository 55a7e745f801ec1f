"""The acquisition shifts a new site brings, as data: one table shared by the shift report (``shift_report``),
the shift-aware checkpoint selection (``selection``) and the OOD rule study (``scripts/ood_rules.py``).

Each shift is a named uint8-RGB → uint8-RGB transform (the transforms themselves live in ``transforms.py``,
shared with the training augmentation); random ones draw from ``image_rng``, so every shifted image is
reproducible from (seed, shift name, image index) alone.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from cadbcnn_runtime.errors import ArgumentError

from .transforms import blur, brightness, gamma, hed_jitter, hue, saturation, sensor_noise, white_balance
from .transforms import jpeg as _jpeg
from .transforms import zoom as _zoom


@dataclass(frozen=True)
class Shift:
    """A named acquisition shift. ``apply(img, rng)``; deterministic ones ignore ``rng``."""

    name: str
    kind: str       # magnification | stain | exposure | focus | compression | camera | noise
    severity: str   # mild | strong
    apply: Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _fixed(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    return lambda img, rng: f(img)


SHIFTS: tuple[Shift, ...] = (
    Shift("zoom ×0.5 (tiled)", "magnification", "strong", _fixed(lambda im: _zoom(im, 0.5))),
    Shift("zoom ×0.7 (tiled)", "magnification", "strong", _fixed(lambda im: _zoom(im, 0.7))),
    Shift("zoom ×1.3", "magnification", "mild", _fixed(lambda im: _zoom(im, 1.3))),
    Shift("zoom ×1.5", "magnification", "strong", _fixed(lambda im: _zoom(im, 1.5))),
    Shift("zoom ×2", "magnification", "strong", _fixed(lambda im: _zoom(im, 2.0))),
    Shift("HED stain jitter (H, E ×U(0.7–1.3) +U(±0.15) OD)", "stain", "strong", hed_jitter),
    Shift("hue +10°", "stain", "mild", _fixed(lambda im: hue(im, 10))),
    Shift("hue −10°", "stain", "mild", _fixed(lambda im: hue(im, -10))),
    Shift("hue +20°", "stain", "strong", _fixed(lambda im: hue(im, 20))),
    Shift("hue −20°", "stain", "strong", _fixed(lambda im: hue(im, -20))),
    Shift("saturation ×0.5", "stain", "strong", _fixed(lambda im: saturation(im, 0.5))),
    Shift("saturation ×1.5", "stain", "strong", _fixed(lambda im: saturation(im, 1.5))),
    Shift("brightness ×0.7", "exposure", "strong", _fixed(lambda im: brightness(im, 0.7))),
    Shift("brightness ×1.3", "exposure", "strong", _fixed(lambda im: brightness(im, 1.3))),
    Shift("gamma 0.7", "exposure", "strong", _fixed(lambda im: gamma(im, 0.7))),
    Shift("gamma 1.5", "exposure", "strong", _fixed(lambda im: gamma(im, 1.5))),
    Shift("gaussian blur σ=1.5", "focus", "mild", _fixed(lambda im: blur(im, 1.5))),
    Shift("gaussian blur σ=3", "focus", "strong", _fixed(lambda im: blur(im, 3.0))),
    Shift("JPEG quality 30", "compression", "mild", _fixed(lambda im: _jpeg(im, 30))),
    Shift("JPEG quality 10", "compression", "strong", _fixed(lambda im: _jpeg(im, 10))),
    Shift("white balance R×1.15 B×0.85 (warm camera)", "camera", "strong",
          _fixed(lambda im: white_balance(im, (1.15, 1.0, 0.85)))),
    Shift("white balance R×0.85 B×1.15 (cool camera)", "camera", "strong",
          _fixed(lambda im: white_balance(im, (0.85, 1.0, 1.15)))),
    Shift("sensor noise σ=10", "noise", "strong", sensor_noise),
)


def image_rng(seed: int, name: str, index: int) -> np.random.Generator:
    """The generator for image ``index`` of set ``name``: independent of the other sets and of the order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), index])


def shifted(shift: Shift, images: Sequence[np.ndarray], seed: int) -> Iterator[np.ndarray]:
    for i, img in enumerate(images):
        yield shift.apply(img, image_rng(seed, shift.name, i))


def check_copies(copies: int, option: str) -> None:
    """Refuse a number of shifted copies per validation image outside 0 (off) … one per shift."""
    if not 0 <= copies <= len(SHIFTS):
        raise ArgumentError(f"{option} must be 0 (clean validation images only) or a number of shifted copies per "
                            f"validation image from 1 to {len(SHIFTS)} (one per shift), got {copies}")
