"""`cadbcnn-export adapt-bn MODEL.onnx --data SITE/ --reference OURS/ -o SITE.onnx`: label-free site adaptation
(BatchNorm statistics of the site's images, then the OOD flag and the appearance check refitted; see ``adapt_bn``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cadbcnn_runtime.validate import parse_class_map

from .cli_report import run_reported

app = typer.Typer(add_completion=False)


@app.command()
def adapt_bn(
    model: Path = typer.Argument(..., help="The exported FP32 model (e.g. models/cadbcnn.onnx)."),
    data: Path = typer.Option(..., "--data", help="Your site's images (searched recursively; no labels needed). "
                              "Class sub-folders, if any, let the OOD refit check the classifier first."),
    reference: Path = typer.Option(..., "--reference", help="Images of the lab MODEL was trained on (for the "
                                   "released model: the ALL dataset; with --reference-split, its training split)."),
    output: Path = typer.Option(..., "-o", "--output", help="The adapted model to write (SITE.onnx)."),
    reference_split: Optional[Path] = typer.Option(None, help="A split.csv: use its train rows under --reference."),
    images: int = typer.Option(512, help="Site images to measure the statistics on (a seeded random subset)."),
    reference_images: int = typer.Option(512, help="Reference images (a seeded random subset)."),
    class_map: list[str] = typer.Option([], "--class-map", help="LOCAL=CLASS for labelled site folders "
                                        "(repeatable), as in refit-ood."),
    seed: int = typer.Option(0, help="Seed of the subsets and of the OOD refit's held-out split."),
    threads: Optional[int] = typer.Option(None, help="CPU threads."),
    report: Optional[Path] = typer.Option(None, help="Write the adaptation report as JSON."),
    force: bool = typer.Option(False, "--force", help="Passed to the OOD refit: refit even though the adapted "
                               "model misclassifies labelled site images."),
) -> None:
    """Adapt MODEL to a new site without labels: re-measure every BatchNorm's statistics on the site's images
    (AdaBN), fold them back into the file's weights, then refit the OOD flag and the appearance check there.

    The graph is unchanged; the written file must reproduce the adapted PyTorch model (labels and logits on 16
    site images) and pass refit-ood's checks, or nothing is written. The spec records both steps under
    `adaptation`. The temperature and review thresholds stay MODEL's: validate the result on labelled site
    images (`cadbcnn-infer validate`) before use. The adapted file is this site's model, not the training lab's.

    Exit codes: 0 written; 3 a parity check failed or the model misclassifies labelled site images;
    2 bad arguments, model or data.
    """
    from .adapt_bn import adapt_model

    run_reported(lambda: adapt_model(model, output, data, reference, reference_split=reference_split, images=images,
                                     reference_images=reference_images, class_map=parse_class_map(class_map),
                                     force=force, seed=seed, threads=threads, log=typer.echo), report)
