"""`cadbcnn-infer SOURCE`: classify every image in a folder, a list or a URI (torch-free)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .results import printable
from .session import BACKENDS
from .variants import PRECISIONS

EXIT_HELP = """
Exit codes: 0 every image was classified; 1 some files could not be read (their
rows have status=error; all other results are still written); 2 usage, model,
device or output error (another run writing the same --out, a file cadbcnn did
not write, ONNX Runtime failing mid-run — finished rows are kept); 130
interrupted (finished rows are kept in OUT.partial — rerun with --resume).
"""

app = typer.Typer(add_completion=False)


def _say(text: str, *, err: bool = True) -> None:
    typer.echo(printable(text), err=err)


def _table(rows: list[dict], class_names) -> str:
    head = f"{'path':<40} {'label':<12} {'conf':>6} {'review':>6}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        conf = f"{float(r['confidence']):.3f}" if r["status"] == "ok" else ""
        review = ("yes" if r["needs_review"] else "no") if r["status"] == "ok" else ""
        if r.get("out_of_distribution") is True:
            review = "OOD"
        if r.get("low_review_score") is True:
            review = "score"
        if r.get("atypical_appearance") is True:
            review = "look"
        if r.get("low_content") is True:
            review = "blank"
        status = "ok" if r["status"] == "ok" else f"error: {r['error']}"
        path = printable(r["path"]).replace("\r", "\\r").replace("\n", "\\n")
        lines.append(f"{path[-40:]:<40} {r['label']:<12} {conf:>6} {review:>6}  {printable(status)}")
    return "\n".join(lines)


class Engine(str, Enum):
    local = "local"
    ray = "ray"


Precision = Enum("Precision", {p: p for p in PRECISIONS}, type=str)
Backend = Enum("Backend", {b: b for b in BACKENDS}, type=str)


@app.command(help="Classify every image in SOURCE (a folder, a list file of paths/URIs, or a URI) with a cadbcnn "
                  "ONNX model. (`cadbcnn-infer validate FOLDER`: is the model safe on your images? See its --help.)"
                  "\n" + EXIT_HELP)
def infer(
    source: str = typer.Argument(..., metavar="SOURCE",
                                 help="Folder of images (jpg, jpeg, png, bmp, tif, tiff); or a .txt/.lst list with "
                                      "one path or URI per line; or a URI such as s3://bucket/prefix (needs pyarrow)."),
    model: Optional[Path] = typer.Option(None, help="ONNX model from cadbcnn-export (default: the released model)."),
    out: Optional[str] = typer.Option(None, help="results .csv | .jsonl | .json | .parquet, or '-' for a table on "
                                      "stdout (default: SOURCE/../<name>_predictions.csv)."),
    device: str = typer.Option("auto", help="auto (CUDA if available) | cpu | cuda"),
    allow_fallback: bool = typer.Option(False, "--allow-fallback", help="Use the CPU if --device cuda is unavailable."),
    batch: int = typer.Option(16, min=1, help="Images per inference batch."),
    threads: Optional[int] = typer.Option(None, min=1, help="Inference threads (local engine: default and "
                                          "cap the CPUs this process may use; ray engine: per actor, default 1)."),
    workers: int = typer.Option(2, min=1, help="Decoding threads (per actor with --engine ray)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also look in sub-folders."),
    review_threshold: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                                     help="Flag predictions below this confidence for review "
                                                          "(default: the model spec's)."),
    ood_threshold: Optional[float] = typer.Option(None, help="Flag images whose ood_score exceeds this as out of "
                                                  "distribution (default: the model spec's)."),
    resume: bool = typer.Option(False, "--resume", help="Skip images already classified (status ok) in the output."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file that cadbcnn did not write."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    engine: Engine = typer.Option(Engine.local, help="local: this process; ray: a Ray cluster (pip install "
                                  "'cadbcnn[distributed]')."),
    address: Optional[str] = typer.Option(None, help="--engine ray: the cluster (auto, or ray://HOST:10001); default "
                                          "a private local instance on this machine's CPUs."),
    actors: Optional[int] = typer.Option(None, min=1, help="--engine ray: model replicas (default: cluster CPUs ÷ "
                                         "--threads)."),
    html: Optional[Path] = typer.Option(None, help="Also write a self-contained HTML review report (thumbnails, "
                                        "images that need review first, filters)."),
    precision: Precision = typer.Option("auto", help="auto: the fastest variant next to the model this machine "
                                        "supports (INT8 with VNNI, FP16 on CUDA, else FP32); or name one."),
    backend: Backend = typer.Option("onnxruntime", help="onnxruntime | openvino: OpenVINO's CPU plugin in FP32 "
                                    "precision on the same file (pip install 'cadbcnn[openvino]'; CPU, local "
                                    "engine only)."),
) -> None:
    from .errors import CadbcnnError
    from .exits import exit_code_of
    from .job import classify_to_file

    try:
        result = classify_to_file(source, out, model=model, engine=engine.value, device=device,
                                  allow_fallback=allow_fallback, batch=batch, threads=threads, workers=workers,
                                  recursive=recursive, review_threshold=review_threshold,
                                  ood_threshold=ood_threshold, resume=resume, force=force, quiet=quiet,
                                  address=address, actors=actors, html=html, precision=precision.value,
                                  backend=backend.value, say=_say)
    except CadbcnnError as exc:
        _say(f"error: {exc}")
        raise typer.Exit(exit_code_of(exc))
    except OSError as exc:  # the output itself (disk full, read-only folder): a failure of the run, not of a file
        _say(f"error: cannot write the results ({exc.strerror or exc}: {exc.filename or out}); finished rows, if "
             "any, are in the .partial file — free space or choose another --out, then rerun with --resume")
        raise typer.Exit(2)
    raise typer.Exit(_report(result))


def _report(result) -> int:
    s, where = result.summary, result.output
    if result.failure is not None:
        _say(f"error: {result.failure}")
        _say(f"{s.ok + s.errors} finished rows kept in {where}; rerun with --resume to continue")
        return result.exit_code
    if result.exit_code == 130:
        _say(f"interrupted: {s.ok + s.errors} finished rows kept in {where}; rerun with --resume to continue")
        return 130
    names = result.class_names
    if result.rows or where is None:
        typer.echo(_table(result.rows, names))
    per_class = ", ".join(f"{n} {s.per_class.get(n, 0)}" for n in names)
    _say(f"{result.total} images: {s.ok} classified ({per_class}); {s.needs_review} need review"
         + (f" ({s.out_of_distribution} out of distribution)" if result.has_ood else "")
         + (f" ({s.low_content} blank or near-uniform)" if result.has_quality else "")
         + (f" ({s.atypical_appearance} unlike the training images' colour and contrast)"
            if result.has_appearance else "")
         + (f" ({s.low_review_score} below the learned review score's threshold)" if result.has_review_score else "")
         + "; "
         f"{s.errors} errors; {s.skipped_resume} already done (--resume); "
         f"{s.images_per_s:.1f} images/s ({result.backend}, {result.precision})" + (f" → {where}" if where else ""))
    if s.errors:
        _say(f"warning: {s.errors} file(s) could not be read — see the rows with status=error")
    return result.exit_code


validate_app = typer.Typer(add_completion=False)


@validate_app.command(help="Is the model safe on your images? Accuracy (with labels), review rate, OOD rate, silent "
                           "errors and a plain verdict with its rule, as FOLDER_validation/validation.md + .json + "
                           "PNGs. Exit codes: 0 the report was written (whatever the verdict); 2 bad arguments, "
                           "model or folder.")
def validate(
    folder: Path = typer.Argument(..., help="Your images: class sub-folders (labelled), or a flat folder "
                                  "(unlabelled; with --healthy: all healthy)."),
    model: Optional[Path] = typer.Option(None, help="ONNX model (default: the released model)."),
    out: Optional[Path] = typer.Option(None, help="Report folder (default: FOLDER_validation next to FOLDER)."),
    class_map: list[str] = typer.Option([], "--class-map", help="LOCAL=CLASS for a sub-folder named otherwise "
                                        "than the model's classes, e.g. healthy=Benign (repeatable)."),
    healthy: bool = typer.Option(False, "--healthy", help="Every image is healthy: any malignant label is an error."),
    batch: int = typer.Option(32, min=1, help="Images per inference batch."),
    threads: Optional[int] = typer.Option(None, min=1, help="ONNX Runtime intra-op threads."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    precision: Precision = typer.Option("auto", help="Which variant of the model to validate (as cadbcnn-infer)."),
    backend: Backend = typer.Option("onnxruntime", help="onnxruntime | openvino (as cadbcnn-infer)."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write the PNGs (needs matplotlib: "
                                 "pip install 'cadbcnn[report]')."),
) -> None:
    from .errors import CadbcnnError
    from .exits import exit_code_of
    from .validate import parse_class_map
    from .validate import validate as run_validation

    try:
        mapping = parse_class_map(class_map)
        dest = out or folder.resolve().parent / f"{folder.resolve().name}_validation"
        r = run_validation(model, folder, dest, class_map=mapping, healthy=healthy, batch=batch, threads=threads,
                           device=device, figures=figures, precision=precision.value,
                           backend=backend.value)
    except CadbcnnError as exc:
        _say(f"error: {exc}")
        raise typer.Exit(exit_code_of(exc))
    st = r["stats"]
    pct = lambda v: "–" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    typer.echo(f"{r['kind']} set, {st['n']} images: accuracy {pct(st['accuracy'])}, review {pct(st['review_rate'])}, "
               f"OOD {pct(st['ood_rate'])}, silent errors {pct(st['silent_error_rate'])}")
    typer.echo(f"verdict: {r['verdict'] or 'none'}{'' if r['verified'] else ' (unverified: no labels)'} — "
               f"{r['verdict_rule']}")
    if r["unreadable"]:
        _say(f"warning: {len(r['unreadable'])} file(s) could not be read (listed in the report)")
    _say(f"report → {dest / 'validation.md'}")


SUBCOMMANDS = {"validate": validate_app}  # `cadbcnn-infer validate …`; anything else is classification


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        SUBCOMMANDS[argv[0]](args=argv[1:], prog_name=f"cadbcnn-infer {argv[0]}")
    else:
        app(args=argv, prog_name="cadbcnn-infer")


if __name__ == "__main__":
    main()
