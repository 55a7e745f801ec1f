"""Folder inference: discover images, decode in a small thread pool overlapped
with batched inference, and stream rows to a results file that survives
interruption (``.partial`` flushed per batch, renamed at the end)."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .classifier import Classifier, Prediction
from .errors import CadbcnnError, ImageError
from .preprocess import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Item:
    path: Path   # absolute path on disk
    rel: str     # path relative to the input folder (the row key)
    error: str | None = None  # set when the file is refused before decoding


def discover(folder: Path, *, recursive: bool = False) -> list[Item]:
    """Image files in FOLDER (case-insensitive suffixes), sorted. Symlinks leaving FOLDER are refused."""
    folder = Path(folder)
    root = folder.resolve()
    items: list[Item] = []
    walker = os.walk(folder, followlinks=False) if recursive else [(str(folder), [], os.listdir(folder))]
    for dirpath, dirnames, filenames in walker:
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix.lower() not in IMAGE_SUFFIXES or (not recursive and p.is_dir()):
                continue
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                target = p.resolve()
                if not target.is_relative_to(root):
                    items.append(Item(p, rel, f"{p}: symlink points outside {folder} ({target}); not followed"))
                    continue
            items.append(Item(p, rel))
    return items


def columns(class_names, ood: bool = False) -> list[str]:
    extra = ["ood_score", "out_of_distribution"] if ood else []
    return ["path", "label", "confidence", "needs_review", *[f"p_{c}" for c in class_names], *extra, "status",
            "error"]


def ok_row(rel: str, p: Prediction) -> dict:
    row = {"path": rel, "label": p.label, "confidence": round(p.confidence, 6), "needs_review": p.needs_review}
    row.update({f"p_{k}": round(v, 6) for k, v in p.probabilities.items()})
    if p.ood_score is not None:
        row.update({"ood_score": round(p.ood_score, 6), "out_of_distribution": p.out_of_distribution})
    row.update({"status": "ok", "error": ""})
    return row


def error_row(rel: str, message: str, class_names) -> dict:
    row = {"path": rel, "label": "", "confidence": "", "needs_review": "", "ood_score": "",
           "out_of_distribution": "", "status": "error", "error": message}
    row.update({f"p_{c}": "" for c in class_names})
    return row


class ResultsWriter:
    """CSV / JSONL / JSON writer: rows go to ``OUT.partial`` (flushed per batch), renamed to OUT by ``close``."""

    def __init__(self, out: Path, cols: list[str], previous: list[dict]):
        self.out, self.cols = Path(out), cols
        self.kind = {".csv": "csv", ".jsonl": "jsonl", ".json": "json"}.get(self.out.suffix.lower())
        if self.kind is None:
            raise CadbcnnError(f"{out}: unknown output type; use .csv, .jsonl or .json (or '-' for a table)")
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.rows: list[dict] = []
        self.f = open(self.partial, "w", encoding="utf-8", newline="")
        if self.kind == "csv":
            self.csv = csv.DictWriter(self.f, fieldnames=cols, extrasaction="ignore")
            self.csv.writeheader()
        self.write(previous)
        self.flush()

    def write(self, rows: list[dict]) -> None:
        for r in rows:
            if self.kind == "csv":
                self.csv.writerow(r)
            elif self.kind == "jsonl":
                self.f.write(json.dumps(r, ensure_ascii=False) + "\n")
            else:
                self.f.write(json.dumps(r, ensure_ascii=False) + "\n")  # JSON-lines while running
                self.rows.append(r)

    def flush(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self, *, finished: bool) -> Path:
        self.flush()
        self.f.close()
        if not finished:
            return self.partial
        if self.kind == "json":
            self.partial.write_text(json.dumps(self.rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        self.partial.replace(self.out)
        return self.out


def read_previous(out: Path) -> list[dict]:
    """Rows of an earlier run (OUT, else OUT.partial) for --resume."""
    rows: list[dict] = []
    for p in (Path(out), Path(str(out) + ".partial")):
        if not p.is_file():
            continue
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() == ".csv" or p.name.endswith(".csv.partial"):
            rows = list(csv.DictReader(io.StringIO(text)))
        elif text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            for line in text.splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut short by an interruption
        break
    return [r for r in rows if r.get("status") == "ok"]


@dataclass
class Summary:
    total: int = 0
    ok: int = 0
    errors: int = 0
    skipped_resume: int = 0
    needs_review: int = 0
    out_of_distribution: int = 0
    per_class: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def _decode(clf: Classifier, item: Item):
    if item.error:
        return item, None, item.error
    try:
        return item, clf.preprocess(item.path), None
    except ImageError as exc:
        return item, None, str(exc)


def classify_items(clf: Classifier, items: list[Item], *, batch: int = 16, workers: int = 2,
                   on_rows: Callable[[list[dict]], None], progress: Callable[[int], None] | None = None,
                   summary: Summary | None = None) -> Summary:
    """Decode (thread pool, bounded read-ahead) → batch → infer → rows. Never stops on a bad file."""
    s = summary or Summary()
    names = clf.spec.class_names
    t0 = time.perf_counter()
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cadbcnn-decode") as pool:
        pending: deque = deque()
        it: Iterator[Item] = iter(items)
        ahead = max(batch * 3, workers * 2)

        def fill() -> None:
            while len(pending) < ahead:
                nxt = next(it, None)
                if nxt is None:
                    return
                pending.append(pool.submit(_decode, clf, nxt))

        fill()
        while pending:
            group = []
            while pending and len(group) < batch:
                group.append(pending.popleft().result())
            fill()  # keep decoding while this batch runs
            good = [(item, x) for item, x, err in group if err is None]
            preds: dict[str, Prediction] = {}
            if good:
                batch_preds = clf.classify(np.stack([x for _, x in good]))
                preds = {item.rel: p for (item, _), p in zip(good, batch_preds)}
            rows = []
            for item, _, err in group:
                if err is not None:
                    rows.append(error_row(item.rel, err, names))
                    s.errors += 1
                else:
                    p = preds[item.rel]
                    rows.append(ok_row(item.rel, p))
                    s.ok += 1
                    s.per_class[p.label] += 1
                    s.needs_review += p.needs_review
                    s.out_of_distribution += p.out_of_distribution
            on_rows(rows)
            done += len(group)
            if progress:
                progress(done)
    s.total += done
    s.seconds += time.perf_counter() - t0
    return s
