"""`cadbcnn-infer FOLDER`: classify every image in a folder (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

EXIT_HELP = """
Exit codes: 0 every image was classified; 1 some files could not be read (their
rows have status=error; all other results are still written); 2 usage, model,
device or output error (another run writing the same --out, a file cadbcnn did
not write, ONNX Runtime failing mid-run — finished rows are kept); 130
interrupted (finished rows are kept in OUT.partial — rerun with --resume).
"""

app = typer.Typer(add_completion=False)


def _shown(text: str) -> str:
    """Text safe for any terminal encoding: undecodable file-name bytes shown as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _say(text: str, *, err: bool = True) -> None:
    typer.echo(_shown(text), err=err)


def _table(rows: list[dict], class_names) -> str:
    head = f"{'path':<40} {'label':<12} {'conf':>6} {'review':>6}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        conf = f"{float(r['confidence']):.3f}" if r["status"] == "ok" else ""
        review = ("yes" if r["needs_review"] else "no") if r["status"] == "ok" else ""
        if r.get("out_of_distribution") is True:
            review = "OOD"
        if r.get("low_content") is True:
            review = "blank"
        status = "ok" if r["status"] == "ok" else f"error: {r['error']}"
        path = _shown(r["path"]).replace("\r", "\\r").replace("\n", "\\n")
        lines.append(f"{path[-40:]:<40} {r['label']:<12} {conf:>6} {review:>6}  {_shown(status)}")
    return "\n".join(lines)


