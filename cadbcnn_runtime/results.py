"""The results file of a folder run: locked, never clobbering, crash-safe, resumable.

* **One writer per output.** An exclusive ``flock`` on ``OUT.lock`` is taken before anything is read or
  written; a second run on the same ``--out`` is refused at once (``OutputError``, exit 2).
* **Never overwrites a file cadbcnn did not write** (recognised by its columns) unless ``force``.
* **Crash-safe.** Rows go to ``OUT.partial``, flushed and fsynced per batch, renamed to ``OUT`` at the end.
  On ``--resume`` the rows kept from before are written to a fresh temporary file that atomically replaces
  ``OUT.partial``: a kill at any moment leaves either the old or the new partial file, never neither.
* **Resume reads the newest consistent state**: of ``OUT`` and ``OUT.partial`` the one modified last; only
  complete ``ok`` rows that match this model's columns and classes are kept (errored files are retried).
* **Encoding policy.** Files are UTF-8; a file name that is not valid UTF-8 is written as the raw bytes the
  filesystem holds (Python's ``surrogateescape``), so the ``path`` column reproduces the name exactly (read it
  back with ``errors="surrogateescape"``; ``os.fsencode`` gives the original bytes). Writing cannot fail.
* **Spreadsheet safety (CSV only).** A text cell (path, label, error) that starts with ``= + - @``, a tab, a
  carriage return or ``'`` is written with one extra leading ``'`` so that a spreadsheet shows it as text and
  never runs it as a formula; strip one leading ``'`` to get the value back (``unescape_cell``). JSON and
  JSON-lines are never altered.
* **Parquet** (``OUT.parquet``; needs ``pyarrow``, e.g. ``pip install 'cadbcnn[distributed]'``): rows stream to
  ``OUT.parquet.partial`` as JSON lines and are converted at the end into one typed Parquet file (strings,
  float64 probabilities, booleans; empty cells of error rows are nulls). Parquet strings are UTF-8, so a file
  name that is not valid UTF-8 is stored with ``\\xNN`` escapes there (``row_key``); resume matches on that key.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from .errors import OutputError

ENCODING, ERRORS = "utf-8", "surrogateescape"
KINDS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
BOOL_COLUMNS = ("needs_review", "out_of_distribution", "low_content", "atypical_appearance", "low_review_score")
PYARROW_HINT = "pip install 'cadbcnn[distributed]' (or pip install pyarrow)"
TEXT_COLUMNS = ("path", "label", "error")
_DANGEROUS = ("=", "+", "-", "@", "\t", "\r", "'")
_SIGNATURE = ("path", "label", "confidence", "needs_review")


def escape_cell(value: str) -> str:
    return "'" + value if value.startswith(_DANGEROUS) else value


def unescape_cell(value: str) -> str:
    return value[1:] if value.startswith("'") and value[1:].startswith(_DANGEROUS) else value


def printable(text: str) -> str:
    """TEXT with undecodable file-name bytes (surrogate escapes) as ``\\xNN``: safe for any terminal encoding,
    for Parquet's UTF-8 strings, and the row key of resume."""
    return text.encode(ENCODING, ERRORS).decode(ENCODING, "backslashreplace")


row_key = printable  # a row's identity for resume: its path as Parquet stores it


def _pyarrow(what: str):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise OutputError(f"{what}: Parquet needs pyarrow, which is not installed; {PYARROW_HINT}, or choose a "
                          ".csv/.jsonl/.json --out") from None
    return pyarrow


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def output_kind(out: Path) -> str:
    kind = KINDS.get(out.suffix.lower())
    if kind is None:
        raise OutputError(f"{out}: unknown output type; use .csv, .jsonl or .json (or '-' for a table)")
    return kind


