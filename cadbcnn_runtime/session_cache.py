"""A cache of ONNX Runtime's optimised graphs: the second start of a model skips graph optimisation.

Building a CPU session for the released FP32 file spends most of its time in ONNX Runtime's graph optimiser
(widening the FP16-stored weights, folding constants, converting convolutions to the CPU's blocked layout):
about 0.6 s of a 1.1 s cold start on a 2-core machine. ONNX Runtime can save the optimised graph
(``SessionOptions.optimized_model_filepath``); loading that file takes about 0.05 s. This module keeps those
files, one per (verified model content, onnxruntime version, CPU), so only the first start on a machine pays.

* Where: ``$CADBCNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/cadbcnn/ort``, else ``~/.cache/cadbcnn/ort``
  (created with mode 0700). ``CADBCNN_SESSION_CACHE=0`` turns it off. Each entry is ≈ 134 MB for the released
  FP32 model (weights stored as FP32), ≈ 37 MB for INT8. It keeps the ``MAX_ENTRIES`` most recently written
  graphs (older ones are deleted when a new one is written); delete the folder to reclaim the space.
* Key: the model's **verified** content hash (``ModelSpec.content_sha256``, checked against the bytes before
  this module is called), the onnxruntime version and the CPU's name and flags — the optimised graph uses the
  blocked layout of this CPU's instruction set and is only valid on the same kind of machine.
* Only CPU-only sessions are cached (the saved graph holds CPU-specific kernels).
* An entry is used only when its size and modification time match what was recorded when it was written; a
  missing, changed, truncated or unloadable entry is rebuilt from the verified bytes, never trusted. Writes go
  to a temporary file renamed into place, so concurrent processes (Ray workers) never read a half-written file.
* The cache only changes how fast a session is built, never what it computes: the optimised graph is the one
  ONNX Runtime would build in memory (the tests compare outputs with and without it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

ENV_DIR, ENV_SWITCH = "CADBCNN_CACHE_DIR", "CADBCNN_SESSION_CACHE"
OFF_VALUES = {"0", "off", "false", "no"}
MAX_ENTRIES = 8


@dataclass(frozen=True)
class CacheResult:
    session: object
    status: str  # "hit", "miss" (built and stored), "off (<why>)"


def cache_dir() -> Path | None:
    """The cache folder, or None when ``CADBCNN_SESSION_CACHE`` turns the cache off."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in OFF_VALUES:
        return None
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cadbcnn" / "ort"


def cache_key(content_sha256: str) -> str:
    import onnxruntime as ort

    from .machine import cpu_info

    cpu = cpu_info()
    facts = {"content": content_sha256, "onnxruntime": ort.__version__, "cpu": cpu.name,
             "flags": sorted(cpu.flags), "level": "ORT_ENABLE_ALL"}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached_cpu_session(data: bytes, content_sha256: str, build, options) -> CacheResult:
    """A CPU session for the verified model ``data``, through the cache.

    ``build(source, sess_options)`` makes the session (``source``: bytes or a path); ``options()`` returns fresh
    ``SessionOptions`` with cadbcnn's settings. Errors of the cache itself (unwritable folder, full disk) turn it
    off for this call; errors of the model propagate as they would without a cache.
    """
    folder = cache_dir()
    if folder is None:
        return CacheResult(build(data, options()), f"off ({ENV_SWITCH}=0)")
    key = cache_key(content_sha256)
    entry, sidecar = folder / f"{key}.onnx", folder / f"{key}.json"
    try:
        recorded = json.loads(sidecar.read_text())
        if recorded.get("stamp") == _stamp(entry) and recorded.get("content_sha256") == content_sha256:
            try:
                return CacheResult(build(str(entry), options()), "hit")
            except Exception:  # a damaged entry: rebuild it below from the verified bytes
                pass
    except (OSError, ValueError):
        pass
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(folder, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        return CacheResult(build(data, options()), f"off (cannot use {folder}: {exc.strerror or exc})")
    tmp = folder / f"{key}.{os.getpid()}.tmp.onnx"
    so = options()
    so.optimized_model_filepath = str(tmp)
    session = build(data, so)
    try:
        os.replace(tmp, entry)
        meta = {"content_sha256": content_sha256, "stamp": _stamp(entry)}
        tmp_meta = folder / f"{key}.{os.getpid()}.tmp.json"
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, sidecar)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        return CacheResult(session, f"off (cannot write {folder}: {exc.strerror or exc})")
    _prune(folder)
    return CacheResult(session, "miss")


def _prune(folder: Path) -> None:
    """Delete all but the ``MAX_ENTRIES`` most recently written entries (best effort: processes may race)."""
    records = []
    for rec in folder.glob("*.json"):
        if ".tmp." in rec.name:
            continue
        try:
            records.append((rec.stat().st_mtime_ns, rec))
        except OSError:
            pass
    for _, rec in sorted(records, reverse=True)[MAX_ENTRIES:]:
        for f in (rec, rec.with_suffix(".onnx")):
            f.unlink(missing_ok=True)
