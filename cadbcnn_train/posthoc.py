"""Post-hoc steps on a trained checkpoint (or ONNX file): evaluate, precise BN, OOD refit, calibration.

Each reads a checkpoint, changes or measures one derived thing and writes it back (or next to it); the
CLI commands ``evaluate``, ``recalibrate-bn``, ``refit-ood`` and ``calibrate`` call these.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from cadbcnn_runtime.appearance import check_quantile
from cadbcnn_runtime.calibration import TARGET_RISK, EachShift, fit_calibration, hold_on_shifted, hold_per_class
from cadbcnn_runtime.errors import ArgumentError, DatasetError
from cadbcnn_runtime.spec import ModelSpec

from . import data as D
from .augment import StainCopies
from .checkpoint import load_checkpoint, resave_checkpoint, weights_sha256
from .metrics import compute_metrics, metrics_summary, write_metrics
from .onnx_init import frozen_modules
from .ood import fit_ood, spec_entry
from .shifts import check_copies
from .train import fit_content_check, predict, recalibrate_bn


def evaluate(checkpoint: Path, data: Path, out: Path, *, split: str = "test", split_file: Path | None = None,
             batch_size: int = 64, store: bool = False) -> dict:
    """Evaluate a checkpoint on a split of DATA (through the runtime preprocessing)."""
    ck = load_checkpoint(checkpoint)
    model = ck.build_model()
    root = Path(data)
    if split == "all":
        ds = D.load(root, class_folders=ck.class_folders)
    else:
        sf = Path(split_file) if split_file else Path(checkpoint).parent / "split.csv"
        wanted = {root / r["path"] for r in D.split_rows(sf) if r["split"] == split}
        if not wanted:
            raise DatasetError(f"{sf}: has no rows for split {split!r}")
        ds = D.load(root, class_folders=ck.class_folders, only=wanted)
    samples = ds.samples
    loader = DataLoader(D.ImageDataset(samples, ck.spec, images=ds.images), batch_size=batch_size)
    logits, labels = predict(model.to(memory_format=torch.channels_last), loader, torch.device("cpu"))
    m = compute_metrics(labels.numpy(), logits.argmax(1).numpy(), ck.class_names)
    m["split"] = split
    m["checkpoint"] = str(checkpoint)
    write_metrics(m, Path(out), title=f"{ck.model_name} — {split} split")
    if store:  # record these metrics in the checkpoint and its spec (what the exporter embeds)
        resave_checkpoint(ck, Path(checkpoint), model=model, spec=ck.spec.replace(metrics=metrics_summary(m)), metrics=m)
    return m


def clean_train_loader(ck, data: Path, split_file: Path, *, images: int = 1024, seed: int = 0) -> DataLoader:
    """IMAGES clean images of SPLIT_FILE's train rows (a seeded pick, shuffled by the same seed), preprocessed by
    CK's spec: what precise BN and ``wise-ft`` average BatchNorm statistics over (no labels used)."""
    root = Path(data)
    train_rows = [root / r["path"] for r in D.split_rows(Path(split_file)) if r["split"] == "train"]
    if not train_rows:
        raise DatasetError(f"{split_file}: has no train rows; pass the split file the checkpoint was trained with")
    rng = np.random.default_rng(seed)
    pick = {train_rows[i] for i in rng.choice(len(train_rows), min(images, len(train_rows)), replace=False)}
    ds = D.load(root, class_folders=ck.class_folders, only=pick)
    return DataLoader(D.ImageDataset(ds.samples, ck.spec, images=ds.images), batch_size=32, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def recalibrate_checkpoint(checkpoint: Path, data: Path, *, split_file: Path | None = None,
                           out: Path | None = None, images: int = 1024, seed: int = 0, log=print) -> Path:
    """Precise-BN for an existing checkpoint (statistics from clean images of its train split)."""
    ck = load_checkpoint(checkpoint)
    model = ck.build_model()
    sf = Path(split_file) if split_file else Path(checkpoint).parent / "split.csv"
    loader = clean_train_loader(ck, data, sf, images=images, seed=seed)
    # A run trained with --freeze kept those modules as loaded; their statistics stay (see recalibrate_bn).
    frozen = frozen_modules(model, ck.config.get("freeze", "none"))
    n = recalibrate_bn(model, loader, torch.device("cpu"), "fp32", images, keep=frozen)
    dest = Path(out) if out else Path(checkpoint)
    # Everything derived from the old weights goes with them: the calibration (and the review threshold it
    # chose), the OOD statistics and threshold (fitted on the old features) and the metrics. The field-content
    # check reads the input only and stays.
    spec = ck.spec.replace(weights_sha256=weights_sha256(model.state_dict()), calibration=None,
                           review_threshold=ModelSpec.review_threshold, ood=None, metrics=None)
    resave_checkpoint(ck, dest, model=model, spec=spec, extra={"bn_recalibrated_on": n}, drop=("metrics", "ood"))
    stale = [what for what, had in (("calibration", ck.spec.calibration), ("OOD statistics", ck.ood or ck.spec.ood),
                                    ("metrics", ck.metrics or ck.spec.metrics)) if had]
    log(f"BatchNorm statistics recomputed on {n} clean train-split images → {dest}"
        + (f" (frozen at training, statistics kept: {', '.join(frozen)})" if frozen else "")
        + (f"; dropped, as they were computed on the old weights: {', '.join(stale)} — run "
           "`cadbcnn-train fit-ood`, `cadbcnn-train calibrate` and `cadbcnn-train evaluate --store` on it"
           if stale else ""))
    return dest


def refit_ood(checkpoint: Path, data: Path, *, split_file: Path | None = None, out: Path | None = None,
              flag_rate: float = 0.02, stain: StainCopies = StainCopies(), log=print) -> dict:
    """Fit (or refit) the OOD statistics of an existing checkpoint on its train split; threshold on val.

    ``stain`` (N > 0 copies) fits the statistics on the training images *and* N stain-jittered copies of each
    (``augment.stain_copies``, seeded by the run's seed): for a model trained to read other stains, whose features
    such copies hardly move, so a mild stain change is not flagged for its colour alone. The threshold is still set
    on the clean validation images."""
    ck = load_checkpoint(checkpoint)
    model = ck.build_model()
    sf = Path(split_file) if split_file else Path(checkpoint).parent / "split.csv"
    rows = D.split_rows(sf)
    root = Path(data)
    ds = D.load(root, class_folders=ck.class_folders,
                only={root / r["path"] for r in rows if r["split"] in ("train", "val")})
    which = {root / r["path"]: r["split"] for r in rows}
    parts = {k: [s for s in ds.samples if which.get(s.path) == k] for k in ("train", "val")}
    if not parts["train"] or not parts["val"]:
        raise DatasetError(f"{sf}: needs train and val rows that exist under {root}")

    def loader(samples):
        return DataLoader(D.ImageDataset(samples, ck.spec, images=ds.images), batch_size=64)

    fit_on = loader(parts["train"])
    if stain:
        clean = fit_on.dataset
        copies = stain.make([clean.image(i) for i in range(len(clean))], int(ck.config.get("seed", 0)))
        labels = [s.label for s in parts["train"]] * stain.copies
        fit_on = DataLoader(ConcatDataset([clean, D.ArrayDataset(copies, labels, ck.spec)]), batch_size=64)
    ood = fit_ood(model, fit_on, loader(parts["val"]), len(ck.class_names), flag_rate=flag_rate)
    if stain:
        ood["fitted_on"] = f"train split ({len(parts['train'])} images){stain.about(len(parts['train']))}"
    spec = ck.spec.replace(ood=spec_entry(ood))
    dest = Path(out) if out else Path(checkpoint)
    resave_checkpoint(ck, dest, model=model, spec=spec, ood=ood)
    log(f"OOD statistics fitted on the {ood['fitted_on']}; threshold {ood['threshold']:.4f} flags "
        f"{100 * ood['val_flagged']:.1f} % of {len(parts['val'])} validation images → {dest}")
    return ood


#: Default risk among kept *shifted* validation images for ``calibrate --shifted-copies`` (the shift target: 2 %).
SHIFTED_TARGET_RISK = 0.02


def calibrate_checkpoint(checkpoint: Path, data: Path, *, split_file: Path | None = None, out: Path | None = None,
                         target_risk: float = TARGET_RISK, shifted_copies: int = 0, per_class: bool = False,
                         shifted_target_risk: float = SHIFTED_TARGET_RISK, each_shift: bool = False,
                         log=print) -> dict:
    """Fit the temperature and the review threshold of an existing checkpoint on its validation split.

    With ``shifted_copies`` N > 0 the review threshold must also hold on N shifted copies of every validation
    image (``selection.ShiftedValidation``, seeded by the run's seed): at most ``shifted_target_risk`` of the kept
    shifted images wrong; the spec's threshold is the higher of the two, the temperature the clean one's.
    ``per_class`` holds it per predicted class; ``each_shift`` also on every shift's images."""
    check_shifted_options(shifted_copies, shifted_target_risk, per_class, each_shift)
    ck = load_checkpoint(checkpoint)
    model = ck.build_model()
    sf = Path(split_file) if split_file else Path(checkpoint).parent / "split.csv"
    root = Path(data)
    rows = D.split_rows(sf)
    which = {root / r["path"]: r["split"] for r in rows if r["split"] in ("train", "val")}
    ds = D.load(root, class_folders=ck.class_folders, only=set(which))
    parts = {k: [s for s in ds.samples if which.get(s.path) == k] for k in ("train", "val")}
    if not parts["val"] or not parts["train"]:
        raise DatasetError(f"{sf}: needs train and val rows that exist under {root} (calibration uses held-out "
                           "labelled images; the field-content check uses the training images)")
    loader = DataLoader(D.ImageDataset(parts["val"], ck.spec, images=ds.images), batch_size=64)
    logits, labels = predict(model.to(memory_format=torch.channels_last), loader, torch.device("cpu"))
    entry, review = fit_calibration(logits.numpy(), labels.numpy(), target_risk=target_risk,
                                    fitted_on=f"validation split ({len(parts['val'])} images)")
    clean_review = review
    if shifted_copies:
        from .selection import ShiftedValidation
        shifted = ShiftedValidation.of_split(parts["val"], ck.spec, images=ds.images, copies=shifted_copies,
                                             seed=int(ck.config.get("seed", 0)))
        s_logits, s_labels = predict(model, DataLoader(shifted, batch_size=64), torch.device("cpu"))
        fitted_on = f"{len(shifted)} shifted validation images ({shifted_copies} per image)"
        if per_class:  # no OOD statistics yet at this step (fit-ood comes after): every shifted image counts
            each = EachShift([s.name for s in shifted.shifts], logits.numpy()) if each_shift else None
            entry = hold_per_class(entry, review, s_logits.numpy(), s_labels.numpy(), None,
                                   class_names=ck.class_names, fitted_on=fitted_on, target_risk=shifted_target_risk,
                                   each_shift=each)
        else:
            entry, review = hold_on_shifted(entry, review, s_logits.numpy(), s_labels.numpy(),
                                            target_risk=shifted_target_risk, fitted_on=fitted_on)
    quality = fit_content_check(parts["train"], ck.spec, ds.images, what="training split")
    dest = Path(out) if out else Path(checkpoint)
    resave_checkpoint(ck, dest, model=model,
                      spec=ck.spec.replace(calibration=entry, review_threshold=review, quality=quality))
    if not shifted_copies:
        shifted_said = ""
    elif per_class:
        rec = entry["class_review"]
        shifted_said = (f" (raised per predicted class on {rec['fitted_on']}: " + ", ".join(
            f"{n} {t:.4f}" for n, t in rec["thresholds"].items()) + ")")
    else:
        shifted_said = (f" (clean rule {clean_review:.4f}; shifted rule {entry['shifted_review']['threshold']:.4f} on "
                        f"{entry['shifted_review']['fitted_on']}, accuracy "
                        f"{100 * entry['shifted_review']['accuracy']:.1f} %)")
    log(f"temperature {entry['temperature']:.4f} fitted on {len(parts['val'])} validation images (NLL "
        f"{entry['before']['nll']:.4f} → {entry['after']['nll']:.4f}, ECE {entry['before']['ece_15']:.4f} → "
        f"{entry['after']['ece_15']:.4f}); review threshold {review:.4f}{shifted_said} → {dest}")
    return entry


def check_shifted_options(shifted_copies: int, shifted_target_risk: float, per_class: bool,
                          each_shift: bool = False, review_score: bool = False,
                          appearance_quantile: float | None = None) -> None:
    """The shifted review rule's options, refused before any work."""
    check_copies(shifted_copies, "--shifted-copies")
    if not 0.0 <= shifted_target_risk <= 1.0:
        raise ArgumentError(f"--shifted-target-risk must be in [0, 1], got {shifted_target_risk}")
    if per_class and not shifted_copies:
        raise ArgumentError("--per-class raises the review threshold per predicted class on shifted validation "
                            "images: give --shifted-copies N too (e.g. --shifted-copies 23, every shift)")
    if each_shift and not per_class:
        raise ArgumentError("--each-shift holds the per-class review rule on every shift's images: give --per-class "
                            "and --shifted-copies N too (N = 23 gives every validation image every shift)")
    if review_score and (not each_shift or appearance_quantile is None):
        raise ArgumentError("--review-score is fitted with the each-shift rule on the appearance check's statistics: "
                            "give --shifted-copies 23 --per-class --each-shift --appearance-check 0.98 too")


def check_appearance_option(quantile: float | None, *, onnx: bool, stain: StainCopies = StainCopies()) -> None:
    """``calibrate --appearance-check`` (and its ``--stain-copies``), refused before any work."""
    if stain and quantile is None:
        raise ArgumentError("calibrate --stain-copies fits the appearance check on stain copies of the training "
                            "images too: give --appearance-check 0.98 as well (the OOD statistics take "
                            "`fit-ood --stain-copies`)")
    if quantile is None:
        return
    if not onnx:
        raise ArgumentError("--appearance-check is fitted on an exported model, with the flags its runtime computes: "
                            "export the checkpoint (`cadbcnn-export CHECKPOINT -o MODEL.onnx`, after fit-ood) and "
                            "calibrate MODEL.onnx")
    check_quantile(quantile, "--appearance-check")


def calibrate_onnx(model: Path, data: Path, *, split_file: Path | None, out: Path | None = None,
                   target_risk: float = TARGET_RISK, shifted_copies: int = 0, shifted_target_risk: float = 0.02,
                   per_class: bool = False, appearance_quantile: float | None = None, each_shift: bool = False,
                   review_score: bool = False, stain: StainCopies = StainCopies(), log=print) -> ModelSpec:
    """``calibrate`` for a model that exists only as ONNX (the model runs in ``cadbcnn_runtime.respec``, not torch).
    With ``shifted_copies``, the shifted validation images are those of ``calibrate CHECKPOINT`` (seeded by the
    spec's training seed). ``stain`` (N > 0 copies) fits the appearance check on N stain-jittered copies of every
    training image too (``augment.stain_copies``, same seed), as ``fit-ood --stain-copies`` does the OOD
    statistics."""
    from cadbcnn_runtime.preprocess import read_image
    from cadbcnn_runtime.respec import calibrate_model
    from cadbcnn_runtime.spec import ModelSpec as Spec

    check_shifted_options(shifted_copies, shifted_target_risk, per_class, each_shift, review_score,
                          appearance_quantile)
    check_appearance_option(appearance_quantile, onnx=True, stain=stain)

    if split_file is None:
        raise DatasetError(f"{model}: an ONNX model has no split.csv beside it; pass --split-file (the training "
                           "run's split)")
    spec = Spec.from_onnx(model)  # read once: the class folders, the seed of the shifted and stain copies
    folders = spec.training.get("class_folders")
    if not folders:
        raise DatasetError(f"{model}: its spec does not record the training class folders; use the checkpoint")
    root = Path(data)
    rows = D.split_rows(Path(split_file))
    val = [(root / r["path"], folders.index(r["label"])) for r in rows if r["split"] == "val"]
    train = [root / r["path"] for r in rows if r["split"] == "train"]
    train_labels = [folders.index(r["label"]) for r in rows if r["split"] == "train"]
    missing = [p for p, _ in val[:1]] + train[:1]
    if not val or not train or not all(p.is_file() for p in missing):
        raise DatasetError(f"{split_file}: needs train and val rows whose images exist under {root}")
    shifted: list[tuple] = []
    names = sources = None
    if shifted_copies:
        from .selection import ShiftedValidation

        sv = ShiftedValidation([read_image(p) for p, _ in val], [k for _, k in val], spec, copies=shifted_copies,
                               seed=int(spec.training.get("seed", 0)))
        shifted = list(zip(sv.images, sv.labels))
        names = [s.name for s in sv.shifts] if each_shift else None
        sources = [k // shifted_copies for k in range(len(sv.images))]  # ShiftedValidation's order
    extra, extra_about = [], ""
    if stain:
        clean = [read_image(p) for p in train]
        extra = list(zip(stain.make(clean, int(spec.training.get("seed", 0))), train_labels * stain.copies))
        extra_about = stain.about(len(train))
        del clean
    return calibrate_model(model, Path(out) if out else Path(model), val=val, train=train, target_risk=target_risk,
                           shifted=shifted, shifted_target_risk=shifted_target_risk, per_class=per_class,
                           shifted_about=f" ({shifted_copies} per image)", train_labels=train_labels,
                           appearance_quantile=appearance_quantile, shift_names=names, shift_sources=sources,
                           review_score=review_score, appearance_extra=extra,
                           appearance_extra_about=extra_about, log=log)