def check_output_path(out: Path) -> None:
    """Refuse, before any work, an output that is a directory, has no parent folder or an unknown type."""
    if output_kind(out) == "parquet":
        _pyarrow(str(out))
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; pass a file name such as {out / 'results.csv'}")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: the folder {out.parent} does not exist; create it or choose another --out")
    for p in (out, partial_path(out)):
        if p.exists() and not p.is_file():
            raise OutputError(f"{p}: exists and is not a regular file; choose another --out")


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``OUT.lock``, removed on release."""

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot create the output's lock file ({exc.strerror}); make the "
                                  "folder writable or choose another --out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise OutputError(f"{self.path.with_suffix('')}: another cadbcnn-infer run (pid {holder}) is writing "
                                  "this output; wait for it to finish or choose another --out") from None
            try:  # the file we locked must still be the one at the path (a finishing run may have removed it)
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _head(path: Path, n: int = 65536) -> str:
    with open(path, "rb") as f:
        return f.read(n).decode(ENCODING, ERRORS)


def written_by_cadbcnn(path: Path) -> bool:
    """Whether PATH looks like a results file cadbcnn-infer wrote (by its columns); empty files count as ours."""
    try:
        if path.stat().st_size == 0:
            return True
        text = _head(path)
    except OSError:
        return False
    kind = KINDS.get(path.suffix.lower()) or KINDS.get(Path(path.stem).suffix.lower())  # OUT.csv.partial
    if kind == "parquet" and path.suffix.lower() == ".parquet":
        try:
            names = _pyarrow(str(path)).parquet.read_schema(path).names
        except OutputError:
            raise
        except Exception:  # noqa: BLE001 — not a Parquet file at all
            return False
        return tuple(names[:4]) == _SIGNATURE and names[-2:] == ["status", "error"]
    if kind == "csv":
        header = next(csv.reader(io.StringIO(text, newline="")), [])
        return tuple(header[:4]) == _SIGNATURE and header[-2:] == ["status", "error"]
    compact = "".join(text[:4096].split())
    return compact in ("[]", "") or (compact.startswith(('[{"path":', '{"path":')) and '"status":' in compact)


def check_not_foreign(out: Path, *, force: bool) -> None:
    for p in (out, partial_path(out)):
        if p.is_file() and not force and not written_by_cadbcnn(p):
            raise OutputError(f"{p}: exists and was not written by cadbcnn-infer; refusing to overwrite it. Choose "
                              "another --out, or pass --force to replace it")


def _rows_of(path: Path, kind: str) -> tuple[list[str] | None, list[dict]]:
    if kind == "parquet" and path.suffix.lower() == ".parquet":
        try:
            table = _pyarrow(str(path)).parquet.read_table(path)
        except OutputError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise OutputError(f"{path}: cannot be read as Parquet ({exc}); start without --resume or choose another "
                              "--out") from None
        return table.schema.names, table.to_pylist()
    with open(path, encoding=ENCODING, errors=ERRORS, newline="") as f:
        text = f.read()
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [{k: unescape_cell(v) if k in TEXT_COLUMNS and isinstance(v, str) else v for k, v in r.items()}
                for r in reader]
        return reader.fieldnames, rows
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
            rows = [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []
        except json.JSONDecodeError:
            rows = []
    else:
        rows = []
        for line in text.splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption
            if isinstance(r, dict):
                rows.append(r)
    ok = next((r for r in rows if r.get("status") == "ok"), None)
    return (list(ok) if ok else None), rows


def _complete_ok(row: dict, cols: list[str], class_names) -> bool:
    if row.get("status") != "ok" or not isinstance(row.get("path"), str) or not row["path"]:
        return False
    if any(row.get(c) is None for c in cols) or row.get("label") not in class_names:
        return False
    try:
        return all(0.0 <= float(row[f"p_{c}"]) <= 1.0 for c in class_names)
    except (TypeError, ValueError):
        return False


def read_previous(out: Path, cols: list[str], class_names) -> list[dict]:
    """``ok`` rows of the newest consistent earlier state (OUT or OUT.partial, the one modified last)."""
    kind = output_kind(out)
    candidates = [p for p in (out, partial_path(out)) if p.is_file()]
    candidates.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for p in candidates:
        header, rows = _rows_of(p, kind)
        if header is None:
            continue
        if set(header) != set(cols):
            raise OutputError(f"{p}: was written by a model with other outputs/classes ({len(header)} columns, this "
                              f"model has {len(cols)}); start without --resume or choose another --out")
        kept = {}
        for r in rows:
            if _complete_ok(r, cols, class_names):
                kept[row_key(r["path"])] = r  # last one wins
        return list(kept.values())
    return []


class ResultsWriter:
    """CSV / JSONL / JSON / Parquet writer: rows go to ``OUT.partial`` (flushed per batch); ``close`` renames it
    to OUT (CSV, JSONL) or converts it (JSON, Parquet)."""

    def __init__(self, out: Path, cols: list[str], previous: list[dict]):
        self.out, self.cols = Path(out), cols
        self.kind = output_kind(self.out)
        self.partial = partial_path(self.out)
        self.rows: list[dict] = []
        tmp = self.partial.with_name(f".{self.partial.name}.{os.getpid()}.tmp")
        self.f = open(tmp, "w", encoding=ENCODING, errors=ERRORS, newline="")
        try:
            if self.kind == "csv":
                self.csv = csv.DictWriter(self.f, fieldnames=cols, extrasaction="ignore")
                self.csv.writeheader()
            self.write(previous)
            self.flush()
            os.replace(tmp, self.partial)  # atomic: the old partial stays intact until the new one is complete
        except BaseException:
            self.f.close()
            tmp.unlink(missing_ok=True)
            raise

    def write(self, rows: list[dict]) -> None:
        for r in rows:
            if self.kind == "csv":
                self.csv.writerow({k: escape_cell(v) if k in TEXT_COLUMNS and isinstance(v, str) else v
                                   for k, v in r.items()})
            else:
                r = {k: r.get(k, "") for k in self.cols}
                self.f.write(json.dumps(r, ensure_ascii=False) + "\n")  # JSON-lines while running
                if self.kind == "json":
                    self.rows.append(r)

    def flush(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self, *, finished: bool) -> Path:
        self.flush()
        self.f.close()
        if not finished:
            return self.partial
        if self.kind == "parquet":
            tmp = self.partial.with_name(f".{self.partial.name}.{os.getpid()}.parquet.tmp")
            try:
                _write_parquet(self.partial, tmp, self.cols)
                os.replace(tmp, self.out)
            finally:
                tmp.unlink(missing_ok=True)
            self.partial.unlink(missing_ok=True)
            return self.out
        if self.kind == "json":
            tmp = self.partial.with_name(f".{self.partial.name}.{os.getpid()}.json.tmp")
            with open(tmp, "w", encoding=ENCODING, errors=ERRORS) as f:
                f.write(json.dumps(self.rows, ensure_ascii=False, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.out)
            self.partial.unlink(missing_ok=True)
            return self.out
        self.partial.replace(self.out)
        return self.out


def parquet_schema(cols: list[str]):
    pa = _pyarrow("parquet")
    return pa.schema([(c, pa.string() if c in TEXT_COLUMNS or c == "status" else
                       pa.bool_() if c in BOOL_COLUMNS else pa.float64()) for c in cols])


def _write_parquet(jsonl: Path, out: Path, cols: list[str], rows_per_group: int = 65536) -> None:
    """Convert the JSON-lines partial file to one typed Parquet file, a row group at a time (bounded memory)."""
    pa = _pyarrow(str(out))
    schema = parquet_schema(cols)
    text_cols = {c for c in cols if c in TEXT_COLUMNS or c == "status"}

    def cell(c, v):
        if v == "" and c not in text_cols or v is None:
            return None
        return row_key(v) if c in text_cols else v

    with pa.parquet.ParquetWriter(out, schema) as writer, open(jsonl, encoding=ENCODING, errors=ERRORS) as f:
        group: list[dict] = []
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # cannot happen for a finished run; a cut line is never a whole row
            group.append({c: cell(c, r.get(c, "")) for c in cols})
            if len(group) == rows_per_group:
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
                group = []
        if group:
            writer.write_table(pa.Table.from_pylist(group, schema=schema))
    with open(out, "rb") as f:
        os.fsync(f.fileno())
