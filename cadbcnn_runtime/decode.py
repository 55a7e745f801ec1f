"""Read and decode one image file safely — nothing a file holds may abort, hang or exhaust a run.

The guarantees (each enforced here, each tested in tests/test_hardening.py):

* **Only regular files are opened.** ``open(O_RDONLY | O_NONBLOCK)`` then ``fstat``: a FIFO, socket,
  device or directory is refused without blocking; a symlink loop is an ``ImageError``.
* **Reads are bounded.** At most ``MAX_FILE_BYTES`` are read; a larger file is refused unread.
* **Only JPEG, PNG, BMP and TIFF are decoded**, recognised by their magic bytes (whatever the file
  name says). Other formats OpenCV could decode (PPM, WebP, JPEG 2000, OpenEXR, …) are refused, so
  the attack surface is four decoders.
* **The pixel limit is enforced by the decoder itself.** ``OPENCV_IO_MAX_IMAGE_PIXELS`` is set to
  ``MAX_IMAGE_PIXELS`` before OpenCV decodes anything in this process (OpenCV reads it once, at the
  first decode), so every decoder refuses an over-sized image from its own header, before allocating
  the pixels. A header pre-check refuses PNG/JPEG/BMP early and cheaply; a post-check guards a host
  application that decoded with OpenCV before importing us.
* **Any failure of any decoder** (``cv2.error``, ``MemoryError``, ``ValueError``, …) becomes an
  ``ImageError`` naming the file.

Peak memory for one file is bounded by the file bytes (≤ ``MAX_FILE_BYTES``, 256 MiB) plus the decoded
pixels (≤ ``MAX_IMAGE_PIXELS`` × 4 channels × 2 bytes = 512 MB for a 16-bit RGBA image, 192 MB for 8-bit
RGB) plus one 8-bit RGB copy (192 MB): under 1 GiB; measured under an address-space cap in the tests.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
import stat
import struct
import sys

#: Refuse images with more pixels than this (≈ 64 MP; a 224-px cell crop is 50 k).
MAX_IMAGE_PIXELS = 64_000_000
#: Refuse files larger than this before reading them.
MAX_FILE_BYTES = 256 * 1024 * 1024
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every file under FOLDER (recursively) with an image suffix, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

# OpenCV reads its limit once, when cv2 is imported: this must run first. A smaller limit set by the host
# application is kept. If the host imported cv2 before cadbcnn_runtime, the decoders keep whatever limit they
# had (OpenCV's default is 2^30 pixels) and the header pre-check below — which reads the size of all four
# accepted formats — is what refuses over-sized images; ``DECODER_LIMIT_ACTIVE`` says which case this is.
_env = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", "")
if not (_env.isdigit() and 0 < int(_env) <= MAX_IMAGE_PIXELS):
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(MAX_IMAGE_PIXELS)
DECODER_LIMIT_ACTIVE = "cv2" not in sys.modules

import cv2  # noqa: E402  (after the environment variable above)
import numpy as np  # noqa: E402

from .errors import ImageError  # noqa: E402

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
SUPPORTED = ", ".join(IMAGE_SUFFIXES)


def sniff_format(data: bytes) -> str | None:
    """'JPEG' | 'PNG' | 'BMP' | 'TIFF' from the magic bytes, else None."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, BMP or TIFF header without decoding (a cheap early refusal)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_size(data)
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first IFD (the page OpenCV decodes)."""
    e = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(e + "I", data[4:8])
        (count,) = struct.unpack(e + "H", data[ifd:ifd + 2])
        size = {}
        for i in range(min(count, 4096)):
            tag, typ, _n, raw = struct.unpack(e + "HHI4s", data[ifd + 2 + 12 * i:ifd + 14 + 12 * i])
            if tag in (256, 257):
                size[tag] = struct.unpack(e + ("H" if typ == 3 else "I"), raw[:2] if typ == 3 else raw)[0]
    except struct.error:
        return None
    return (size[256], size[257]) if len(size) == 2 else None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the markers as libjpeg does: bytes that are not a marker (including FF 00) are skipped."""
    pos = 2
    while pos + 9 < len(data):
        if data[pos] != 0xFF:
            pos += 1
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x00, 0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # stuffed byte / standalone markers
            pos += 2
            continue
        if marker == 0xD9:  # EOI before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
            return w, h
        pos += 2 + length
    return None


