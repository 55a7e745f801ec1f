"""One classification job — SOURCE in, a results file out — on the local engine or on Ray.

This is ``cadbcnn-infer`` as a Python function (the CLI only prints what it returns):

    from cadbcnn_runtime.job import classify_to_file
    result = classify_to_file("smears/", "smears.parquet", engine="ray", resume=True)
    print(result.summary.ok, result.exit_code, result.output)

Everything that can be refused (source, output, lock, a foreign output file, the model, the engine's extra) is
refused before any image is read. The output is locked, streamed, crash-safe and resumable
(``cadbcnn_runtime.results``); both engines write the same rows (``folder.ok_row`` / ``folder.error_row``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .calibration import describe_thresholds
from .errors import ArgumentError, ModelRunError
from .folder import Summary, classify_items, columns
from .progress import Progress
from .results import (OutputLock, ResultsWriter, check_not_foreign, check_output_path, printable, read_previous,
                      row_key)
from .sources import describe, list_items, read_item

ENGINES = ("local", "ray")


@dataclass
class JobResult:
    exit_code: int            # 0 all classified, 1 some files unreadable, 2 run failed, 130 interrupted
    summary: Summary
    total: int                # items found in SOURCE
    output: Path | None       # the results file (OUT, or OUT.partial when unfinished); None for stdout
    rows: list[dict]          # the rows of this run when out is "-" (stdout), else empty
    engine_info: str = ""     # what ran it: "local" or "ray: N actors × T threads at ADDRESS"
    failure: str | None = None
    class_names: tuple = ()
    has_ood: bool = False
    has_quality: bool = False
    has_appearance: bool = False  # the spec has an appearance check (atypical_appearance column)
    has_review_score: bool = False  # the spec has a learned review score (low_review_score column)
    precision: str = ""           # the variant that ran (fp32 | int8 | fp16) and why
    precision_reason: str = ""
    backend: str = ""             # what ran it: onnxruntime | openvino


def default_output(source: str | os.PathLike) -> Path:
    p = Path(source).resolve()
    return p.parent / f"{p.stem if p.is_file() else p.name}_predictions.csv"


def _stderr(text: str) -> None:
    print(printable(text), file=sys.stderr)


def _check_html(html) -> Path | None:
    if html is None:
        return None
    p = Path(html)
    if p.suffix.lower() not in (".html", ".htm"):
        raise ArgumentError(f"{p}: the review report is an .html file; pass --html report.html")
    if p.is_dir() or not p.parent.is_dir():
        raise ArgumentError(f"{p}: {'is a directory' if p.is_dir() else f'the folder {p.parent} does not exist'}; "
                            "choose another --html path")
    return p


def classify_to_file(source: str | os.PathLike, out: str | os.PathLike | None = None, *, model=None,
                     engine: str = "local", device: str = "auto", allow_fallback: bool = False, batch: int = 16,
                     threads: int | None = None, workers: int = 2, recursive: bool = False,
                     review_threshold: float | None = None, ood_threshold: float | None = None,
                     resume: bool = False, force: bool = False, quiet: bool = True,
                     address: str | None = None, actors: int | None = None, html: str | os.PathLike | None = None,
                     precision: str = "auto", backend: str = "onnxruntime",
                     say: Callable[[str], None] = _stderr) -> JobResult:
    """Classify every image of SOURCE (folder, list file or URI) into OUT (.csv/.jsonl/.json/.parquet, '-').

    ``html``: also write a self-contained review report there (``report_html``) when the run finishes.
    ``backend``: ``"onnxruntime"`` or ``"openvino"`` (``Classifier.from_file``; the local engine only).
    """
    from .classifier import Classifier
    from .session import check_backend

    # -- everything that can be refused is refused before any work -------------------------------------------
    if engine not in ENGINES:
        raise ArgumentError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ArgumentError(f"batch must be an integer >= 1, got {batch!r}")
    if actors is not None and (isinstance(actors, bool) or not isinstance(actors, int) or actors < 1):
        raise ArgumentError(f"actors must be an integer >= 1, got {actors!r}")
    if engine == "local" and (address is not None or actors is not None):
        raise ArgumentError("--address and --actors are options of --engine ray")
    check_backend(backend, device)
    if engine == "ray" and backend != "onnxruntime":
        raise ArgumentError(f"--engine ray runs its actors on ONNX Runtime only; --backend {backend} needs --engine "
                            "local (or use --backend onnxruntime on Ray)")
    ray_engine = None
    if engine == "ray":
        from .distributed import RayEngine  # raises ArgumentError naming the extra when Ray is not installed

        ray_engine = RayEngine(address=address, actors=actors, threads=threads, workers=workers, batch=batch)
    kind = describe(source)
    html_path = _check_html(html)
    to_stdout = out is not None and os.fspath(out) == "-"
    out_path = None if to_stdout else (Path(out) if out is not None else default_output(source))
    if resume and out_path is None:
        raise ArgumentError("--resume needs an output file (--out results.csv), not '-'")
    lock = None
    if out_path is not None:
        check_output_path(out_path)
        lock = OutputLock(out_path).acquire()
    info = "local"
    try:
        if out_path is not None:
            check_not_foreign(out_path, force=force)
        clf = Classifier.from_file(model, device=device, threads=threads, allow_fallback=allow_fallback,
                                   review_threshold=review_threshold, ood_threshold=ood_threshold,
                                   precision=precision, backend=backend)
        if device == "cuda" and clf.device != "cuda":
            say("warning: CUDA is not available; falling back to the CPU (--allow-fallback)")
        say(f"model {clf.path} ({clf.spec.name} {clf.spec.version}, {clf.spec.variant}) on {clf.device} "
            f"[{', '.join(clf.providers)}]; backend {clf.backend}; precision {clf.precision}: {clf.precision_reason}; "
            f"optimised-graph cache: {clf.session_cache}")
        if ray_engine is not None:  # connect and check the pool against the cluster before any image is read
            info = ray_engine.start(clf)
            clf.close()  # the actors load their own copies; this one only validated the model up front
            say(f"engine {info}")
        names = clf.spec.class_names
        cols = columns(names, ood=clf.spec.ood is not None, quality=clf.spec.quality is not None,
                       appearance=clf.spec.appearance is not None, review_score=clf.review_score is not None)
        items = list_items(source, recursive=recursive)
        previous = read_previous(out_path, cols, names) if (resume and out_path) else []
        done_keys = {row_key(r["path"]) for r in previous}
        todo = [i for i in items if row_key(i.rel) not in done_keys]
        summary = Summary(skipped_resume=len(items) - len(todo))
        collected: list[dict] = []
        for_report: list[dict] = list(previous) if html_path else []
        writer = ResultsWriter(out_path, cols, previous) if out_path else None

        def on_rows(rows):
            if writer:
                writer.write(rows)
                writer.flush()
            if to_stdout:
                collected.extend(rows)
            if html_path:
                for_report.extend(rows)

        bar = Progress(len(todo), "classifying", enabled=not quiet)
        progress = lambda n: bar.update(n, ips=n / max(bar.elapsed, 1e-9))  # noqa: E731
        finished, failure = False, None
        try:
            if ray_engine is not None:
                ray_engine.run(todo, on_rows=on_rows, summary=summary, progress=progress)
            else:
                classify_items(clf, todo, batch=batch, workers=workers, on_rows=on_rows, summary=summary,
                               progress=progress, read=None if kind == "folder" else read_item)
            finished = True
        except KeyboardInterrupt:
            pass
        except ModelRunError as exc:
            failure = str(exc)
        finally:
            bar.close()
            where = writer.close(finished=finished) if writer else None
    finally:
        if ray_engine is not None:
            ray_engine.stop()
        if lock is not None:
            lock.release()
    code = 2 if failure else 130 if not finished else 1 if summary.errors else 0
    if html_path and finished and not failure:
        from .report_html import write_html_report

        by_key = {i.rel: i for i in items}
        thr = f"review threshold {describe_thresholds(clf.review_thresholds)}" + (
            f", OOD threshold {clf.ood_threshold:.4g}" if clf.ood_threshold is not None else "")
        write_html_report(html_path, for_report, class_names=names,
                          source_of=lambda key: read_item(by_key[key]) if key in by_key else None,
                          title=f"cadbcnn review — {Path(os.fspath(source)).name or os.fspath(source)}",
                          model_info=f"{clf.spec.name} {clf.spec.version} ({clf.path.name}, {clf.spec.variant}, "
                                     f"{clf.backend}) · {thr}")
        say(f"review report → {html_path}")
    return JobResult(code, summary, len(items), where, collected, info, failure, tuple(names),
                     clf.spec.ood is not None, clf.spec.quality is not None,
                     has_appearance=clf.spec.appearance is not None,
                     has_review_score=clf.review_score is not None, precision=clf.precision,
                     precision_reason=clf.precision_reason, backend=clf.backend)
