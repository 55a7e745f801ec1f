"""Image transforms of acquisition shifts (RGB uint8 HWC in, RGB uint8 HWC out; numpy + OpenCV).

One home for every colour, exposure, focus, compression, noise and magnification change: the training
augmentation (``augment.py``) draws their parameters at random, the shift and OOD reports (``shift_report.py``,
``ood_eval.py``) apply fixed ones to held-out images.
"""

from __future__ import annotations

import cv2
import numpy as np

# Ruifrok & Johnston stain vectors (haematoxylin, eosin, DAB), rows normalised.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def hsv_shift(img: np.ndarray, dh: float = 0, ds: float = 1.0, dv: float = 1.0) -> np.ndarray:
    """Hue + ``dh`` (OpenCV units of 2°), saturation × ``ds``, value × ``dv``."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + dh) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * ds, 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * dv, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def hue(img: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate the hue by ``degrees`` (OpenCV stores hue in 2° units)."""
    return hsv_shift(img, dh=degrees / 2)


def saturation(img: np.ndarray, factor: float) -> np.ndarray:
    return hsv_shift(img, ds=factor)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Re-encode as JPEG at ``quality`` (1–100)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def zoom(img: np.ndarray, f: float, *, fill: str = "tile", offset: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """Magnification × ``f`` at the same output size.

    ``f > 1``: a crop of 1/f of the field (placed by ``offset`` in [0, 1]², centred by default), upscaled.
    ``f < 1``: the field downscaled and the canvas filled by tiling (``fill="tile"``, like a wider field of the
    same smear) or by mirror padding (``fill="reflect"``).
    """
    h, w = img.shape[:2]
    if f >= 1:
        ch, cw = max(1, int(h / f)), max(1, int(w / f))
        y, x = int((h - ch) * offset[0]), int((w - cw) * offset[1])
        return cv2.resize(img[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_LINEAR)
    small = cv2.resize(img, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA)
    if fill == "tile":
        reps = (int(np.ceil(h / small.shape[0])), int(np.ceil(w / small.shape[1])), 1)
        return np.ascontiguousarray(np.tile(small, reps)[:h, :w])
    top, left = int((h - small.shape[0]) * offset[0]), int((w - small.shape[1]) * offset[1])
    return cv2.copyMakeBorder(small, top, h - small.shape[0] - top, left, w - small.shape[1] - left,
                              cv2.BORDER_REFLECT_101)


def rgb_to_hed(img: np.ndarray) -> np.ndarray:
    """Colour deconvolution: RGB uint8 → optical density −ln((I+1)/256) → stain concentrations (H, E, D)."""
    od = -np.log((img.astype(np.float64) + 1.0) / 256.0)
    return od @ HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Inverse of ``rgb_to_hed`` (rounded, clipped to uint8)."""
    rgb = 256.0 * np.exp(-(hed @ RGB_FROM_HED)) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def hed_jitter(img: np.ndarray, rng: np.random.Generator, *, scale: float = 0.3, shift: float = 0.15) -> np.ndarray:
    """Another lab's staining: H and E concentrations × U(1 ± scale) + U(± shift) (optical-density units).

    One draw per image from ``rng`` (deterministic per seed); the DAB channel is unchanged.
    """
    hed = rgb_to_hed(img)
    alpha = rng.uniform(1 - scale, 1 + scale, 2)
    beta = rng.uniform(-shift, shift, 2)
    hed[..., :2] = hed[..., :2] * alpha + beta
    return hed_to_rgb(hed)


def _lut(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    return cv2.LUT(img, np.clip(np.rint(table), 0, 255).astype(np.uint8))


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """Exposure: every channel × ``factor`` (clipped)."""
    return _lut(img, np.arange(256) * factor)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """Contrast about the image's mean grey level × ``factor``."""
    m = float(img.mean())
    return _lut(img, m + (np.arange(256) - m) * factor)


def gamma(img: np.ndarray, g: float) -> np.ndarray:
    """Tone curve 255 · (I / 255) ** g (g < 1 brightens mid-tones, g > 1 darkens them)."""
    return _lut(img, 255.0 * (np.arange(256) / 255.0) ** g)


def white_balance(img: np.ndarray, gains) -> np.ndarray:
    """Another camera's white balance: per-channel (R, G, B) gains."""
    out = img.astype(np.float32) * np.asarray(gains, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def sensor_noise(img: np.ndarray, rng: np.random.Generator, sigma: float = 10.0) -> np.ndarray:
    """Additive Gaussian noise of ``sigma`` grey levels per pixel and channel."""
    out = img.astype(np.float32) + rng.normal(0.0, sigma, img.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigma)


#: Where the ALL dataset's microscope software printed its scale bar (a white box with black or red text, bottom
#: right of every image), as fractions of (height, width). Its text colour differs between classes
#: (Pro-B: black in 733 of 733 images; Early Pre-B: red in 462 of 887) — a shortcut to remove.
SCALEBAR_BOX = (0.88, 1.0, 0.81, 1.0)


def scalebar_box(h: int, w: int) -> tuple[slice, slice]:
    """The scale-bar corner of an H×W image as (rows, columns) slices."""
    y0, y1, x0, x1 = (int(round(v)) for v in (SCALEBAR_BOX[0] * h, SCALEBAR_BOX[1] * h,
                                               SCALEBAR_BOX[2] * w, SCALEBAR_BOX[3] * w))
    return slice(y0, y1), slice(x0, x1)


def erase_scalebar(img: np.ndarray) -> np.ndarray:
    """Cover the scale-bar corner with the image's median colour."""
    out = img.copy()
    out[scalebar_box(*img.shape[:2])] = np.median(img.reshape(-1, 3), axis=0).astype(np.uint8)
    return out


def paste_scalebar(img: np.ndarray, donor: np.ndarray) -> np.ndarray:
    """IMG with DONOR's scale-bar corner (resized to IMG's box when the sizes differ)."""
    out = img.copy()
    box = scalebar_box(*img.shape[:2])
    patch = donor[scalebar_box(*donor.shape[:2])]
    h, w = out[box].shape[:2]
    if patch.shape[:2] != (h, w):
        patch = cv2.resize(patch, (w, h), interpolation=cv2.INTER_AREA)
    out[box] = patch
    return out
