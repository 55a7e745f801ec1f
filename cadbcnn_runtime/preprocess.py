"""Decode and preprocess images — the one function shared by training,
evaluation, export parity checks and the runtime (numpy + OpenCV only).

Pipeline: bytes/path/array → decode with OpenCV → RGB uint8 (grey, alpha,
16-bit and float handled) → resize to the spec's size with the spec's
interpolation → CHW uint8. Normalisation is inside the model graph.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np

from .decode import IMAGE_SUFFIXES, MAX_FILE_BYTES, MAX_IMAGE_PIXELS, decode_to_array, read_file, sniff_format
from .decode import cv2  # OpenCV, imported after its pixel limit is set
from .errors import ImageError
from .spec import ModelSpec

__all__ = ["IMAGE_SUFFIXES", "MAX_FILE_BYTES", "MAX_IMAGE_PIXELS", "ImageSource", "decode_bytes",
           "load_and_preprocess", "preprocess", "read_file", "read_image", "resize", "sniff_format", "to_rgb8"]

_CV2_INTERP = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
}

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]


def to_rgb8(img: np.ndarray, *, bgr: bool, name: str = "<array>") -> np.ndarray:
    """Convert a decoded image (grey, BGR/RGB, BGRA/RGBA; uint8, uint16 or float) to RGB uint8 HWC.

    Every array that is not an image — empty, 1-D or 4-D, 2 or 5 channels, object/complex/bool dtype,
    NaN or infinite values, over the pixel limit — raises ``ImageError``.
    """
    if not isinstance(img, np.ndarray):
        raise ImageError(f"{name}: expected a numpy array, got {type(img).__name__}", source=name)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: expected an H×W, H×W×3 or H×W×4 image, got shape {img.shape}", source=name)
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ImageError(f"{name}: empty image (shape {img.shape}); pass at least 1×1 pixels", source=name)
    if img.shape[0] * img.shape[1] > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: image is {img.shape[1]}×{img.shape[0]} pixels, over the "
                         f"{MAX_IMAGE_PIXELS:,}-pixel limit; crop or downscale it first", source=name)
    if img.dtype == np.uint16:
        img = _high_bytes(img)
    elif img.dtype in (np.float16, np.float32, np.float64):
        if not np.isfinite(img).all():
            raise ImageError(f"{name}: image holds NaN or infinite values", source=name)
        img = img.astype(np.float32) if img.dtype == np.float16 else img
        scale = 255.0 if img.max(initial=0.0) <= 1.0 else 1.0
        img = np.clip(img * scale + 0.5, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel type {img.dtype}; use 8- or 16-bit or float images",
                         source=name)
    img = np.ascontiguousarray(img)
    try:
        if img.ndim == 2:
            return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        if img.shape[2] == 4:
            return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(img)
    except cv2.error as exc:
        raise ImageError(f"{name}: cannot convert this array to RGB ({str(exc).strip().splitlines()[-1][:200]})",
                         source=name) from None


def _high_bytes(img: np.ndarray) -> np.ndarray:
    """uint16 → uint8 as ``img >> 8``, without the intermediate 16-bit copy (peak memory)."""
    if img.dtype.byteorder in ("=", "<") and np.little_endian:
        img = np.ascontiguousarray(img)
        return np.ascontiguousarray(img.view(np.uint8)[..., 1::2])
    return (img >> 8).astype(np.uint8)


def decode_bytes(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, BMP or TIFF) to RGB uint8 HWC; any failure is an ``ImageError``."""
    return to_rgb8(decode_to_array(data, name=name), bgr=True, name=name)


def read_image(source: ImageSource, *, name: str | None = None) -> np.ndarray:
    """Any supported source → RGB uint8 HWC.

    A path or encoded bytes are decoded with OpenCV. A numpy array is taken as
    an already-decoded **RGB** (or RGBA / grey) frame, e.g. from a camera.
    """
    if isinstance(source, np.ndarray):
        return to_rgb8(source, bgr=False, name=name or "<array>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(source), name=name or "<bytes>")
    if isinstance(source, (str, os.PathLike)):
        return decode_bytes(read_file(source), name=name or str(source))
    raise ImageError(f"unsupported image source type {type(source).__name__}; pass a path, bytes or an "
                     "H×W×3 RGB uint8 array")


def resize(image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    h, w = spec.image_size
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=_CV2_INTERP[spec.interpolation])


def preprocess(image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """RGB uint8 HWC → the model's input for one image (CHW, spec dtype)."""
    chw = np.ascontiguousarray(resize(image, spec).transpose(2, 0, 1))
    if spec.input_dtype == "float32":
        return chw.astype(np.float32) / np.float32(255.0)
    return chw


def load_and_preprocess(source: ImageSource, spec: ModelSpec, *, name: str | None = None) -> np.ndarray:
    """Decode + preprocess in one call (what training, export parity and the runtime all use)."""
    return preprocess(read_image(source, name=name), spec)
