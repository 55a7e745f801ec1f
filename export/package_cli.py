"""`cadbcnn-package`: a cadbcnn ONNX model → a BioImage Model Zoo (bioimage.io, format 0.5) package, tested.

    cadbcnn-package models/cadbcnn.onnx --out cadbcnn-bioimageio.zip

Exit codes: 0 package written (and, with --test, the bioimageio test passed); 2 bad arguments, a missing or
unreadable model, or the `bioimageio` extra not installed (checked before any work); 3 the package failed the
bioimageio test (it is left on disk for inspection) or could not be built consistently with the runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cadbcnn_runtime.errors import ArgumentError
from cadbcnn_runtime.exits import cli_errors

app = typer.Typer(add_completion=False)


@app.command()
@cli_errors
def main_cmd(
    model: Path = typer.Argument(..., help="A model exported with `cadbcnn-export` (e.g. models/cadbcnn.onnx)."),
    out: Path = typer.Option(..., "--out", "-o", help="The package to write (.zip)."),
    samples: Path = typer.Option(Path("models/samples"), help="Images for the test tensors and the cover (the "
                                 "first --max-test-images by name)."),
    test: bool = typer.Option(True, "--test/--no-test", help="Run the bioimageio model test on the package "
                              "(bioimageio.core's `test_model`, what `bioimageio test` runs; CPU)."),
    max_test_images: int = typer.Option(8, min=1, help="How many sample images go into the test tensors."),
    author: Optional[List[str]] = typer.Option(None, "--author", help="Author name for the rdf (repeatable; "
                                               "default 'cadbcnn contributors')."),
    github_user: Optional[str] = typer.Option(None, help="Maintainer's GitHub user name (bioimage.io wants one; "
                                              "bioimageio.spec verifies it online)."),
    paper_doi: Optional[str] = typer.Option(None, help="DOI of the Jha et al. paper, if known."),
    paper_url: Optional[str] = typer.Option(None, help="URL of the Jha et al. paper, if known."),
    git_repo: Optional[str] = typer.Option(None, help="URL of the code repository."),
    compress: bool = typer.Option(False, "--compress", help="Deflate the zip (a few per cent smaller, slower "
                                  "to read)."),
) -> None:
    """Package MODEL for the BioImage Model Zoo: calibrated probabilities (and the OOD score) as outputs, test
    tensors from --samples, a cover, documentation; then test it with bioimageio.core."""
    import time

    from .bioimageio import build_package, require_bioimageio, test_package

    t0 = time.time()
    if not model.is_file():
        raise ArgumentError(f"{model}: model file not found. Pass an ONNX model exported with `cadbcnn-export` (the "
                            "released one is models/cadbcnn.onnx).")
    require_bioimageio(core=test)
    summary = build_package(model, out, samples=samples, max_test_images=max_test_images,
                            authors=tuple(author) if author else ("cadbcnn contributors",),
                            maintainer_github=github_user, paper_doi=paper_doi, paper_url=paper_url,
                            git_repo=git_repo, compress=compress, log=typer.echo)
    typer.echo(f"package   {summary['path']}  {summary['size_bytes'] / 1e6:.1f} MB  sha256 {summary['sha256']}")
    typer.echo(f"weights   weights.onnx  sha256 {summary['weights_sha256']} (from {Path(summary['source']).name}, "
               f"sha256 {summary['source_sha256'][:16]}…)")
    typer.echo(f"outputs   {', '.join(summary['outputs'])}; probabilities = softmax(logits / "
               f"{summary['temperature']:.4g}); max |Δ| vs cadbcnn_runtime {summary['max_abs_diff']:.1e}")
    typer.echo("test set  " + ", ".join(f"{n} → {p}" for n, p in zip(summary["test_images"], summary["predictions"])))
    if not test:
        typer.echo(f"done in {time.time() - t0:.1f} s (bioimageio test skipped: --no-test)")
        raise typer.Exit(0)
    passed, text = test_package(Path(summary["path"]))
    typer.echo(text)
    typer.echo(f"done in {time.time() - t0:.1f} s — bioimageio test {'PASSED' if passed else 'FAILED'}")
    raise typer.Exit(0 if passed else 3)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
