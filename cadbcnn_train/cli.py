"""`cadbcnn-train`: fit and evaluate models. Exit codes: ``cadbcnn_runtime.exits`` (every command wears
``cli_errors``)."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from cadbcnn_runtime.exits import cli_errors

from .config import FREEZE_CHOICES, MODEL_NAMES, PRECISIONS, SPLITS, STAIN_KEEP


def _choices(name: str, values) -> type[Enum]:
    """A str Enum of VALUES, so typer shows the choices and refuses anything else (exit 2) before any work."""
    return Enum(name, {v: v for v in values}, type=str)


ModelName = _choices("ModelName", MODEL_NAMES)
SplitKind = _choices("SplitKind", SPLITS)
Precision = _choices("Precision", PRECISIONS)
FreezeChoice = _choices("FreezeChoice", FREEZE_CHOICES)
EvalSplit = _choices("EvalSplit", ("test", "val", "train", "all"))
StainKeep = _choices("StainKeep", STAIN_KEEP)

STAIN_KEEP_HELP = ("With --stain-copies: what each copy keeps of its image — nothing (the stain part's whole change, "
                   "lightness included) or lightness (the image's own CIELAB L*, only hue and chroma from the copy, "
                   "so the checks still see exposure).")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train and evaluate CADBCNN and its baselines on a folder-per-class image dataset.")


@app.command()
@cli_errors
def fit(
    data: Path = typer.Option(..., help="Dataset root with one sub-folder per class."),
    out: Path = typer.Option(..., help="Output folder (checkpoints, config, split, history, metrics)."),
    model: ModelName = typer.Option("cadbcnn", help="The architecture (CADBCNN or a baseline of the paper)."),
    epochs: int = typer.Option(30),
    batch_size: int = typer.Option(32),
    image_size: int = typer.Option(224),
    lr: float = typer.Option(1e-3),
    weight_decay: float = typer.Option(0.05),
    label_smoothing: float = typer.Option(0.05),
    seed: int = typer.Option(0),
    split: SplitKind = typer.Option("stratified", help="stratified (image-level, duplicates grouped) | grouped "
                                                 "(blocks of consecutive file numbers kept together)"),
    split_file: Optional[Path] = typer.Option(None, help="Reuse a split.csv (path,label,split)."),
    block_size: int = typer.Option(20, help="File-number block size for --split grouped."),
    max_per_class: Optional[int] = typer.Option(None, help="Cap images per class (smoke runs)."),
    no_augment: bool = typer.Option(False, "--no-augment"),
    augment_parts: Optional[str] = typer.Option(None, help="Robust augmentation on top of the standard one: "
                                                "'robust' (all parts) or a comma list of scalebar, scale, stain, "
                                                "exposure, degrade; PART=SHARE draws that part at its own rate (e.g. "
                                                "scale=1,stain,exposure,degrade)."),
    robust_p: float = typer.Option(1.0, min=0.0, max=1.0, help="With --augment-parts: the share of training images "
                                   "that get them (the others: standard augmentation only)."),
    no_class_weights: bool = typer.Option(False, "--no-class-weights"),
    precision: Precision = typer.Option("auto", help="auto: bf16 on CPUs with AVX512-BF16, AMP on CUDA, else fp32."),
    patience: int = typer.Option(10, help="Early stopping patience in epochs (val macro-F1)."),
    workers: int = typer.Option(0, help="DataLoader worker processes."),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads."),
    pretrained: Optional[str] = typer.Option(None, help="'imagenet': torchvision weights from the local torch cache."),
    init: Optional[Path] = typer.Option(None, help="Start from an exported model's weights (e.g. "
                                        "models/cadbcnn.onnx) to fine-tune it on your images; class folders and "
                                        "--image-size must match the model's."),
    freeze: FreezeChoice = typer.Option("none", help="With --init: none | early (each branch's stem and first two "
                                        "stages stay fixed) | backbone (only the fusion and the head learn)."),
    consistency: float = typer.Option(0.0, help="With --init: add this weight times KL(the --init model on the "
                                      "clean image ‖ the model on its augmented copy) to the loss, so the fine-tune "
                                      "learns the augmentation without forgetting the starting model's answers "
                                      "(e.g. 1.0); 0 = off."),
    teacher: Optional[Path] = typer.Option(None, help="With --consistency: the teacher's logits on the clean "
                                           "training images from this file (`cadbcnn-train teacher`) instead of "
                                           "the --init model's forward pass; --init is then optional (a model "
                                           "trained from scratch learns from the teacher's answers)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop each epoch after N steps (smoke tests)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Decode images every epoch instead of caching in RAM."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT/last.pt."),
    no_ood: bool = typer.Option(False, "--no-ood", help="Do not fit the out-of-distribution score at the end."),
    no_calibrate: bool = typer.Option(False, "--no-calibrate", help="Do not fit the temperature and the review "
                                      "threshold on the validation split at the end."),
    review_target_risk: float = typer.Option(0.005, min=0.0, max=1.0, help="Review rule: the lowest confidence at "
                                             "which at most this fraction of non-reviewed validation images is wrong."),
    bn_recal_images: int = typer.Option(512, help="Recompute BatchNorm statistics on N clean training images "
                                        "before each validation (precise BN; 0 = off)."),
    ema: float = typer.Option(0.0, help="Validate, keep and export a moving average of the weights with this "
                              "decay per step (e.g. 0.997; ramped up as min(decay, (1 + n)/(10 + n)) after n "
                              "steps); 0 = off."),
    select_shifted: int = typer.Option(0, help="Keep (and early-stop on) the epoch with the best mean of clean "
                                       "and shifted validation macro-F1, scoring N copies of every validation "
                                       "image under the shift report's acquisition shifts (N of them, each "
                                       "shift used about equally); 0 = clean validation macro-F1 only."),
    shifted_target_risk: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="With --select-shifted: the "
                                                        "end-of-run review rule must also hold on those shifted "
                                                        "validation images, at most this fraction of the kept ones "
                                                        "wrong (e.g. 0.02; as `calibrate --shifted-copies`)."),
) -> None:
    """Train a model. Runs unchanged under `torchrun --nproc_per_node=N` (DDP)."""
    from .augment import parse_augment_parts
    from .config import TrainConfig
    from .train import fit as run_fit

    parts, shares = parse_augment_parts(augment_parts)  # ArgumentError (exit 2) before any work
    cfg = TrainConfig(data=str(data), out=str(out), model=model.value, epochs=epochs, batch_size=batch_size,
                      image_size=image_size, lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing,
                      seed=seed, split=split.value, split_file=str(split_file) if split_file else None,
                      block_size=block_size, max_per_class=max_per_class, augment=not no_augment,
                      class_weights=not no_class_weights, precision=precision.value, patience=patience,
                      workers=workers, threads=threads, pretrained=pretrained, max_steps=max_steps,
                      init=str(init) if init else None, freeze=freeze.value, consistency=consistency,
                      teacher=str(teacher) if teacher else None,
                      cache=not no_cache, fit_ood=not no_ood, bn_recal_images=bn_recal_images,
                      calibrate=not no_calibrate, review_target_risk=review_target_risk,
                      augment_parts=parts, robust_p=robust_p, augment_part_p=shares, ema=ema,
                      select_shifted=select_shifted, shifted_target_risk=shifted_target_risk)
    run_fit(cfg, resume=resume)


@app.command()
@cli_errors
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `cadbcnn-train fit` (best.pt)."),
    data: Path = typer.Option(..., help="Dataset root with one sub-folder per class."),
    split: EvalSplit = typer.Option("test", help="The split to evaluate."),
    split_file: Optional[Path] = typer.Option(None, help="Split CSV (default: split.csv next to the checkpoint)."),
    out: Path = typer.Option(..., help="Folder for metrics.json, metrics.md and confusion_matrix.png."),
    store: bool = typer.Option(False, "--store", help="Also record the metrics in the checkpoint's model spec "
                               "(exported into the ONNX metadata)."),
) -> None:
    """Evaluate a checkpoint: accuracy, per-class P/R/F1, confusion matrix."""
    from .metrics import metrics_markdown
    from .posthoc import evaluate as run_eval

    m = run_eval(checkpoint, data, out, split=split.value, split_file=split_file, store=store)
    typer.echo(metrics_markdown(m, f"{checkpoint} — {split.value}"))


@app.command("recalibrate-bn")
@cli_errors
def recalibrate_bn_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `cadbcnn-train fit`."),
    data: Path = typer.Option(..., help="The dataset root the checkpoint was trained on."),
    split_file: Optional[Path] = typer.Option(None, help="Split CSV (default: split.csv next to the checkpoint)."),
    out: Optional[Path] = typer.Option(None, help="Write the updated checkpoint here (default: in place)."),
    images: int = typer.Option(1024, help="Clean training images to average the statistics over."),
) -> None:
    """Precise BatchNorm for an existing checkpoint (clean train-split images; no labels used)."""
    from .posthoc import recalibrate_checkpoint

    recalibrate_checkpoint(checkpoint, data, split_file=split_file, out=out, images=images, log=typer.echo)


@app.command("wise-ft")
@cli_errors
def wise_ft_cmd(
    checkpoint: Path = typer.Argument(..., help="A fine-tune written by `cadbcnn-train fit --init MODEL.onnx`."),
    toward: Optional[Path] = typer.Option(None, help="The ONNX file the fine-tune started from (default: its "
                                                     "--init path as recorded; the sha256 must match either way)."),
    alpha: float = typer.Option(..., help="The fine-tune's weight in [0, 1]: 0 = the start model, 1 = the fine-tune."),
    data: Path = typer.Option(..., help="The dataset root the checkpoint was trained on."),
    out: Path = typer.Option(..., help="Write the interpolated checkpoint here."),
    split_file: Optional[Path] = typer.Option(None, help="Split CSV (default: split.csv next to the checkpoint)."),
    images: int = typer.Option(1024, help="Clean training images for the BatchNorm statistics."),
) -> None:
    """WiSE-FT: interpolate a fine-tune's weights toward the model it started from, then precise BN."""
    from .wise import interpolate_checkpoint

    interpolate_checkpoint(checkpoint, toward, alpha, data, out, split_file=split_file, images=images,
                           log=typer.echo)


