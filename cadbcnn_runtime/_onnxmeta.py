"""Read ``metadata_props`` from an ONNX file without onnx, torch or a session.

An ONNX file is a protobuf ``ModelProto``; ``metadata_props`` is field 14, a
repeated ``StringStringEntryProto {key = 1; value = 2}``. We walk the top-level
fields with the protobuf wire format and skip everything else (the graph is
one length-delimited field, skipped in O(1)).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from .errors import ModelLoadError

_METADATA_PROPS = 14
#: Refuse model files larger than this (ONNX protobufs cannot exceed 2 GiB anyway).
MAX_MODEL_BYTES = 2 * 1024**3


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _records(buf: memoryview):
    """Every top-level record: (field number, wire type, value, start, end) — value is the varint for wire
    type 0, the payload for 2, None otherwise; ``buf[start:end]`` is the record as stored."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire, value = key >> 3, key & 7, None
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield number, wire, value, start, pos


def _fields(buf: memoryview):
    for number, wire, value, _, _ in _records(buf):
        if wire in (0, 2):
            yield number, wire, value


def parse_metadata_props(data: bytes) -> dict[str, str]:
    """``metadata_props`` as str → str; a key or value that is not UTF-8 keeps its bytes undecoded
    (``bytes`` value) so that the spec parser can refuse it with a precise message."""
    props: dict[str, str] = {}
    for number, wire, value in _fields(memoryview(data)):
        if number == _METADATA_PROPS and wire == 2:
            key, val = b"", b""
            for n, w, v in _fields(value):
                if w == 2 and n == 1:
                    key = bytes(v)
                elif w == 2 and n == 2:
                    val = bytes(v)
            k = key.decode("utf-8", errors="replace")
            try:
                props[k] = val.decode("utf-8")
            except UnicodeDecodeError:
                props[k] = val  # type: ignore[assignment]
    return props


def content_digest(data: bytes, spec_json: str) -> str:
    """sha256 over every top-level ``ModelProto`` field except ``metadata_props`` (graph, weights, opsets, IR
    version, producer, doc string — as the bytes stored in the file), then the canonical spec JSON without its
    ``content_sha256``. The exporter stores it in the spec; the runtime recomputes it at load.
    """
    h = hashlib.sha256(b"cadbcnn-content-v1\0")
    buf = memoryview(data)
    for number, _, _, start, end in _records(buf):
        if number != _METADATA_PROPS:
            h.update(buf[start:end])
    h.update(b"\0")
    h.update(spec_json.encode("utf-8"))
    return h.hexdigest()


def read_model_bytes(path: str | Path, *, limit: int = MAX_MODEL_BYTES) -> bytes:
    """The model file's bytes (bounded); errors are ``ModelLoadError`` naming the file and the fix."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ModelLoadError(f"{path}: not a regular file. Pass an .onnx model file.")
            if size > limit:
                raise ModelLoadError(f"{path}: {size / 2**20:.0f} MiB is over the {limit // 2**20} MiB model limit "
                                     "(cadbcnn models are ≈ 35–135 MB). Is this the right file?")
            return f.read(limit + 1)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: model file not found. Check the path or pass --model.") from None
    except IsADirectoryError:
        raise ModelLoadError(f"{path}: is a directory. Pass an .onnx model file.") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the model file ({exc.strerror}).") from None


def read_metadata_props(path: str | Path) -> dict[str, str]:
    return metadata_of(read_model_bytes(path), path)


def metadata_of(data: bytes, path: str | Path) -> dict[str, str]:
    try:
        return parse_metadata_props(data)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX file ({exc}). Re-export it with cadbcnn-export.") from None


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (model files are tens of MB)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
