"""`cadbcnn-export image-bn MODEL.onnx --reference OURS/ -o OUT.onnx`: every trunk BatchNorm mixes in the image's
own statistics (see ``image_bn``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_report import run_reported
from .image_bn import DEFAULT_ALPHA

app = typer.Typer(add_completion=False)


@app.command()
def image_bn(
    model: Path = typer.Argument(..., help="The exported FP32 model (e.g. models/cadbcnn.onnx)."),
    reference: Path = typer.Option(..., "--reference", help="Images of the lab MODEL was trained on (for the "
                                   "released model: the ALL dataset; with --reference-split, its training split)."),
    output: Path = typer.Option(..., "-o", "--output", help="The model to write."),
    reference_split: Optional[Path] = typer.Option(None, help="A split.csv: statistics and OOD fit on its train "
                                                   "rows, the OOD threshold on its val rows."),
    alpha: str = typer.Option(",".join(f"{a:g}" for a in DEFAULT_ALPHA), help="The image's share of each BatchNorm's statistics: one number "
                              "in [0, 1), or five comma-separated, one per stage (stem, layer1 … layer4)."),
    images: int = typer.Option(512, help="Reference images to measure the statistics on (a seeded random subset)."),
    seed: int = typer.Option(0, help="Seed of the subset."),
    threads: Optional[int] = typer.Option(None, help="CPU threads."),
    report: Optional[Path] = typer.Option(None, help="Write the step's report as JSON."),
) -> None:
    """Make MODEL read each image with BatchNorm statistics mixed from the training lab's and the image's own
    (mu = (1-a) mu_ref + a mu_img, likewise the variance; Schneider et al. 2020). A stain, exposure or camera that
    moves the feature statistics is partly undone per image: no site, batch or label needed.

    The reference statistics become constants of the graph (a few nodes after every trunk convolution). The
    written file must reproduce its PyTorch twin (16 images, half of them hue-shifted); its OOD statistics are
    refitted through the new graph. The temperature and review thresholds stay MODEL's: refit them with
    `cadbcnn-train calibrate OUT.onnx` before use.

    Exit codes: 0 written; 3 a parity check failed; 2 bad arguments, model or data.
    """
    from .image_bn import image_bn_model, parse_alpha

    run_reported(lambda: image_bn_model(model, output, reference, reference_split=reference_split,
                                        alpha=parse_alpha(alpha),
                                        images=images, seed=seed, threads=threads, log=typer.echo), report)
