"""Folder inference: discover images, decode in a small thread pool overlapped with batched inference.

Nothing a folder holds can stop the run: every per-file failure of any kind (decoders, memory, encodings,
OS errors, symlink loops, FIFOs, folders that cannot be listed) becomes that file's error row. Only failures
of the run itself — the model, the output, the arguments — stop it. Results are streamed by
``cadbcnn_runtime.results.ResultsWriter``.
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .classifier import Classifier, Prediction
from .errors import ImageError
from .preprocess import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Item:
    path: Path   # path on disk
    rel: str     # path relative to the input folder, '/'-separated (the row key; may hold surrogate escapes)
    error: str | None = None  # set when the file is refused before decoding


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _symlink_problem(path: Path, root: str, folder: Path) -> str | None:
    """Why a symlink is not followed (loop, dangling, points outside FOLDER), or None when it is fine."""
    try:
        target = os.path.realpath(path, strict=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: symlink loop (the link points, directly or not, at itself); fix or remove it"
        return f"{path}: broken symlink ({exc.strerror}); fix or remove it"
    except RuntimeError:  # Python < 3.13 may raise this for loops
        return f"{path}: symlink loop (the link points, directly or not, at itself); fix or remove it"
    if not (target == root or target.startswith(root.rstrip(os.sep) + os.sep)):
        return f"{path}: symlink points outside {folder} ({target}); not followed"
    return None


def discover(folder: Path, *, recursive: bool = False) -> list[Item]:
    """Image files in FOLDER (case-insensitive suffixes), sorted; iterative (no depth limit).

    Symlinked files are followed only inside FOLDER; symlinked folders are never entered (no cycles). A
    sub-folder that cannot be listed becomes one error item instead of stopping the walk.
    """
    folder = Path(folder)
    root = os.path.realpath(folder)
    items: list[Item] = []
    stack: list[tuple[Path, str]] = [(folder, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if not prefix:
                raise  # the folder itself: a usage error for the caller
            items.append(Item(directory, prefix.rstrip("/"), f"{directory}: cannot list this folder "
                                                              f"({exc.strerror}); its images were not classified"))
            continue
        subdirs = []
        for e in entries:
            rel = prefix + e.name
            try:
                is_link = e.is_symlink()
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                is_link = is_dir = False
            if is_dir and recursive:
                subdirs.append((Path(e.path), rel + "/"))
                continue
            if is_dir or not _is_image_name(e.name):
                continue
            problem = _symlink_problem(Path(e.path), root, folder) if is_link else None
            items.append(Item(Path(e.path), rel, problem))
        stack.extend(reversed(subdirs))
    items.sort(key=lambda i: i.rel)
    return items


def columns(class_names, ood: bool = False, quality: bool = False, appearance: bool = False,
            review_score: bool = False) -> list[str]:
    extra = ((["ood_score", "out_of_distribution"] if ood else []) + (["low_content"] if quality else [])
             + (["appearance_score", "atypical_appearance"] if appearance else [])
             + (["review_score", "low_review_score"] if review_score else []))
    return ["path", "label", "confidence", "needs_review", *[f"p_{c}" for c in class_names], *extra, "status",
            "error"]


def ok_row(rel: str, p: Prediction) -> dict:
    row = {"path": rel, "label": p.label, "confidence": round(p.confidence, 6), "needs_review": p.needs_review}
    row.update({f"p_{k}": round(v, 6) for k, v in p.probabilities.items()})
    if p.ood_score is not None:
        row.update({"ood_score": round(p.ood_score, 6), "out_of_distribution": p.out_of_distribution})
    if p.content_score is not None:
        row["low_content"] = p.low_content
    if p.appearance_score is not None:
        row.update({"appearance_score": round(p.appearance_score, 6), "atypical_appearance": p.atypical_appearance})
    if p.review_score is not None:
        row.update({"review_score": round(p.review_score, 6), "low_review_score": p.low_review_score})
    row.update({"status": "ok", "error": ""})
    return row


def error_row(rel: str, message: str, class_names) -> dict:
    row = {"path": rel, "label": "", "confidence": "", "needs_review": "", "ood_score": "",
           "out_of_distribution": "", "low_content": "", "status": "error", "error": message}
    row.update({f"p_{c}": "" for c in class_names})
    return row


@dataclass
class Summary:
    total: int = 0
    ok: int = 0
    errors: int = 0
    skipped_resume: int = 0
    needs_review: int = 0
    out_of_distribution: int = 0
    low_content: int = 0
    atypical_appearance: int = 0
    low_review_score: int = 0
    per_class: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def add(self, row: dict) -> None:
        """Count one result row (``ok_row`` or ``error_row``)."""
        if row["status"] != "ok":
            self.errors += 1
            return
        self.ok += 1
        self.per_class[row["label"]] += 1
        self.needs_review += bool(row["needs_review"])
        self.out_of_distribution += row.get("out_of_distribution") is True
        self.low_content += row.get("low_content") is True
        self.atypical_appearance += row.get("atypical_appearance") is True
        self.low_review_score += row.get("low_review_score") is True


def deliver(rows: list[dict], *, summary: Summary, on_rows: Callable[[list[dict]], None],
            progress: Callable[[int], None] | None, done: int) -> int:
    """Count ROWS, hand them on, report progress; returns the new number of finished items (any engine)."""
    for row in rows:
        summary.add(row)
    on_rows(rows)
    done += len(rows)
    if progress:
        progress(done)
    return done


def _decode(clf: Classifier, item: Item, read: Callable[[Item], bytes] | None = None):
    """(item, input or None, error or None) — never raises for a file's sake."""
    if item.error:
        return item, None, item.error
    try:
        if read is None:
            return item, clf.preprocess(item.path), None
        return item, clf.preprocess(read(item), name=str(item.path)), None
    except ImageError as exc:
        return item, None, str(exc)
    except MemoryError:
        return item, None, f"{item.path}: out of memory while decoding; crop or downscale the image, or free memory"
    except Exception as exc:  # noqa: BLE001 — any library's failure on one file is that file's error row
        return item, None, f"{item.path}: cannot be read ({type(exc).__name__}: {str(exc).strip()[:200]})"


