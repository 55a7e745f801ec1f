"""Read ``metadata_props`` from an ONNX file without onnx, torch or a session.

An ONNX file is a protobuf ``ModelProto``; ``metadata_props`` is field 14, a
repeated ``StringStringEntryProto {key = 1; value = 2}``. We walk the top-level
fields with the protobuf wire format and skip everything else (the graph is
one length-delimited field, skipped in O(1)).
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError

_METADATA_PROPS = 14


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


def _fields(buf: memoryview):
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            yield number, wire, buf[pos:pos + length]
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def parse_metadata_props(data: bytes) -> dict[str, str]:
    props: dict[str, str] = {}
    for number, wire, value in _fields(memoryview(data)):
        if number == _METADATA_PROPS and wire == 2:
            key = val = ""
            for n, w, v in _fields(value):
                if w == 2 and n == 1:
                    key = bytes(v).decode("utf-8")
                elif w == 2 and n == 2:
                    val = bytes(v).decode("utf-8")
            props[key] = val
    return props


def read_metadata_props(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: model file not found. Check the path or pass --model.") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the model file ({exc.strerror}).") from None
    try:
        return parse_metadata_props(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX file ({exc}). Re-export it with cadbcnn-export.") from None