@app.command(help="Classify every image in FOLDER with a cadbcnn ONNX model.\n" + EXIT_HELP)
def infer(
    folder: Path = typer.Argument(..., help="Folder of images (jpg, jpeg, png, bmp, tif, tiff)."),
    model: Optional[Path] = typer.Option(None, help="ONNX model from cadbcnn-export (default: the released model)."),
    out: Optional[str] = typer.Option(None, help="results .csv | .jsonl | .json, or '-' for a table on stdout "
                                      "(default: FOLDER/../<folder>_predictions.csv)."),
    device: str = typer.Option("auto", help="auto (CUDA if available) | cpu | cuda"),
    allow_fallback: bool = typer.Option(False, "--allow-fallback", help="Use the CPU if --device cuda is unavailable."),
    batch: int = typer.Option(16, min=1, help="Images per inference batch."),
    threads: Optional[int] = typer.Option(None, min=1, help="ONNX Runtime intra-op threads (default and cap: the "
                                          "CPUs this process may use)."),
    workers: int = typer.Option(2, min=1, help="Decoding threads."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also look in sub-folders."),
    review_threshold: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                                     help="Flag predictions below this confidence for review "
                                                          "(default: the model spec's)."),
    ood_threshold: Optional[float] = typer.Option(None, help="Flag images whose ood_score exceeds this as out of "
                                                  "distribution (default: the model spec's)."),
    resume: bool = typer.Option(False, "--resume", help="Skip images already classified (status ok) in the output."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file that cadbcnn did not write."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    from .errors import CadbcnnError

    try:
        code = _run(folder, model=model, out=out, device=device, allow_fallback=allow_fallback, batch=batch,
                    threads=threads, workers=workers, recursive=recursive, review_threshold=review_threshold,
                    ood_threshold=ood_threshold, resume=resume, force=force, quiet=quiet)
    except CadbcnnError as exc:
        _say(f"error: {exc}")
        raise typer.Exit(exc.exit_code if exc.exit_code != 1 else 2)
    except OSError as exc:  # the output itself (disk full, read-only folder): a failure of the run, not of a file
        _say(f"error: cannot write the results ({exc.strerror or exc}: {exc.filename or out}); finished rows, if "
             "any, are in the .partial file — free space or choose another --out, then rerun with --resume")
        raise typer.Exit(2)
    raise typer.Exit(code)


def _run(folder: Path, *, model, out, device, allow_fallback, batch, threads, workers, recursive, review_threshold,
         ood_threshold, resume, force, quiet) -> int:
    from .classifier import Classifier
    from .errors import ArgumentError, ModelRunError
    from .folder import Summary, classify_items, columns, discover
    from .progress import Progress
    from .results import OutputLock, ResultsWriter, check_not_foreign, check_output_path, read_previous

    # -- everything that can be refused is refused before any work -------------------------------------------
    if not folder.is_dir():
        raise ArgumentError(f"{folder}: not a folder. Pass a folder of images.")
    to_stdout = out == "-"
    out_path = None if to_stdout else (Path(out) if out else
                                       folder.resolve().parent / f"{folder.resolve().name}_predictions.csv")
    if resume and out_path is None:
        raise ArgumentError("--resume needs an output file (--out results.csv), not '-'")
    lock = None
    if out_path is not None:
        check_output_path(out_path)
        lock = OutputLock(out_path).acquire()
    try:
        if out_path is not None:
            check_not_foreign(out_path, force=force)
        clf = Classifier.from_file(model, device=device, threads=threads, allow_fallback=allow_fallback,
                                   review_threshold=review_threshold, ood_threshold=ood_threshold)
        if device == "cuda" and clf.device != "cuda":
            _say("warning: CUDA is not available; falling back to the CPU (--allow-fallback)")
        _say(f"model {clf.path} ({clf.spec.name} {clf.spec.version}, {clf.spec.variant}) on {clf.device} "
             f"[{', '.join(clf.providers)}]")
        names = clf.spec.class_names
        cols = columns(names, ood=clf.spec.ood is not None, quality=clf.spec.quality is not None)
        try:
            items = discover(folder, recursive=recursive)
        except OSError as exc:
            raise ArgumentError(f"{folder}: cannot list this folder ({exc.strerror}).") from None
        previous = read_previous(out_path, cols, names) if (resume and out_path) else []
        done_keys = {r["path"] for r in previous}
        todo = [i for i in items if i.rel not in done_keys]
        summary = Summary(skipped_resume=len(items) - len(todo))
        collected: list[dict] = []
        writer = ResultsWriter(out_path, cols, previous) if out_path else None

        def on_rows(rows):
            if writer:
                writer.write(rows)
                writer.flush()
            if to_stdout:
                collected.extend(rows)

        bar = Progress(len(todo), "classifying", enabled=not quiet)
        finished = False
        failure: ModelRunError | None = None
        try:
            classify_items(clf, todo, batch=batch, workers=workers, on_rows=on_rows, summary=summary,
                           progress=lambda n: bar.update(n, ips=n / max(bar.elapsed, 1e-9)))
            finished = True
        except KeyboardInterrupt:
            pass
        except ModelRunError as exc:
            failure = exc
        finally:
            bar.close()
            where = writer.close(finished=finished) if writer else None
    finally:
        if lock is not None:
            lock.release()
    if failure is not None:
        _say(f"error: {failure}")
        _say(f"{summary.ok + summary.errors} finished rows kept in {where}; rerun with --resume to continue")
        return 2
    if not finished:
        _say(f"interrupted: {summary.ok + summary.errors} finished rows kept in {where}; "
             "rerun with --resume to continue")
        return 130

    if to_stdout:
        typer.echo(_table(collected, names))
    per_class = ", ".join(f"{n} {summary.per_class.get(n, 0)}" for n in names)
    _say(f"{len(items)} images: {summary.ok} classified ({per_class}); {summary.needs_review} need review"
         + (f" ({summary.out_of_distribution} out of distribution)" if clf.spec.ood else "")
         + (f" ({summary.low_content} blank or near-uniform)" if clf.spec.quality else "") + "; "
         f"{summary.errors} errors; {summary.skipped_resume} already done (--resume); "
         f"{summary.images_per_s:.1f} images/s" + (f" → {where}" if where else ""))
    if summary.errors:
        _say(f"warning: {summary.errors} file(s) could not be read — see the rows with status=error")
    return 1 if summary.errors else 0


def main() -> None:
    app()


if __name__ == "__main__":
    main()
