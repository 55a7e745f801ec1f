"""Robust training augmentation: the acquisition shifts another site brings, drawn at random per image.

``RobustAugment(parts)`` runs the standard augmentation (``data.Augment``: random-resized crop, flips, 90°
rotations, mild colour) plus any of these parts, each ablatable on its own (``--augment-parts``):

* ``scalebar`` — cover the scale-bar corner (its text colour differs by class: a shortcut) half of the time;
* ``scale``    — magnification ×0.5–×2 (log-uniform; zoom-out filled by tiling or mirror padding);
* ``stain``    — haematoxylin/eosin concentration jitter (HED space), hue ±20°, saturation ×0.6–1.4;
* ``exposure`` — brightness ×0.7–1.3, contrast ×0.6–1.4, gamma 0.6–1.6, white balance ±15 % per channel;
* ``degrade``  — Gaussian blur σ 0.3–2.5, JPEG quality 15–90, sensor noise σ 2–12 (each 30 % of images).

``p`` (``--robust-p``) is the share of training images that get the robust parts at all; the others get the
standard augmentation only, so the model keeps seeing images as this lab makes them (1.0: every image).
A part can have its own share, drawn independently of ``p`` (``part_p``; on the command line ``PART=SHARE`` in
``--augment-parts``, e.g. ``scale=1,stain,exposure,degrade`` with ``--robust-p 0.5``: every image may be zoomed,
half of them get the colour and degradation parts).

Deterministic for a given ``np.random.Generator``; RGB uint8 HWC in and out, same size.
"""

from __future__ import annotations

from cadbcnn_runtime.errors import ArgumentError

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import transforms as T
from .config import STAIN_KEEP
from .data import Augment

PARTS = ("scalebar", "scale", "stain", "exposure", "degrade")


def _items(text: str | None) -> list[tuple[str, str | None]]:
    """``--augment-parts`` as (part, share text or None) pairs, in the order given."""
    if not text:
        return []
    if text.strip() in ("robust", "all"):
        return [(p, None) for p in PARTS]
    out = []
    for item in (i.strip() for i in text.split(",")):
        if item:
            name, sep, share = item.partition("=")
            out.append((name.strip(), share.strip() if sep else None))
    return out


def parse_augment_parts(text: str | None) -> tuple[tuple[str, ...], dict[str, float]]:
    """``--augment-parts`` in one pass: '' / None → no parts; 'robust' or 'all' → every part; else a comma list of
    PARTS, each optionally ``PART=SHARE`` (share in [0, 1]: drawn at its own rate). Returns (parts in canonical
    order, {part: share}); unknown names and bad shares are refused (ArgumentError) before any work."""
    items = _items(text)
    names = {name for name, _ in items}
    _refuse_unknown(names)
    shares = {}
    for name, share in items:
        if share is None:
            continue
        try:
            v = float(share)
        except ValueError:
            v = math.nan
        if not 0.0 <= v <= 1.0:
            raise ArgumentError(f"--augment-parts {name}={share}: the share must be a number in [0, 1], "
                                f"e.g. {name}=1")
        shares[name] = v
    return tuple(p for p in PARTS if p in names), shares


def _refuse_unknown(names) -> None:
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        raise ArgumentError(f"unknown augmentation part(s) {unknown}; choose from {', '.join(PARTS)} or 'robust'")


def check_parts(parts: tuple[str, ...], p: float, part_p: dict[str, float]) -> None:
    """The one check of a robust-augmentation setting (TrainConfig and RobustAugment both call it): known parts,
    the robust share p in [0, 1], each own share naming one of the parts and in [0, 1]."""
    _refuse_unknown(parts)
    if not 0.0 <= p <= 1.0:
        raise ArgumentError(f"the robust share p must be in [0, 1] (robust_p, --robust-p), got {p}")
    bad = {k: v for k, v in part_p.items() if k not in parts or not 0.0 <= v <= 1.0}
    if bad:
        raise ArgumentError(f"part shares (augment_part_p; PART=SHARE in --augment-parts) {bad}: each must name "
                            f"one of the parts {tuple(parts)} with a share in [0, 1]")


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


