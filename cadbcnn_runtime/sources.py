"""What `cadbcnn-infer SOURCE` classifies: a folder, a list file of paths/URIs, or a URI prefix.

* **A folder** — ``folder.discover`` (local files; the symlink and listing rules documented there).
* **A list file** (``.txt``/``.lst``/``.list``): one local path or URI per line; blank lines and lines starting
  with ``#`` are skipped, relative paths are relative to the list file's folder, a repeated entry is kept once.
  The row key (``path`` column) is the line as written.
* **A URI** (``s3://bucket/prefix``, ``gs://…``, ``file:///…``, anything ``pyarrow.fs`` opens — the filesystem
  layer Ray's own readers use): the image files under it (``--recursive`` for sub-folders). Needs ``pyarrow``
  (``pip install 'cadbcnn[distributed]'``); the row key is the path relative to the URI.

Remote bytes are read by ``read_item`` with the same size limit as local files; a failure is that item's error
row. Local paths are read by ``decode.read_file`` exactly as in a folder run.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from .decode import MAX_FILE_BYTES
from .errors import ArgumentError, ImageError
from .folder import Item, _is_image_name, discover
from .preprocess import IMAGE_SUFFIXES, ImageSource

LIST_SUFFIXES = (".txt", ".lst", ".list")
PYARROW_HINT = "pip install 'cadbcnn[distributed]' (or pip install pyarrow)"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(text: str) -> bool:
    return bool(_URI.match(text))


def _pyarrow_fs(what: str):
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise ArgumentError(f"{what}: reading URIs needs pyarrow, which is not installed; {PYARROW_HINT}") from None
    return pafs


def describe(source: str | os.PathLike) -> str:
    """'folder', 'list' or 'uri' — or ArgumentError naming the fix."""
    text = os.fspath(source)
    if isinstance(text, str) and is_uri(text):
        return "uri"
    p = Path(text)
    if p.is_dir():
        return "folder"
    if p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        return "list"
    if p.is_file():
        raise ArgumentError(f"{p}: is a file, not a folder or a list of images; pass a folder, a list file "
                            f"({', '.join(LIST_SUFFIXES)}: one path or URI per line) or a URI")
    raise ArgumentError(f"{p}: not a folder, a list file or a URI (nothing is there); pass a folder of images, a "
                        f"list file ({', '.join(LIST_SUFFIXES)}) or a URI")


def list_items(source: str | os.PathLike, *, recursive: bool = False) -> list[Item]:
    """The items of SOURCE, in a stable order; refused files are items with ``error`` set."""
    kind = describe(source)
    if kind == "folder":
        try:
            return discover(Path(source), recursive=recursive)
        except OSError as exc:
            raise ArgumentError(f"{source}: cannot list this folder ({exc.strerror}).") from None
    if kind == "list":
        return _list_file(Path(source))
    return _list_uri(os.fspath(source), recursive=recursive)


def _list_file(path: Path) -> list[Item]:
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise ArgumentError(f"{path}: cannot read this list ({exc.strerror}).") from None
    items, seen = [], set()
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#") or entry in seen:
            continue
        seen.add(entry)
        if is_uri(entry):
            items.append(Item(entry, entry, None if _is_image_name(entry) else _not_image(entry)))  # type: ignore[arg-type]
            continue
        p = Path(entry) if os.path.isabs(entry) else path.parent / entry
        items.append(Item(p, entry, None if _is_image_name(entry) else _not_image(entry)))
    if any(isinstance(i.path, str) for i in items):
        _pyarrow_fs(f"{path} (it lists URIs)")  # refused before any work, not as one error row per URI
    return items


def _not_image(name: str) -> str:
    return (f"{name}: not an image file name (expected {', '.join(sorted(IMAGE_SUFFIXES))}); remove it from the "
            "list or rename the file")


def _list_uri(uri: str, *, recursive: bool) -> list[Item]:
    pafs = _pyarrow_fs(uri)
    try:
        fs, base = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(base)
    except Exception as exc:  # noqa: BLE001 — pyarrow raises its own types for unknown schemes, credentials…
        raise ArgumentError(f"{uri}: cannot open this location ({str(exc).strip()[:300]}); check the URI and the "
                            "credentials of its storage") from None
    if info.type == pafs.FileType.File:
        return [Item(uri, os.path.basename(base.rstrip("/")))]  # type: ignore[arg-type]
    if info.type != pafs.FileType.Directory:
        raise ArgumentError(f"{uri}: no such folder or file")
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive))
    except Exception as exc:  # noqa: BLE001
        raise ArgumentError(f"{uri}: cannot list this location ({str(exc).strip()[:300]})") from None
    prefix = base.rstrip("/") + "/"
    root = uri.rstrip("/") + "/"
    items = []
    for i in infos:
        if i.type != pafs.FileType.File or not _is_image_name(i.path):
            continue
        rel = i.path[len(prefix):] if i.path.startswith(prefix) else i.path
        items.append(Item(root + rel, rel))  # type: ignore[arg-type]
    items.sort(key=lambda it: it.rel)
    return items


_FILESYSTEMS = threading.local()  # one pyarrow filesystem per (thread, scheme://authority): no client per file


def _open(uri: str):
    """(filesystem, path inside it) for URI, the filesystem cached per thread and storage root."""
    from urllib.parse import urlsplit

    pafs = _pyarrow_fs(uri)
    parts = urlsplit(uri)
    root = f"{parts.scheme}://{parts.netloc}"
    cache = _FILESYSTEMS.__dict__.setdefault("by_root", {})
    if root not in cache:
        cache[root] = pafs.FileSystem.from_uri(uri)
        return cache[root]
    fs, _ = cache[root]
    # pyarrow's object stores name a file "bucket/key"; hdfs-like ones by the path only
    path = parts.path if parts.scheme in ("hdfs", "viewfs") else parts.netloc + parts.path
    return fs, path


def read_uri(uri: str) -> bytes:
    """A remote file's bytes, bounded like local files; every failure an ``ImageError`` naming the URI."""
    try:
        fs, path = _open(uri)
        size = fs.get_file_info(path).size
        if size is not None and size > MAX_FILE_BYTES:
            raise ImageError(f"{uri}: file is {size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES // 2**20} MiB limit",
                             source=uri)
        with fs.open_input_stream(path) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except (ImageError, ArgumentError):
        raise
    except FileNotFoundError:
        raise ImageError(f"{uri}: file not found", source=uri) from None
    except Exception as exc:  # noqa: BLE001
        raise ImageError(f"{uri}: cannot read ({type(exc).__name__}: {str(exc).strip()[:200]})", source=uri) from None
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"{uri}: file grew past the {MAX_FILE_BYTES // 2**20} MiB limit while being read", source=uri)
    return data


def read_item(item: Item) -> ImageSource:
    """What ``Classifier.preprocess`` gets for an item: the local path itself, or a URI's bytes."""
    if isinstance(item.path, str) and is_uri(item.path):
        return read_uri(item.path)
    return item.path
