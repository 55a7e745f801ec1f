"""`cadbcnn-export refit-ood MODEL.onnx --data DIR -o LOCAL.onnx`: the OOD flag refitted on a lab's own images,
torch-free (see ``ood_refit``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cadbcnn_runtime import oodstats
from cadbcnn_runtime.validate import parse_class_map

from .cli_report import run_reported
from .ood_refit import HOLDOUT

app = typer.Typer(add_completion=False)


@app.command()
def refit_ood(
    model: Path = typer.Argument(..., help="The exported model (FP32, e.g. models/cadbcnn.onnx)."),
    data: Path = typer.Option(..., "--data", help="Your in-distribution images (searched recursively). Class "
                              "sub-folders give class means; without them the model's own predictions are used."),
    output: Path = typer.Option(..., "-o", "--output", help="The adapted model to write (LOCAL.onnx)."),
    class_map: list[str] = typer.Option([], "--class-map", help="LOCAL=CLASS: a local folder name for one of "
                                        "the model's classes, e.g. healthy=Benign (repeatable)."),
    flag_rate: float = typer.Option(oodstats.FLAG_RATE, help="Share of your held-out images the new threshold "
                                    "flags."),
    holdout: float = typer.Option(HOLDOUT, help="Share of the images kept out of the fit to set the threshold."),
    limit: Optional[int] = typer.Option(None, help="Use at most N images (a seeded random subset)."),
    seed: int = typer.Option(0, help="Seed of the held-out split and of --limit."),
    report: Optional[Path] = typer.Option(None, help="Write the refit report as JSON."),
    force: bool = typer.Option(False, "--force", help="Refit even though the model misclassifies the labelled "
                               "images (the flag would then hide those errors)."),
    keep_appearance: bool = typer.Option(False, "--keep-appearance", help="Keep the model's appearance check "
                                         "(fitted on the source lab's images) instead of refitting it on yours."),
) -> None:
    """Refit the out-of-distribution statistics and threshold of MODEL on your own images.

    The graph is unchanged except the OOD constants; the spec records the new threshold and, under
    `adaptation`, which images were used and when. When MODEL carries an appearance check (colour and
    contrast of the training images of each class), it is refitted on the same images too: both describe
    what the source lab's images look like (--keep-appearance keeps it; it needs 30 fitted images of each
    class). The new file must reproduce the source's logits exactly
    and its OOD output must match the fitted statistics, or nothing is written.

    With labelled images (class sub-folders) the model must first classify them at least as well as
    `cadbcnn-infer validate` requires (97 %): a refitted flag no longer flags this site's images, so
    its errors would pass silently. Fine-tune first (`cadbcnn-train fit --init`), or --force.

    Exit codes: 0 written; 3 the parity check failed or the model misclassifies the labelled
    images; 2 bad arguments, model or data.
    """
    from .ood_refit import refit_model

    run_reported(lambda: refit_model(model, output, data, class_map=parse_class_map(class_map), flag_rate=flag_rate,
                                     holdout=holdout, limit=limit, seed=seed, force=force,
                                     appearance=not keep_appearance, log=typer.echo), report)