@app.command("fit-ood")
@cli_errors
def fit_ood_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `cadbcnn-train fit`."),
    data: Path = typer.Option(..., help="The dataset root the checkpoint was trained on."),
    split_file: Optional[Path] = typer.Option(None, help="Split CSV (default: split.csv next to the checkpoint)."),
    out: Optional[Path] = typer.Option(None, help="Write the updated checkpoint here (default: in place)."),
    flag_rate: float = typer.Option(0.02, help="Fraction of the validation split the threshold may flag."),
    stain_copies: int = typer.Option(0, help="Also fit the statistics on N stain-jittered copies of every training "
                                     "image (the `stain` augmentation part, seeded by the run's seed), for a model "
                                     "trained to read other stains (v0.2.0: 2). 0 = the clean training images only."),
    stain_keep: StainKeep = typer.Option("nothing", help=STAIN_KEEP_HELP),
) -> None:
    """(Re)fit the out-of-distribution score of an existing checkpoint (train split; threshold on val)."""
    from .augment import StainCopies
    from .posthoc import refit_ood

    stain = StainCopies(stain_copies, stain_keep.value)  # refused before any work
    refit_ood(checkpoint, data, split_file=split_file, out=out, flag_rate=flag_rate, stain=stain, log=typer.echo)


@app.command()
@cli_errors
def calibrate(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `cadbcnn-train fit`, or an exported .onnx "
                                      "model (then --split-file and --out are required; torch is not used)."),
    data: Path = typer.Option(..., help="The dataset root the checkpoint was trained on."),
    split_file: Optional[Path] = typer.Option(None, help="Split CSV (default: split.csv next to the checkpoint)."),
    out: Optional[Path] = typer.Option(None, help="Write the updated checkpoint / model here (default: in place)."),
    target_risk: float = typer.Option(0.005, min=0.0, max=1.0, help="Review rule: the lowest confidence at which "
                                      "at most this fraction of non-reviewed validation images is wrong."),
    shifted_copies: int = typer.Option(0, help="Also hold the review rule on N shifted copies of every validation "
                                       "image (the shift report's acquisition shifts, as `fit --select-shifted`; 23 = "
                                       "every shift): review below the higher of the two thresholds. 0 = off."),
    shifted_target_risk: float = typer.Option(0.02, min=0.0, max=1.0, help="With --shifted-copies: at most this "
                                              "fraction of non-reviewed shifted validation images is wrong."),
    per_class: bool = typer.Option(False, "--per-class", help="With --shifted-copies: hold the shifted rule per "
                                   "predicted class — each class's threshold is raised until at most "
                                   "--shifted-target-risk of the kept shifted images given that class are wrong — "
                                   "instead of one threshold for every class."),
    appearance_check: Optional[float] = typer.Option(
        None, help="Also fit the appearance check (ONNX models): review an image whose colour and contrast "
                   "statistics are farther from the training images of its predicted class than this quantile of "
                   "those images' own distances (e.g. 0.98, the released file's). With --per-class the thresholds are fitted on the "
                   "images it keeps. Off by default; calibrating without it removes a model's check."),
    each_shift: bool = typer.Option(False, "--each-shift", help="With --per-class: hold --shifted-target-risk on "
                                    "every shift's images (silent errors among all of that shift's copies, the "
                                    "shift report's measure) instead of each class's pooled ones, reviewing as few "
                                    "clean validation images as that allows (the released file's rule, at 0.015)."),
    review_score: bool = typer.Option(False, "--review-score", help="With --each-shift and --appearance-check: also "
                                      "fit a learned review score (P(label right) from the confidence, the OOD score "
                                      "and the appearance distances, per predicted class; thresholds chosen on "
                                      "cross-fitted scores by the each-shift rule). The runtime then applies it in "
                                      "place of the per-class confidence thresholds."),
    stain_copies: int = typer.Option(0, help="With --appearance-check: fit the check on N stain-jittered copies of "
                                     "every training image too (as `fit-ood --stain-copies`; v0.2.0: 2), so that a "
                                     "stain the model was trained to read is not reviewed for its colour alone."),
    stain_keep: StainKeep = typer.Option("nothing", help=STAIN_KEEP_HELP),
) -> None:
    """Fit the temperature (validation NLL), the review threshold (validation risk–coverage) and the
    field-content check (training split) of a checkpoint or of an exported ONNX model."""
    from .augment import StainCopies
    from .posthoc import calibrate_checkpoint, calibrate_onnx, check_appearance_option, check_shifted_options

    # refused before any work
    check_shifted_options(shifted_copies, shifted_target_risk, per_class, each_shift, review_score, appearance_check)
    stain = StainCopies(stain_copies, stain_keep.value)
    check_appearance_option(appearance_check, onnx=checkpoint.suffix == ".onnx", stain=stain)
    if checkpoint.suffix == ".onnx":
        calibrate_onnx(checkpoint, data, split_file=split_file, out=out, target_risk=target_risk,
                       shifted_copies=shifted_copies, shifted_target_risk=shifted_target_risk, per_class=per_class,
                       appearance_quantile=appearance_check, each_shift=each_shift, review_score=review_score,
                       stain=stain, log=typer.echo)
    else:
        calibrate_checkpoint(checkpoint, data, split_file=split_file, out=out, target_risk=target_risk,
                             shifted_copies=shifted_copies, shifted_target_risk=shifted_target_risk,
                             per_class=per_class, each_shift=each_shift, log=typer.echo)


