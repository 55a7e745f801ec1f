"""`cadbcnn-infer FOLDER`: classify every image in a folder (torch-free)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import CadbcnnError

EXIT_HELP = """
Exit codes: 0 every image was classified; 1 some files could not be read (their
rows have status=error; all other results are still written); 2 usage, model or
device error; 130 interrupted (finished rows are kept in OUT.partial — rerun with
--resume).
"""

app = typer.Typer(add_completion=False)


def _table(rows: list[dict], class_names) -> str:
    head = f"{'path':<40} {'label':<12} {'conf':>6} {'review':>6}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        conf = f"{float(r['confidence']):.3f}" if r["status"] == "ok" else ""
        review = ("yes" if r["needs_review"] else "no") if r["status"] == "ok" else ""
        if r.get("out_of_distribution") is True:
            review = "OOD"
        status = "ok" if r["status"] == "ok" else f"error: {r['error']}"
        lines.append(f"{r['path'][-40:]:<40} {r['label']:<12} {conf:>6} {review:>6}  {status}")
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
    threads: Optional[int] = typer.Option(None, min=1, help="ONNX Runtime intra-op threads (default: all cores)."),
    workers: int = typer.Option(2, min=1, help="Decoding threads."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also look in sub-folders."),
    review_threshold: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                                     help="Flag predictions below this confidence for review "
                                                          "(default: the model spec's)."),
    ood_threshold: Optional[float] = typer.Option(None, help="Flag images whose ood_score exceeds this as out of "
                                                  "distribution (default: the model spec's)."),
    resume: bool = typer.Option(False, "--resume", help="Skip images already classified (status ok) in the output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    from .classifier import Classifier
    from .folder import ResultsWriter, Summary, classify_items, columns, discover, read_previous
    from .progress import Progress

    if not folder.is_dir():
        typer.echo(f"error: {folder}: not a folder. Pass a folder of images.", err=True)
        raise typer.Exit(2)
    try:
        clf = Classifier.from_file(model, device=device, threads=threads, allow_fallback=allow_fallback,
                                   review_threshold=review_threshold, ood_threshold=ood_threshold)
    except CadbcnnError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if device == "cuda" and clf.device != "cuda":
        typer.echo("warning: CUDA is not available; falling back to the CPU (--allow-fallback)", err=True)
    typer.echo(f"model {clf.path} ({clf.spec.name} {clf.spec.version}, {clf.spec.variant}) on {clf.device} "
               f"[{', '.join(clf.providers)}]", err=True)

    names = clf.spec.class_names
    cols = columns(names, ood=clf.spec.ood is not None)
    to_stdout = out == "-"
    out_path = None if to_stdout else Path(out) if out else folder.resolve().parent / f"{folder.resolve().name}_predictions.csv"
    items = discover(folder, recursive=recursive)
    previous = read_previous(out_path) if (resume and out_path) else []
    done_keys = {r["path"] for r in previous}
    todo = [i for i in items if i.rel not in done_keys]
    summary = Summary(skipped_resume=len(items) - len(todo))
    collected: list[dict] = []
    try:
        writer = ResultsWriter(out_path, cols, previous) if out_path else None
    except (CadbcnnError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)

    def on_rows(rows):
        if writer:
            writer.write(rows)
            writer.flush()
        if to_stdout:
            collected.extend(rows)

    bar = Progress(len(todo), "classifying", enabled=not quiet)
    finished = False
    try:
        classify_items(clf, todo, batch=batch, workers=workers, on_rows=on_rows, summary=summary,
                       progress=lambda n: bar.update(n, ips=n / max(bar.elapsed, 1e-9)))
        finished = True
    except KeyboardInterrupt:
        pass
    finally:
        bar.close()
        where = writer.close(finished=finished) if writer else None
    if not finished:
        typer.echo(f"interrupted: {summary.ok + summary.errors} finished rows kept in {where}; "
                   "rerun with --resume to continue", err=True)
        raise typer.Exit(130)

    if to_stdout:
        typer.echo(_table(collected, names))
    per_class = ", ".join(f"{n} {summary.per_class.get(n, 0)}" for n in names)
    typer.echo(f"{len(items)} images: {summary.ok} classified ({per_class}); {summary.needs_review} need review"
               + (f" ({summary.out_of_distribution} out of distribution)" if clf.spec.ood else "") + "; "
               f"{summary.errors} errors; {summary.skipped_resume} already done (--resume); "
               f"{summary.images_per_s:.1f} images/s" + (f" → {where}" if where else ""), err=True)
    if summary.errors:
        typer.echo(f"warning: {summary.errors} file(s) could not be read — see the rows with status=error", err=True)
    raise typer.Exit(1 if summary.errors else 0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