@dataclass(frozen=True)
class RobustAugment:
    parts: tuple[str, ...] = PARTS
    base: Augment = field(default_factory=Augment)
    scale_range: tuple[float, float] = (0.5, 2.0)
    p: float = 1.0
    part_p: dict[str, float] = field(default_factory=dict)  # parts drawn at their own share, independently of p

    def __post_init__(self):
        check_parts(self.parts, self.p, self.part_p)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # p < 1: one draw decides whether this image is shifted at all (p = 1 draws nothing: the same images as
        # before the option existed, so earlier ablations reproduce). A part with its own share draws once more.
        shifted = self.p >= 1.0 or rng.random() < self.p
        p = tuple(q for q in self.parts
                  if (rng.random() < self.part_p[q] if q in self.part_p else shifted))
        if "scalebar" in p and rng.random() < 0.5:
            img = T.erase_scalebar(img)
        if "scale" in p and rng.random() < 0.7:
            f = _log_uniform(rng, *self.scale_range)
            img = T.zoom(img, f, fill="tile" if rng.random() < 0.5 else "reflect",
                         offset=(float(rng.random()), float(rng.random())))
        img = self.base(img, rng)
        if "stain" in p:
            img = stain(img, rng)
        if "exposure" in p and rng.random() < 0.8:
            img = T.brightness(img, rng.uniform(0.7, 1.3))
            img = T.contrast(img, rng.uniform(0.6, 1.4))
            img = T.gamma(img, _log_uniform(rng, 0.6, 1.6))
            img = T.white_balance(img, rng.uniform(0.85, 1.15, 3))
        if "degrade" in p:
            if rng.random() < 0.3:
                img = T.blur(img, rng.uniform(0.3, 2.5))
            if rng.random() < 0.3:
                img = T.jpeg(img, int(rng.integers(15, 91)))
            if rng.random() < 0.3:
                img = T.sensor_noise(img, rng, rng.uniform(2, 12))
        return np.ascontiguousarray(img)


def stain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The ``stain`` part alone: HED concentration jitter (80 % of draws), then hue ±20° and saturation ×0.6–1.4
    (50 % of draws). RGB uint8 HWC in and out."""
    if rng.random() < 0.8:
        img = T.hed_jitter(img, rng, scale=0.25, shift=0.08)
    if rng.random() < 0.5:
        img = T.hsv_shift(img, dh=rng.uniform(-10, 10), ds=rng.uniform(0.6, 1.4))  # OpenCV hue units: ±20°
    return img


#: The most stain copies per training image the review checks may be fitted on (``--stain-copies``).
MAX_STAIN_COPIES = 8


def check_stain_copies(copies: int, option: str = "--stain-copies") -> None:
    """Refuse a number of stain copies per training image outside 0 (off) … ``MAX_STAIN_COPIES``, before any work."""
    if isinstance(copies, bool) or not isinstance(copies, int) or not 0 <= copies <= MAX_STAIN_COPIES:
        raise ArgumentError(f"{option} must be a whole number of stain copies per training image in "
                            f"[0, {MAX_STAIN_COPIES}] (0 = clean images only; 2 = the v0.2.0 recipe's), got {copies}")


def keep_lightness(copy: np.ndarray, original: np.ndarray) -> np.ndarray:
    """``copy`` with the CIELAB lightness L* of ``original`` (same size): hue and chroma of the one, exposure
    and sharpness of the other. RGB uint8 HWC in and out."""
    import cv2

    lab = cv2.cvtColor(copy, cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.cvtColor(original, cv2.COLOR_RGB2LAB)[..., 0]
    return np.ascontiguousarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))


def stain_copies(images: Sequence[np.ndarray], copies: int, seed: int, keep: str = "nothing") -> list[np.ndarray]:
    """COPIES stain-jittered versions (``stain``) of every image, copy-major: copy k of image i is item
    ``k * len(images) + i``, drawn from ``default_rng([seed, k, i])`` — independent of the order and of the other
    copies. What the review checks (OOD statistics, appearance check) of a stain-tolerant model are fitted on beside
    the clean training images, so that a colour the model was trained to read is not flagged for its colour alone.
    ``keep="lightness"`` gives each copy its image's own L* (``keep_lightness``)."""
    StainCopies(copies, keep, options=("copies", "keep"))
    out = [np.ascontiguousarray(stain(img, np.random.default_rng([seed, k, i])))
           for k in range(copies) for i, img in enumerate(images)]
    if keep == "lightness":
        out = [keep_lightness(c, images[j % len(images)]) for j, c in enumerate(out)]
    return out


@dataclass(frozen=True)
class StainCopies:
    """How many stain copies of every training image the review checks are fitted on, and what each copy keeps of
    its image (``fit-ood`` / ``calibrate --stain-copies N --stain-keep K``). Checked when made, so a bad pair is
    refused before any work; false when off."""

    copies: int = 0
    keep: str = "nothing"
    options: tuple[str, str] = field(default=("--stain-copies", "--stain-keep"), compare=False, repr=False)

    def __post_init__(self) -> None:
        check_stain_copies(self.copies, self.options[0])
        if self.keep not in STAIN_KEEP:
            raise ArgumentError(f"{self.options[1]} must be one of {', '.join(STAIN_KEEP)}, got {self.keep!r}")
        if self.keep != "nothing" and not self.copies:
            raise ArgumentError(f"{self.options[1]} {self.keep} changes the stain copies: give "
                                f"{self.options[0]} N too (N ≥ 1)")

    def __bool__(self) -> bool:
        return self.copies > 0

    def make(self, images: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
        return stain_copies(images, self.copies, seed, self.keep)

    def about(self, n_images: int) -> str:
        """What the spec's ``fitted_on`` adds after the training images, e.g. `` + 2 stain copies of each (4118
        images)``; '' when off."""
        if not self:
            return ""
        kept = ", lightness kept" if self.keep == "lightness" else ""
        return f" + {self.copies} stain copies of each{kept} ({self.copies * n_images} images)"