@app.command()
@cli_errors
def explain(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `cadbcnn-train fit`."),
    data: Path = typer.Option(..., help="The dataset root."),
    out: Path = typer.Option(..., help="Folder for gradcam.png and tsne.png."),
    split_file: Optional[Path] = typer.Option(None, help="Split CSV (default: split.csv next to the checkpoint)."),
    split: str = typer.Option("test"),
    per_class: int = typer.Option(2, help="Correct and wrong examples per class in the Grad-CAM figure."),
) -> None:
    """Grad-CAM overlays (each branch's last conv block) and t-SNE of fused / per-branch features."""
    from .explain import explain as run_explain

    run_explain(checkpoint, data, out, split_file=split_file, split=split, per_class=per_class, log=typer.echo)


@app.command("ood-report")
@cli_errors
def ood_report_cmd(
    model: Path = typer.Argument(..., help="An exported ONNX model with an OOD output."),
    data: Path = typer.Option(..., help="The dataset root."),
    split_file: Path = typer.Option(..., help="split.csv of the model's training run."),
    out: Path = typer.Option(..., help="Folder for ood_report.md / .json."),
    split: str = typer.Option("test", help="Whose images are the in-distribution reference and the source of the "
                                           "shifted sets: test (the published report) or val (the release gate)."),
    limit: Optional[int] = typer.Option(None, help="Use at most N images of the split."),
    n_foreign: int = typer.Option(100, help="Images in each synthetic non-blood set."),
    min_foreign_flagged: Optional[float] = typer.Option(
        None, help="Gate: fail (exit 3) unless every foreign set is flagged at least this often (e.g. 0.9)."),
) -> None:
    """Fraction flagged and AUROC of the OOD score on shifted and foreign image sets (optionally a gate)."""
    from .ood_eval import ood_report

    ood_report(model, data, split_file, out, split=split, limit=limit, n_foreign=n_foreign,
               min_foreign_flagged=min_foreign_flagged)  # a failed gate raises OODGateError carrying the report
    typer.echo((out / "ood_report.md").read_text())