def classify_items(clf: Classifier, items: list[Item], *, batch: int = 16, workers: int = 2,
                   on_rows: Callable[[list[dict]], None], progress: Callable[[int], None] | None = None,
                   summary: Summary | None = None, read: Callable[[Item], bytes] | None = None) -> Summary:
    """Decode (thread pool, bounded read-ahead) → batch → infer → rows. Never stops on a bad file.

    ``read(item) -> bytes`` replaces the local file read (e.g. for object-storage URIs); a failure of it is
    that item's error row, like any decoding failure.

    On any exception of the run itself (Ctrl-C, a model error) queued decodes are cancelled and the pool is
    not waited for, so an interrupt stops the run at once; rows already handed to ``on_rows`` are kept.
    """
    s = summary or Summary()
    names = clf.spec.class_names
    t0 = time.perf_counter()
    done = 0
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cadbcnn-decode")
    try:
        pending: deque = deque()
        it: Iterator[Item] = iter(items)
        ahead = max(batch * 3, workers * 2)

        def fill() -> None:
            while len(pending) < ahead:
                nxt = next(it, None)
                if nxt is None:
                    return
                pending.append(pool.submit(_decode, clf, nxt, read))

        fill()
        while pending:
            group = []
            while pending and len(group) < batch:
                group.append(pending.popleft().result())
            fill()  # keep decoding while this batch runs
            good = [(item, x) for item, x, err in group if err is None]
            preds: list[Prediction] = clf.classify(np.stack([x for _, x in good])) if good else []
            by_item = {id(item): p for (item, _), p in zip(good, preds)}
            rows = [error_row(item.rel, err, names) if err is not None else ok_row(item.rel, by_item[id(item)])
                    for item, _, err in group]
            done = deliver(rows, summary=s, on_rows=on_rows, progress=progress, done=done)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        s.total += done
        s.seconds += time.perf_counter() - t0
    return s
