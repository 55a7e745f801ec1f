"""Appearance check: an image whose colour and contrast are unlike the training images *of the class it was given*
is routed to review, whatever the model's confidence.

Why: the released model's silent errors under a new site's stain, camera or exposure are confident (an Early Pre-B
under a −20° hue shift called Benign at 0.999), so no confidence threshold separates them from the lab's own images
without reviewing most of those too; the OOD score reads the trunks' features, which such shifts move little. The
image statistics do move: each shift pushes them away from where the lab's images of the predicted class sit.

Features (``FEATURES``, 15 numbers): for each channel of CIELAB (OpenCV's 8-bit coding: L*·255/100, a* + 128,
b* + 128) of the image at the model's input size, smoothed by a Gaussian of ``smooth_sigma`` pixels — mean,
standard deviation, 5th, 50th and 95th percentile (the smallest level whose cumulative share reaches the fraction).
The smoothing (``SMOOTH_SIGMA``, recorded in the entry; entries without it were fitted unsmoothed) keeps pixel noise
and mild blur — which the model reads well — from widening the spread and percentiles: the check is after colour,
stain and exposure. Per class, the training images of that class give a
mean vector and a covariance (plus ``RIDGE`` × identity: features are 8-bit levels, and a percentile that is constant
within a class must not make the distance infinite). An image's score is its Mahalanobis distance to the class it
was *predicted* as, divided by that class's cut — the ``quantile`` (default 0.98, the released file's) of the
training images' own distances — so a score above 1 is ``atypical_appearance`` and needs review. Fitted on the training split only
(never on external images); the entry travels in the spec (``appearance``) and the runtime applies it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from .errors import ArgumentError

FEATURES = ("CIELAB (OpenCV 8-bit) L, a, b of the image at the model input size, Gaussian-smoothed by "
            "smooth_sigma pixels: mean, std, 5th/50th/95th percentile each")
N_FEATURES = 15
PERCENTILES = (0.05, 0.50, 0.95)
RIDGE = 1.0           # added to the covariance's diagonal, in (8-bit level)^2
DEFAULT_QUANTILE = 0.98  # the released file's, chosen on the validation split (docs/SHIFT.md)
SMOOTH_SIGMA = 1.5       # pixels at input size, the released file's, chosen on the validation split (docs/SHIFT.md)
MAX_SMOOTH_SIGMA = 16.0
MIN_PER_CLASS = 2 * N_FEATURES  # the fewest images of a class a fit accepts (a 15×15 covariance)


def _hwc_uint8(image_chw: np.ndarray) -> np.ndarray:
    x = np.asarray(image_chw)
    if x.dtype != np.uint8:  # float32 input models: [0, 1]
        x = np.clip(np.rint(x.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(1, 2, 0))


def appearance_features(batch: np.ndarray, smooth_sigma: float = SMOOTH_SIGMA) -> np.ndarray:
    """(N, 15) features of a preprocessed (N, 3, H, W) RGB batch (uint8, or float32 in [0, 1]), after a Gaussian
    of ``smooth_sigma`` pixels (0: none)."""
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected a (N, 3, H, W) batch, got shape {batch.shape}")
    out = np.empty((len(batch), N_FEATURES), np.float64)
    for i, im in enumerate(batch):
        rgb = _hwc_uint8(im)
        if smooth_sigma > 0:
            rgb = cv2.GaussianBlur(rgb, (0, 0), float(smooth_sigma))
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3)
        n = lab.shape[0]
        for c in range(3):
            ch = lab[:, c]
            counts = np.bincount(ch, minlength=256).astype(np.float64)
            levels = np.arange(256, dtype=np.float64)
            mean = float((counts * levels).sum() / n)
            var = float((counts * (levels - mean) ** 2).sum() / n)
            cdf = np.cumsum(counts) / n
            pct = [float(np.searchsorted(cdf, q - 1e-12, side="left")) for q in PERCENTILES]
            out[i, 5 * c:5 * c + 5] = [mean, np.sqrt(var), *pct]
    return out


def check_quantile(quantile: float, what: str = "the appearance quantile") -> None:
    """Refuse a quantile the check cannot use (ArgumentError, a ValueError), before any work."""
    if not 0.5 <= quantile < 1.0:
        raise ArgumentError(f"{what} must be a quantile in [0.5, 1), e.g. {DEFAULT_QUANTILE}; got {quantile}")


def atypical(scores: np.ndarray) -> np.ndarray:
    """The check's rule on ``AppearanceCheck.scores``: above 1 (or not a number) is atypical and needs review."""
    return ~(np.asarray(scores, np.float64) <= 1.0)


def _distances(features: np.ndarray, mean: np.ndarray, inv_cov: np.ndarray) -> np.ndarray:
    d = np.asarray(features, np.float64) - mean
    # elementwise einsum (no BLAS call: see quality.content_scores on OpenBLAS threads slowing the next ORT run)
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, inv_cov, d), 0.0))


