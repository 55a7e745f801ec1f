"""Acquisition hooks: classify frames as a microscope acquires them (Micro-Manager through pycro-manager).

    from pycromanager import Acquisition, multi_d_acquisition_events
    from cadbcnn_runtime.hooks import pycromanager_processor

    hook = pycromanager_processor(model="models/cadbcnn.onnx", results_path="run-42.cadbcnn.jsonl")
    with Acquisition(directory="data", name="run-42", image_process_fn=hook) as acq:
        acq.acquire(multi_d_acquisition_events(num_time_points=100))
    hook.close()                       # waits for the queued frames, then prints nothing; see hook.stats

pycro-manager calls ``image_process_fn(image, metadata)`` for every frame and saves what it returns. The hook
returns **the image unchanged (the very array) and the same metadata dict**, in one of two modes:

* ``mode="background"`` (default) — never blocks acquisition. The frame (a copy, so the camera may reuse its
  buffer) goes to a bounded queue and a worker thread classifies it. At return the metadata says
  ``cadbcnn_status = "queued"``; when the worker is done it writes ``cadbcnn_label``, ``cadbcnn_confidence``,
  ``cadbcnn_needs_review``, ``cadbcnn_ood`` (and ``cadbcnn_status = "classified"``) into that same dict,
  calls ``on_result(metadata, prediction)`` and appends one JSON line to ``results_path``. pycro-manager may
  already have saved the frame's metadata by then, so **the results file (or ``on_result``) is the record** in
  this mode; the frame's saved metadata carries only the status. When the queue is full the frame is not
  classified: ``cadbcnn_status = "dropped"``, ``cadbcnn_dropped_total`` and ``stats.dropped`` count it —
  frames are never dropped silently.
* ``mode="inline"`` — classifies inside the call (it blocks acquisition for one inference, ≈ 50–120 ms for the
  released model on 2 CPU cores) and writes the four fields into the metadata before returning, so they are
  saved with the frame. Use it when the frame interval is longer than an inference.

A frame that cannot be classified (wrong shape, NaNs, …) gets ``cadbcnn_status = "error: …"`` and is counted;
nothing raises into the acquisition. Frames may be grey (any integer dtype, 16-bit cameras included), RGB or
RGBA arrays; they are converted like any image the runtime reads (``preprocess.read_image``).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ArgumentError

FIELDS = ("cadbcnn_label", "cadbcnn_confidence", "cadbcnn_needs_review", "cadbcnn_ood")
# metadata keys copied into the results file to identify a frame (whatever the acquisition provides)
FRAME_KEYS = ("Axes", "ImageNumber", "ElapsedTime-ms", "TimeReceivedByCore", "Camera", "PositionName")
MODES = ("background", "inline")


@dataclass
class HookStats:
    received: int = 0
    classified: int = 0
    dropped: int = 0
    errors: int = 0
    max_queue: int = 0


class FrameProcessor:
    """A pycro-manager ``image_process_fn``; see the module docstring. Thread-safe; a context manager."""

    def __init__(self, classifier, *, mode: str = "background", queue_size: int = 16, batch: int = 4,
                 on_result: Callable[[dict, Any], None] | None = None, results_path: str | os.PathLike | None = None):
        if mode not in MODES:
            raise ArgumentError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        for name, v in (("queue_size", queue_size), ("batch", batch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ArgumentError(f"{name} must be an integer >= 1, got {v!r}")
        self.clf, self.mode, self.batch, self.on_result = classifier, mode, batch, on_result
        self.stats = HookStats()
        self._lock = threading.Lock()
        self._results = open(results_path, "a", encoding="utf-8") if results_path is not None else None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._worker = None
        if mode == "background":
            self._worker = threading.Thread(target=self._work, name="cadbcnn-hook", daemon=True)
            self._worker.start()

    # -- the hook ------------------------------------------------------------------------------------------
    def __call__(self, image: np.ndarray, metadata: dict) -> tuple[np.ndarray, dict]:
        with self._lock:
            self.stats.received += 1
        if self._closed:
            metadata["cadbcnn_status"] = "not classified: the cadbcnn hook was closed"
            return image, metadata
        if self.mode == "inline":
            self._classify([(np.array(image, copy=True), metadata)])
            return image, metadata
        try:
            self._queue.put_nowait((np.array(image, copy=True), metadata))
            metadata["cadbcnn_status"] = "queued"
            with self._lock:
                self.stats.max_queue = max(self.stats.max_queue, self._queue.qsize())
        except queue.Full:
            with self._lock:
                self.stats.dropped += 1
                metadata["cadbcnn_dropped_total"] = self.stats.dropped
            metadata["cadbcnn_status"] = "dropped"  # classification could not keep up: counted, never silent
        return image, metadata

    # -- the worker ----------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                return
            group = [first]
            while len(group) < self.batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:  # keep the sentinel for the outer loop
                    self._queue.task_done()
                    self._queue.put(None)
                    break
                group.append(nxt)
            try:
                self._classify(group)
            finally:
                for _ in group:
                    self._queue.task_done()

    def _classify(self, group: list[tuple[np.ndarray, dict]]) -> None:
        inputs, kept = [], []
        for frame, meta in group:
            try:
                inputs.append(self.clf.preprocess(frame, name="frame"))
                kept.append(meta)
            except Exception as exc:  # noqa: BLE001 — one bad frame never stops the acquisition
                self._failed(meta, exc)
        if not inputs:
            return
        try:
            preds = self.clf.classify(np.stack(inputs))
        except Exception as exc:  # noqa: BLE001
            for meta in kept:
                self._failed(meta, exc)
            return
        for meta, p in zip(kept, preds):
            meta.update({"cadbcnn_label": p.label, "cadbcnn_confidence": round(float(p.confidence), 6),
                         "cadbcnn_needs_review": bool(p.needs_review),
                         "cadbcnn_ood": bool(p.out_of_distribution), "cadbcnn_status": "classified"})
            with self._lock:
                self.stats.classified += 1
            self._record(meta, p)

    def _failed(self, meta: dict, exc: Exception) -> None:
        meta["cadbcnn_status"] = f"error: {str(exc).strip()[:200] or type(exc).__name__}"
        with self._lock:
            self.stats.errors += 1
        self._record(meta, None)

    def _record(self, meta: dict, prediction) -> None:
        if self._results is not None:
            line = {k: meta[k] for k in FRAME_KEYS if k in meta}
            line.update({k: meta[k] for k in (*FIELDS, "cadbcnn_status") if k in meta})
            if prediction is not None:
                line["cadbcnn_probabilities"] = {k: round(v, 6) for k, v in prediction.probabilities.items()}
            with self._lock:
                self._results.write(json.dumps(line, default=str) + "\n")
                self._results.flush()
        if self.on_result is not None:
            try:
                self.on_result(meta, prediction)
            except Exception:  # noqa: BLE001 — a user's callback must not kill the worker
                with self._lock:
                    self.stats.errors += 1

    # -- life cycle -----------------------------------------------------------------------------------------
    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued frame is classified; False if ``timeout`` (s) passed first."""
        if self._worker is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float | None = 60.0) -> HookStats:
        """Classify what is queued (up to ``timeout`` s), stop the worker, close the results file."""
        if not self._closed:
            self._closed = True
            self.drain(timeout)
            if self._worker is not None:
                try:
                    self._queue.put(None, timeout=5)
                    self._worker.join(timeout=5)
                except queue.Full:  # drain timed out with a full queue: the daemon worker ends with the process
                    pass
            if self._results is not None:
                self._results.close()
        return self.stats

    def __enter__(self) -> "FrameProcessor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pycromanager_processor(model: str | os.PathLike | None = None, *, classifier=None, mode: str = "background",
                           queue_size: int = 16, batch: int = 4, device: str = "cpu", threads: int | None = None,
                           on_result: Callable[[dict, Any], None] | None = None,
                           results_path: str | os.PathLike | None = None) -> FrameProcessor:
    """An ``image_process_fn`` for pycro-manager's ``Acquisition`` that classifies every frame.

    ``model``: an ONNX file (default: the released model), or pass a ready ``classifier``. The model is
    loaded and checked now, before the acquisition starts.
    """
    if classifier is None:
        from .classifier import Classifier

        classifier = Classifier.from_file(model, device=device, threads=threads)
    if results_path is not None and not Path(results_path).parent.is_dir():
        raise ArgumentError(f"{results_path}: its folder does not exist; create it or choose another results_path")
    return FrameProcessor(classifier, mode=mode, queue_size=queue_size, batch=batch, on_result=on_result,
                          results_path=results_path)
