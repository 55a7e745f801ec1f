"""Decode and preprocess images — the one function shared by training,
evaluation, export parity checks and the runtime (numpy + OpenCV only).

Pipeline: bytes/path/array → decode with OpenCV → RGB uint8 (grey, alpha,
16-bit and float handled) → resize to the spec's size with the spec's
interpolation → CHW uint8. Normalisation is inside the model graph.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from .errors import ImageError
from .spec import ModelSpec

#: Refuse images with more pixels than this (≈ 64 MP; a 224-px cell crop is 50 k).
MAX_IMAGE_PIXELS = 64_000_000
#: Refuse files larger than this before reading them.
MAX_FILE_BYTES = 256 * 1024 * 1024
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

_CV2_INTERP = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
}

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG or BMP header, without decoding."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    if data[:2] == b"\xff\xd8":
        pos = 2
        while pos + 9 < len(data):
            if data[pos] != 0xFF:
                pos += 1
                continue
            marker = data[pos + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                pos += 1 if marker == 0xFF else 2
                continue
            (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
                return w, h
            pos += 2 + length
    return None


def _check_complete(data: bytes, name: str) -> None:
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-1024:]:
        raise ImageError(f"{name}: truncated JPEG (no end-of-image marker); re-export or re-copy the file",
                         source=name)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-64:]:
        raise ImageError(f"{name}: truncated PNG (no IEND chunk); re-export or re-copy the file", source=name)


def to_rgb8(img: np.ndarray, *, bgr: bool, name: str = "<array>") -> np.ndarray:
    """Convert a decoded image (grey, BGR/RGB, BGRA/RGBA; uint8, uint16 or float) to RGB uint8 HWC."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        if not np.isfinite(img).all():
            raise ImageError(f"{name}: image holds NaN or infinite values", source=name)
        scale = 255.0 if img.max(initial=0.0) <= 1.0 else 1.0
        img = np.clip(img * scale + 0.5, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel type {img.dtype}; use 8- or 16-bit images", source=name)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ImageError(f"{name}: expected an H×W, H×W×3 or H×W×4 image, got shape {img.shape}", source=name)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(img)


def decode_bytes(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, BMP, TIFF, …) to RGB uint8 HWC."""
    if len(data) == 0:
        raise ImageError(f"{name}: empty file (0 bytes)", source=name)
    size = _header_size(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name}: image is {size[0]}×{size[1]} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel limit; "
            "crop or downscale it first", source=name)
    _check_complete(data, name)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageError(
            f"{name}: not a decodable image (corrupt file or unsupported format; "
            f"supported: {', '.join(IMAGE_SUFFIXES)})", source=name)
    if img.shape[0] * img.shape[1] > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: image is over the {MAX_IMAGE_PIXELS:,}-pixel limit; crop or downscale it first",
                         source=name)
    return to_rgb8(img, bgr=True, name=name)


def read_file(path: str | os.PathLike) -> bytes:
    """Read an image file's bytes with errors that name the file and the fix."""
    p = Path(path)
    name = str(p)
    try:
        st = p.stat()
        if p.is_dir():
            raise ImageError(f"{name}: is a directory, not an image", source=name)
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(f"{name}: file is {st.st_size / 2**20:.0f} MiB, over the "
                             f"{MAX_FILE_BYTES // 2**20} MiB limit", source=name)
        return p.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found", source=name) from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied; make the file readable (chmod +r)", source=name) from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot read file ({exc.strerror})", source=name) from None


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