def fit_appearance(features: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *, fitted_on: str,
                   quantile: float = DEFAULT_QUANTILE, smooth_sigma: float = SMOOTH_SIGMA) -> dict[str, Any]:
    """The spec's ``appearance`` entry from the features of training images (``appearance_features`` at
    ``smooth_sigma``, recorded in the entry) and their true classes."""
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels, np.int64)
    check_quantile(quantile)
    if features.ndim != 2 or features.shape[1] != N_FEATURES or len(features) != len(labels):
        raise ValueError(f"expected ({len(labels)}, {N_FEATURES}) features, got {features.shape}")
    classes = {}
    for k, name in enumerate(class_names):
        x = features[labels == k]
        if len(x) < MIN_PER_CLASS:
            raise ValueError(f"class {name!r} has {len(x)} training images; the appearance check needs at least "
                             f"{MIN_PER_CLASS} per class")
        mean = x.mean(0)
        inv = np.linalg.inv(np.cov(x, rowvar=False) + RIDGE * np.eye(N_FEATURES))
        inv = (inv + inv.T) / 2
        cut = float(np.quantile(_distances(x, mean, inv), quantile))
        classes[name] = {"n": int(len(x)), "mean": mean.tolist(), "inv_cov": inv.tolist(), "cut": cut}
    return {"measure": FEATURES, "smooth_sigma": float(smooth_sigma), "method": "mahalanobis to the predicted class",
            "ridge": RIDGE,
            "quantile": float(quantile), "fitted_on": fitted_on, "classes": classes,
            "rule": (f"needs review when the image's distance to the training images of its predicted class exceeds "
                     f"the {100 * quantile:g}th percentile of those images' own distances (score > 1)")}


def refit_appearance(entry: Mapping[str, Any], fit_features: np.ndarray, fit_labels: np.ndarray,
                     held_features: np.ndarray, held_predicted: np.ndarray, class_names: Sequence[str], *,
                     fitted_on: str) -> dict[str, Any]:
    """ENTRY refitted on a new site's images, at ENTRY's quantile and smoothing (features computed with
    ``AppearanceCheck(entry).features``): each class's mean and covariance from the FIT images of that class, and
    every cut widened by one common factor so that at most a ``1 - quantile`` share of the HELD-out images —
    scored against the class the model predicts for them, as the runtime does — is atypical. A few dozen images per
    class make the fit images' own distances optimistic; the held-out ones are not. The cuts are never narrowed
    (factor ≥ 1)."""
    quantile = float(entry.get("quantile", DEFAULT_QUANTILE))
    sigma = float(entry.get("smooth_sigma", 0.0))
    new = fit_appearance(fit_features, fit_labels, class_names, fitted_on=fitted_on, quantile=quantile,
                         smooth_sigma=sigma)
    held = AppearanceCheck(new, class_names).scores(held_features, held_predicted)
    if not len(held):
        raise ValueError("no held-out images to set the cuts on")
    factor = max(1.0, float(np.quantile(held[np.isfinite(held)], quantile))) if np.isfinite(held).any() else 1.0
    for c in new["classes"].values():
        c["cut"] *= factor
    new["held_out"] = {"n": int(len(held)), "cut_factor": factor,
                       "flagged": float(atypical(held / factor).mean())}
    new["rule"] = (f"needs review when the image's distance to the fitted images of its predicted class exceeds the "
                   f"{100 * quantile:g}th percentile of those images' own distances, widened ×{factor:.3g} so that "
                   f"at most {100 * (1 - quantile):g} % of {len(held)} held-out images exceed it (score > 1)")
    return new


def check_entry(entry: Mapping[str, Any], class_names: Sequence[str]) -> list[str]:
    """What is wrong with a spec's ``appearance`` entry (empty when nothing is)."""
    classes = entry.get("classes") if isinstance(entry, Mapping) else None
    if not isinstance(classes, Mapping) or set(classes) != set(class_names):
        return ["appearance.classes must hold an entry for every class name"]
    problems = []
    sigma = entry.get("smooth_sigma", 0.0)
    if (not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not np.isfinite(sigma)
            or not 0 <= sigma <= MAX_SMOOTH_SIGMA):
        problems.append(f"appearance.smooth_sigma must be a number of pixels in [0, {MAX_SMOOTH_SIGMA:g}]")
    for name, c in classes.items():
        try:
            mean = np.asarray(c["mean"], np.float64)
            inv = np.asarray(c["inv_cov"], np.float64)
            cut = c["cut"]
            ok = (mean.shape == (N_FEATURES,) and inv.shape == (N_FEATURES, N_FEATURES)
                  and bool(np.isfinite(mean).all() and np.isfinite(inv).all())
                  and isinstance(cut, (int, float)) and not isinstance(cut, bool) and np.isfinite(cut) and cut > 0)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            problems.append(f"appearance.classes[{name!r}] must hold mean ({N_FEATURES}), inv_cov "
                            f"({N_FEATURES}×{N_FEATURES}) and a finite cut > 0")
    return problems


class AppearanceCheck:
    """A spec's ``appearance`` entry, ready to score: ``features(batch)`` (at the entry's smoothing; 0 for an
    entry without one, which was fitted unsmoothed), then ``scores(features, predicted)`` → distance / cut."""

    def __init__(self, entry: Mapping[str, Any], class_names: Sequence[str]):
        self.smooth_sigma = float(entry.get("smooth_sigma", 0.0))
        c = entry["classes"]
        self.means = [np.asarray(c[n]["mean"], np.float64) for n in class_names]
        self.inv_covs = [np.asarray(c[n]["inv_cov"], np.float64) for n in class_names]
        self.cuts = np.array([float(c[n]["cut"]) for n in class_names])

    def features(self, batch: np.ndarray) -> np.ndarray:
        return appearance_features(batch, self.smooth_sigma)

    def ratios(self, features: np.ndarray) -> np.ndarray:
        """(N, C): each image's distance to every class's training images over that class's cut (``scores`` is the
        predicted class's column; the learned review score reads them all)."""
        features = np.asarray(features, np.float64)
        return np.column_stack([_distances(features, m, v) / c for m, v, c in zip(self.means, self.inv_covs,
                                                                                     self.cuts)])

    def scores(self, features: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        features = np.asarray(features, np.float64)
        predicted = np.asarray(predicted, np.int64)
        out = np.empty(len(features), np.float64)
        for k in np.unique(predicted):
            m = predicted == k
            out[m] = _distances(features[m], self.means[k], self.inv_covs[k]) / self.cuts[k]
        return out