def _check_complete(data: bytes, kind: str, name: str) -> None:
    if kind == "JPEG" and b"\xff\xd9" not in data[-1024:]:
        raise ImageError(f"{name}: truncated JPEG (no end-of-image marker); re-export or re-copy the file",
                         source=name)
    if kind == "PNG" and b"IEND" not in data[-64:]:
        raise ImageError(f"{name}: truncated PNG (no IEND chunk); re-export or re-copy the file", source=name)


def _over_limit(name: str, w: int, h: int) -> ImageError:
    return ImageError(f"{name}: image is {w}×{h} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel limit; "
                      "crop or downscale it first", source=name)


def decode_to_array(data: bytes, *, name: str) -> np.ndarray:
    """Encoded bytes → the decoder's array (any channels/depth). Every failure is an ``ImageError``."""
    if len(data) == 0:
        raise ImageError(f"{name}: empty file (0 bytes)", source=name)
    kind = sniff_format(data)
    if kind is None:
        raise ImageError(f"{name}: not a decodable image (not JPEG, PNG, BMP or TIFF data — corrupt file or "
                         f"unsupported format; supported: {SUPPORTED})", source=name)
    size = header_size(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise _over_limit(name, *size)
    _check_complete(data, kind, name)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(exc) or "validateInputImageSize" in str(exc):
            raise ImageError(f"{name}: image is over the {MAX_IMAGE_PIXELS:,}-pixel limit (the {kind} decoder "
                             "refused its header); crop or downscale it first", source=name) from None
        raise ImageError(f"{name}: the {kind} decoder failed ({_first_line(exc)}); the file is corrupt — "
                         "re-export or re-copy it", source=name) from None
    except MemoryError:
        raise ImageError(f"{name}: out of memory while decoding this {kind} file; crop or downscale it, or free "
                         "memory", source=name) from None
    if img is None or img.size == 0:
        raise ImageError(f"{name}: not a decodable image (corrupt {kind} data; supported: {SUPPORTED})",
                         source=name)
    if img.shape[0] * img.shape[1] > MAX_IMAGE_PIXELS:
        raise _over_limit(name, img.shape[1], img.shape[0])
    return img


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def read_file(path: str | os.PathLike) -> bytes:
    """A regular file's bytes (bounded), with errors that name the file and the fix. Never blocks on a FIFO."""
    name = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _os_error(name, exc) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{name}: is a directory, not an image", source=name)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
            raise ImageError(f"{name}: is {kind}, not an image file; only regular files are read", source=name)
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(f"{name}: file is {st.st_size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES // 2**20} MiB "
                             "limit", source=name)
        chunks, total = [], 0
        while True:  # the size may change while we read: stop at the limit whatever fstat said
            chunk = os.read(fd, min(1 << 20, MAX_FILE_BYTES + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise ImageError(f"{name}: file grew past the {MAX_FILE_BYTES // 2**20} MiB limit while being read",
                                 source=name)
        return b"".join(chunks)
    except OSError as exc:
        raise _os_error(name, exc) from None
    finally:
        os.close(fd)


def _os_error(name: str, exc: OSError) -> ImageError:
    if exc.errno == errno.ENOENT:
        return ImageError(f"{name}: file not found", source=name)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ImageError(f"{name}: permission denied; make the file readable (chmod +r)", source=name)
    if exc.errno == errno.ELOOP:
        return ImageError(f"{name}: symlink loop (the link points, directly or not, at itself); fix or remove it",
                          source=name)
    if exc.errno == errno.EISDIR:
        return ImageError(f"{name}: is a directory, not an image", source=name)
    return ImageError(f"{name}: cannot read file ({exc.strerror or exc})", source=name)