@app.command("shift-report")
@cli_errors
def shift_report_cmd(
    model: Path = typer.Argument(..., help="An exported ONNX model (run through the torch-free runtime, CPU)."),
    data: Path = typer.Option(..., help="The dataset root the split file's paths are relative to."),
    split_file: Path = typer.Option(..., help="split.csv of the model's training run."),
    out: Path = typer.Option(..., help="Folder for shift_report.md / .json, reliability.png, risk_coverage.png."),
    split: str = typer.Option("test", help="The split whose images are the clean set and the source of the "
                                           "shifted sets (each shifted image keeps its class label)."),
    external: Optional[list[str]] = typer.Option(
        None, help="DIR or DIR:healthy (repeatable): another lab's images, for reporting only. Labelled when its "
                   "sub-folders are the model's class folders; with :healthy any malignant label without review "
                   "is a silent error."),
    limit: Optional[int] = typer.Option(None, help="Use at most N images of the split (evenly strided)."),
    seed: int = typer.Option(0, help="Seed of the random shifts (stain jitter, sensor noise)."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads."),
    predictions: bool = typer.Option(False, "--predictions", help="Also write predictions.csv: one row per image "
                                     "of every set (label, calibrated probabilities, OOD score, review flags)."),
) -> None:
    """Silent errors (wrong label, no review) on the clean split, shifted copies, blank fields and external folders."""
    from .shift_report import shift_report

    shift_report(model, data, split_file, out, split=split, externals=external or (), limit=limit, seed=seed,
                 threads=threads, predictions=predictions, log=typer.echo)
    typer.echo((out / "shift_report.md").read_text())


@app.command("teacher")
@cli_errors
def teacher_cmd(
    model: Path = typer.Argument(..., help="The teacher: an exported model (e.g. models/cadbcnn.onnx)."),
    data: Path = typer.Option(..., help="Dataset root with one sub-folder per class (the student's)."),
    out: Path = typer.Option(..., help="Where to write the teacher file (JSON)."),
    split_file: Optional[Path] = typer.Option(None, help="Only the images of --split in this split.csv (default: "
                                              "every image under --data)."),
    split: str = typer.Option("train", help="With --split-file: which split's images."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads."),
) -> None:
    """The teacher's logits on clean training images, for `fit --consistency W --teacher FILE`."""
    from .consistency import write_teacher

    t = write_teacher(model, data, out, split_file=split_file, split=split, threads=threads,
                      log=lambda m: None)
    typer.echo(f"{out}: logits of {t['model']} on {len(t['logits'])} images")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
