"""``--engine ray``: classify an archive with Ray Data, one ``Classifier`` per actor (extra ``cadbcnn[distributed]``).

The driver (``cadbcnn_runtime.job``) lists SOURCE, validates the model and owns the output: locking, streaming,
resume and the summary are the local engine's. Ray only runs the middle:

    items (path or URI, row key) ──map_batches(_ClassifyBatch, concurrency=actors, num_cpus=threads)──▶ rows

* **One model per actor.** The driver puts the verified model bytes into Ray's object store once; every actor
  loads them with ``Classifier.from_bytes`` (the same spec and content checks) — the workers need no copy of
  the file, only access to the images.
* **Bytes are read and decoded inside the actors** (``folder.classify_items``: the same thread-pooled decode,
  batching and ``ok_row``/``error_row`` as the local engine), so a bad file is an error row, never a failed
  task, and both engines give the same rows.
* **Cores.** Each actor asks Ray for ``threads`` CPUs and runs ONNX Runtime with that many intra-op threads, so
  Ray never places more actors × threads on a machine than it has cores.
* **Order.** Rows come back in SOURCE order (``preserve_order``), so a Ray run and a local run of the same folder
  write the same file.

Ray is imported here only; the rest of the runtime never imports it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ArgumentError, ModelRunError
from .folder import Item, Summary, classify_items, deliver
from .sources import read_item

RAY_EXTRA_HINT = "pip install 'cadbcnn[distributed]'"
ENC, ERRS = "utf-8", "surrogateescape"


def import_ray():
    """``ray`` and ``ray.data``, or ArgumentError naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ArgumentError(f"--engine ray needs Ray Data, which is not installed here ({exc}). Install the "
                            f"extra: {RAY_EXTRA_HINT}") from None
    return ray


def _encode(item: Item) -> dict:
    path = item.path if isinstance(item.path, str) else os.fsencode(item.path)
    return {"loc": path.encode(ENC, ERRS) if isinstance(path, str) else path,
            "uri": isinstance(item.path, str),
            "rel": item.rel.encode(ENC, ERRS), "error": (item.error or "").encode(ENC, ERRS)}


def _decode_item(loc: bytes, uri: bool, rel: bytes, error: bytes) -> Item:
    return Item(loc.decode(ENC, ERRS) if uri else Path(os.fsdecode(loc)),  # type: ignore[arg-type]
                rel.decode(ENC, ERRS), error.decode(ENC, ERRS) or None)


class _ClassifyBatch:
    """A Ray Data actor: the model loaded once, then a batch of items → rows (as JSON, exact floats)."""

    def __init__(self, model: list, name: str, device: str, threads: int, workers: int, batch: int,
                 review_threshold: float | None, ood_threshold: float | None):
        import ray

        from .classifier import Classifier

        data = ray.get(model[0])  # a list, so Ray hands over the reference, not the bytes
        self.clf = Classifier.from_bytes(data, name=name, device=device, threads=threads,
                                         review_threshold=review_threshold, ood_threshold=ood_threshold)
        self.workers, self.batch = workers, batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [_decode_item(*fields) for fields in zip(batch["loc"], batch["uri"], batch["rel"], batch["error"])]
        rows: list[dict] = []
        classify_items(self.clf, items, batch=self.batch, workers=self.workers, on_rows=rows.extend, read=read_item)
        return {"row": np.array([json.dumps(r).encode("ascii") for r in rows], dtype=object)}


class RayEngine:
    """Connects to (or starts) Ray, runs the items through the actor pool, streams rows to the driver."""

    def __init__(self, *, address: str | None = None, actors: int | None = None, threads: int | None = None,
                 workers: int = 2, batch: int = 16):
        self.ray = import_ray()
        self.address, self.actors, self.threads = address, actors, threads
        self.workers, self.batch = workers, batch
        self.started_here = False
        self.model_ref = None
        self.kwargs: dict = {}

    def start(self, clf) -> str:
        """Connect, put the model in the object store; returns a one-line description of the pool."""
        ray = self.ray
        from .session import allowed_cpus

        if not ray.is_initialized():
            try:
                if self.address is None:  # a private local instance on the CPUs this process may use
                    ray.init(num_cpus=allowed_cpus(), include_dashboard=False, log_to_driver=False,
                             logging_level=logging.ERROR)
                else:
                    ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
            except Exception as exc:  # noqa: BLE001 — Ray raises ConnectionError, RuntimeError, …
                raise ArgumentError(f"cannot connect to Ray at {self.address or 'a new local instance'} "
                                    f"({str(exc).strip().splitlines()[0][:300]}). Start a cluster with "
                                    "`ray start --head` and pass --address auto (or ray://HOST:10001)") from None
            self.started_here = True
        # Needed: without it a Ray Data INFO record fails to format ("TypeError: not all arguments converted
        # during string formatting") under pytest's log capture and the job fails (seen with Ray 2.60).
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = self.ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        threads = self.threads or 1
        if threads > cpus:
            raise ArgumentError(f"--threads {threads} per actor is more than the cluster's {cpus} CPUs")
        actors = self.actors or max(1, cpus // threads)
        if actors * threads > cpus:
            raise ArgumentError(f"--actors {actors} × --threads {threads} needs {actors * threads} CPUs; the cluster "
                                f"has {cpus}. Lower --actors or --threads")
        self.model_ref = ray.put(Path(clf.path).read_bytes())
        self.actors, self.threads = actors, threads
        self.kwargs = dict(model=[self.model_ref], name=str(clf.path), device=clf.device, threads=threads,
                           workers=self.workers, batch=self.batch, review_threshold=clf.review_override,
                           ood_threshold=clf.ood_threshold)
        where = self.address or "a local Ray instance"
        return f"ray: {actors} actor(s) × {threads} thread(s) on {where} ({cpus} CPUs)"

    def run(self, items: list[Item], *, on_rows: Callable[[list[dict]], None], summary: Summary,
            progress: Callable[[int], None] | None = None) -> Summary:
        if not items:
            return summary
        ray = self.ray
        import time

        t0 = time.perf_counter()
        done = 0
        ds = ray.data.from_items([_encode(i) for i in items])
        rows_ds = ds.map_batches(_ClassifyBatch, fn_constructor_kwargs=self.kwargs, batch_size=self.batch * 4,
                                 compute=ray.data.ActorPoolStrategy(size=self.actors), num_cpus=self.threads,
                                 batch_format="numpy")
        try:
            for b in rows_ds.iter_batches(batch_size=None, batch_format="numpy"):
                done = deliver([json.loads(r) for r in b["row"]], summary=summary, on_rows=on_rows,
                               progress=progress, done=done)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 — an actor's model or the cluster failed: the run, not a file
            msg = [line for line in str(exc).strip().splitlines() if line.strip()]
            raise ModelRunError(f"the Ray job failed ({(msg[-1] if msg else type(exc).__name__)[:400]}); finished "
                                "rows are kept — rerun with --resume") from None
        finally:
            summary.total += done
            summary.seconds += time.perf_counter() - t0
        return summary

    def stop(self) -> None:
        self.model_ref = None
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()
            self.started_here = False
