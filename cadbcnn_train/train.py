"""The training loop — readable top to bottom.

``fit(cfg)`` loads the data through the runtime's preprocessing, splits it
(duplicates grouped), trains with AdamW + warm-up/cosine and class-weighted
cross-entropy under bf16 autocast (CPU) or AMP (CUDA), early-stops on
validation macro-F1 (or, with ``select_shifted``, on its mean with the macro-F1 of shifted validation
images: ``selection.py``), and writes ``best.pt``, ``last.pt``, ``config.json``,
``split.csv``, ``history.csv``, ``curves.png`` and the test ``metrics.json``.
Runs unchanged under ``torchrun`` (DistributedDataParallel; rank 0 writes).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import cadbcnn_runtime
from cadbcnn_runtime.calibration import fit_calibration, hold_on_shifted
from cadbcnn_runtime.preprocess import preprocess
from cadbcnn_runtime.quality import content_scores, fit_quality
from cadbcnn_runtime.errors import ArgumentError, CadbcnnError, DatasetError
from cadbcnn_runtime.spec import DATASET_CITATION, ModelSpec

from . import data as D
from .augment import RobustAugment
from .checkpoint import load_checkpoint, save_checkpoint, weights_sha256
from .config import TrainConfig, resume_mismatch
from .consistency import consistency_loss, teacher_logits, teacher_of, teacher_provenance, teacher_targets
from .metrics import compute_metrics, metrics_summary, write_metrics
from .model import PRETRAINED_SOURCES, TRUNK_LAYERS, create_model
from .onnx_init import (check_init_matches, freeze, init_adaptation, init_provenance, keep_frozen_bn_eval,
                        load_onnx_weights, rederive_batchnorm)
from .ood import fit_ood, spec_entry
from cadbcnn_runtime.machine import git_commit
from cadbcnn_runtime.progress import Progress
from .env import autocast, resolve_precision, setup_distributed, software_versions
from .ema import WeightEma
from .selection import CLEAN, SHIFT_AWARE, ShiftedValidation, selection_score

log = logging.getLogger("cadbcnn_train")


# ---------------------------------------------------------------------------
# Pretrained weights (only from the local torch cache; never downloaded)
# ---------------------------------------------------------------------------
def load_imagenet_weights(model: nn.Module, model_name: str) -> None:
    from torchvision import models as tvm

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    states = {}
    for arch in PRETRAINED_SOURCES[model_name]:
        weights = tvm.get_model_weights(arch).IMAGENET1K_V1
        file = cache / Path(weights.url).name
        if not file.is_file():
            raise CadbcnnError(
                f"--pretrained imagenet needs torchvision's {arch} ImageNet weights at {file}, which is not there "
                f"(this machine cannot download them). Copy {Path(weights.url).name} (from {weights.url}) into "
                f"{cache}/ — or set TORCH_HOME — or train from scratch without --pretrained.")
        states[arch] = torch.load(file, map_location="cpu", weights_only=True)
    if hasattr(model, "branch_a"):
        index = {name: str(i) for i, name in enumerate(TRUNK_LAYERS)}
        for branch, arch in zip((model.branch_a, model.branch_b), PRETRAINED_SOURCES[model_name]):
            sd = {}
            for k, v in states[arch].items():
                head, _, rest = k.partition(".")
                if head in index:
                    sd[f"{index[head]}.{rest}"] = v
            branch.load_state_dict(sd)
    else:
        sd = {k: v for k, v in states[model_name].items() if not k.startswith(("fc.", "classifier."))}
        model.net.load_state_dict(sd, strict=False)


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32"):
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits.append(model(x).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32",
                   max_images: int = 512, keep: tuple[str, ...] | list[str] = ()) -> int:
    """Precise BatchNorm: recompute running statistics as a plain average over clean training images.

    During training BN normalises with batch statistics of *augmented* images, and its exponential running
    averages lag behind weights that move fast at a high learning rate; evaluated with those stale averages
    a from-scratch model can look far worse than it is (measured here: 38 % → 97.7 % validation accuracy
    for the same weights). Returns the number of images used.

    ``keep``: names of modules (``freeze``'s list, e.g. ``branch_a.4``) whose BatchNorms keep their statistics —
    frozen modules must compute exactly what they computed before training (re-measuring the statistics of a
    BatchNorm whose scale and shift stay fixed would change its function).
    """
    def kept(name: str) -> bool:
        return any(name == k or name.startswith(k + ".") for k in keep)

    named = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bns = [m for n, m in named if not kept(n)]
    if not bns or max_images <= 0:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = plain mean over the batches seen
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    for n, m in named:
        if kept(n):
            m.eval()
    seen = 0
    for x, _ in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            model(x)
        seen += len(x)
        if seen >= max_images:
            break
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    for m, mode in modes:
        m.training = mode
    return seen


def fit_content_check(samples, spec: ModelSpec, images: dict | None, *, what: str) -> dict:
    """The spec's ``quality`` entry from clean (non-augmented) images, exactly as the runtime will see them."""
    ds = D.ImageDataset(samples, spec, images=images)
    scores = np.concatenate([content_scores(np.stack([preprocess(ds.image(i), spec)
                                                      for i in range(j, min(j + 64, len(ds)))]))
                             for j in range(0, len(ds), 64)])
    return fit_quality(scores, fitted_on=f"{what} ({len(ds)} images)")


def make_spec(cfg: TrainConfig, ds: D.LoadedDataset, split_counts: dict, *, metrics=None,
              weights: str | None = None, ood: dict | None = None, calibration: dict | None = None,
              review_threshold: float | None = None, quality: dict | None = None) -> ModelSpec:
    extra = {} if review_threshold is None else {"review_threshold": review_threshold}
    return ModelSpec(
        name=cfg.model,
        version=cadbcnn_runtime.__version__,
        class_names=ds.class_names,
        image_size=(cfg.image_size, cfg.image_size),
        training={
            "dataset": Path(cfg.data).name,
            "dataset_citation": DATASET_CITATION if Path(cfg.data).name == "all-leukemia" else None,
            "class_folders": list(ds.class_folders),
            "split": cfg.split,
            "split_counts": split_counts,
            "images": len(ds.samples),
            "skipped_images": len(ds.skipped),
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "pretrained": cfg.pretrained,
            "augment_parts": list(cfg.augment_parts),
            **({"robust_p": cfg.robust_p} if cfg.augment_parts else {}),
            **({"augment_part_p": dict(cfg.augment_part_p)} if cfg.augment_part_p else {}),
            **({"init": init_provenance(cfg.init), "freeze": cfg.freeze} if cfg.init else {}),
            **({"consistency": cfg.consistency} if cfg.consistency else {}),
            **({"teacher": teacher_provenance(Path(cfg.teacher))} if cfg.teacher else {}),
        },
        adaptation=init_adaptation(cfg.init, Path(cfg.data).name, len(ds.samples)) if cfg.init else (),
        metrics=metrics,
        ood=spec_entry(ood) if ood else None,
        calibration=calibration,
        quality=quality,
        software=software_versions(),
        git_commit=git_commit(),
        weights_sha256=weights,
        **extra,
    )


# ---------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------
@dataclass
class FitResult:
    out: Path
    best_val_f1: float  # clean validation macro-F1 of the kept epoch
    test_metrics: dict | None
    epochs_run: int
    seconds: float


def check_resume_matches(last, cfg: TrainConfig, out: Path) -> None:
    """``--resume`` continues the interrupted run in OUT only with its own training options (``RESUME_FREE`` aside)."""
    diff = resume_mismatch(last.config, cfg)
    if diff:
        said = "; ".join(f"{k}: run {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ArgumentError(f"{out / 'last.pt'}: --resume with other training options than the interrupted run "
                            f"({said}). Pass the run's own options (listed in {out / 'config.json'}), or train "
                            "into a new --out.")


def clean_epoch_loader(samples, spec: ModelSpec, images: dict | None, batch_size: int, seed: int, epoch: int,
                       workers: int = 0) -> DataLoader:
    """SAMPLES clean (non-augmented), shuffled by seed·1000 + EPOCH: the batches ``fit`` measures BatchNorm
    statistics on after each epoch, and (EPOCH −1) re-derives an ``--init`` model's BatchNorms on. ``wise-ft``
    rebuilds the −1 batches from here to start from the fine-tune's exact starting point."""
    return DataLoader(D.ImageDataset(samples, spec, images=images), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed * 1000 + epoch), num_workers=workers)


def fit(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False) -> FitResult:
    t_start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    di = setup_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", di.local_rank)
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP broadcasts it anyway)
    out = Path(cfg.out)
    say = (lambda *a: None) if (quiet or not di.main) else (lambda *a: print(*a, flush=True))
    last = load_checkpoint(out / "last.pt") if resume and (out / "last.pt").is_file() else None
    if last is not None:  # refused before any work: resuming with other options would train a run of two recipes
        check_resume_matches(last, cfg, out)

    # -- data ----------------------------------------------------------------
    ds = D.load(Path(cfg.data), max_per_class=cfg.max_per_class, seed=cfg.seed, cache=cfg.cache)
    if cfg.split_file:
        assignment = D.read_split_csv(Path(cfg.split_file), ds.root, ds.samples, ds.class_folders)
    else:
        assignment = D.make_split(ds.samples, mode=cfg.split, ratios=cfg.ratios, seed=cfg.seed,
                                  block_size=cfg.block_size)
    parts = {k: [s for s, a in zip(ds.samples, assignment) if a == k] for k in D.SPLITS}
    if not parts["train"] or not parts["val"]:
        raise DatasetError(f"{cfg.data}: too few images to split ({len(ds.samples)}); need a few per class.")
    split_counts = {k: ds.counts(v) for k, v in parts.items()}
    # The split's identity is computed on every rank, so a refused resume stops every rank (not rank 0 alone).
    split_text, split_hash = D.split_csv_text(ds.root, ds.samples, assignment, ds.class_folders)
    if last is not None and last.split_hash not in (None, split_hash):
        raise ArgumentError(f"{out / 'last.pt'}: the interrupted run was trained on another split (split "
                            f"hash {last.split_hash} ≠ {split_hash}); resume with the run's own "
                            f"--split-file {out / 'split.csv'}, or train into a new --out")
    if di.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "split.csv").write_text(split_text, encoding="utf-8")
        cfg.write(out / "config.json")
    spec = make_spec(cfg, ds, split_counts)
    say(f"data: {len(ds.samples)} images, {len(ds.skipped)} skipped as unreadable; split "
        + ", ".join(f"{k} {len(v)}" for k, v in parts.items()) + f"; device {device}, precision {precision}")

    augment = None
    if cfg.augment:
        augment = D.Augment(crop_scale=cfg.crop_scale)
        if cfg.augment_parts:
            augment = RobustAugment(parts=cfg.augment_parts, base=augment, p=cfg.robust_p,
                                    part_p=dict(cfg.augment_part_p))
    table = None  # the teacher's logits on the clean training images, from a --teacher file
    if cfg.teacher:
        table = teacher_targets(Path(cfg.teacher), [s.path.relative_to(ds.root).as_posix() for s in parts["train"]],
                                ds.class_names)
    train_set = D.ImageDataset(parts["train"], spec, images=ds.images, augment=augment,
                               with_clean=cfg.consistency > 0 and table is None, targets=table)
    sampler = DistributedSampler(train_set, num_replicas=di.world, rank=di.rank, shuffle=True, seed=cfg.seed) \
        if di.world > 1 else None
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                              num_workers=cfg.workers, drop_last=len(train_set) > cfg.batch_size, generator=g,
                              pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0)

    def bn_loader(epoch: int) -> DataLoader:  # clean (non-augmented) training images, a fresh sample per epoch
        return clean_epoch_loader(parts["train"], spec, ds.images, cfg.batch_size, cfg.seed, epoch, cfg.workers)

    def eval_loader(samples):
        return DataLoader(D.ImageDataset(samples, spec, images=ds.images), batch_size=max(cfg.batch_size, 64),
                          num_workers=cfg.workers)

    shifted_val = None
    if cfg.select_shifted:  # built once: the same shifted images score every epoch
        shifted_val = DataLoader(ShiftedValidation.of_split(parts["val"], spec, images=ds.images,
                                                            copies=cfg.select_shifted, seed=cfg.seed),
                                 batch_size=max(cfg.batch_size, 64), num_workers=cfg.workers)
        say(f"selection: {SHIFT_AWARE}, {len(shifted_val.dataset)} shifted validation images "
            f"({cfg.select_shifted} per image)")

    # -- model, loss, optimiser ---------------------------------------------
    num_classes = len(ds.class_names)
    model = create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs)
    if cfg.pretrained == "imagenet":
        load_imagenet_weights(model, cfg.model)
    frozen: list[str] = []
    if cfg.init and not (resume and (out / "last.pt").is_file()):
        check_init_matches(cfg, ds.class_names)
        info = load_onnx_weights(model, Path(cfg.init))
        used = rederive_batchnorm(model, bn_loader(-1), torch.device("cpu"))
        say(f"init: {info['modules']} modules from {cfg.init} ({info['folded_batchnorms']} folded BatchNorms "
            f"re-derived on {used} training images)")
    teacher = None
    if table is not None:
        say(f"consistency: weight {cfg.consistency} on KL(the teacher's logits from {cfg.teacher} on the clean image "
            "‖ this model on the augmented copy)")
    elif cfg.consistency:  # the starting model, frozen: its answers on clean images are the targets
        start = model
        if resume and (out / "last.pt").is_file():  # the model now holds the run's weights: read the file again
            start = create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs)
            load_onnx_weights(start, Path(cfg.init))  # eval-mode function = the graph's (BatchNorm as identity)
        teacher = teacher_of(start).to(device).to(memory_format=torch.channels_last)
        say(f"consistency: weight {cfg.consistency} on KL(the --init model on the clean image ‖ this model on the "
            "augmented copy)")
    if cfg.freeze != "none":
        frozen = freeze(model, cfg.freeze)
        say(f"frozen ({cfg.freeze}): {', '.join(frozen)}")
    model = model.to(device).to(memory_format=torch.channels_last)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if di.world > 1 else model
    ema = WeightEma(model, cfg.ema) if cfg.ema else None
    evaluated = ema.module if ema is not None else model  # what validation sees and the checkpoints hold

    counts = np.array([split_counts["train"][n] for n in ds.class_names], dtype=np.float64)
    weight = torch.tensor(counts.sum() / (num_classes * np.maximum(counts, 1)), dtype=torch.float32) \
        if cfg.class_weights else None
    criterion = nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None,
                                    label_smoothing=cfg.label_smoothing)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = len(train_loader) if cfg.max_steps is None else min(len(train_loader), cfg.max_steps)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps // 2)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None

    # -- resume ----------------------------------------------------------------
    start_epoch, best_f1, bad_epochs, history = 0, -1.0, 0, []
    if last is not None:
        if ema is not None:  # the checkpoint's model is the average; the live weights travel beside it
            model.load_state_dict(last.raw["train_state_dict"])
            ema.load(last.state_dict, last.raw["ema"])
        else:
            model.load_state_dict(last.state_dict)
        optimizer.load_state_dict(last.raw["optimizer"])
        scheduler.load_state_dict(last.raw["scheduler"])
        start_epoch, best_f1 = last.epoch + 1, float(last.raw["best_f1"])
        bad_epochs, history = int(last.raw["bad_epochs"]), list(last.raw["history"])
        torch.set_rng_state(last.raw["rng_state"])
        say(f"resumed from {out / 'last.pt'} at epoch {start_epoch + 1}")
    elif resume:
        say(f"--resume: no {out / 'last.pt'} yet; starting a new run")

    ckpt_common = dict(model_name=cfg.model, model_kwargs=cfg.model_kwargs, class_folders=ds.class_folders,
                       config=cfg.to_dict(), split_hash=split_hash)

    # -- loop ------------------------------------------------------------------
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        keep_frozen_bn_eval(model)
        t0 = time.time()
        seen = correct = 0
        loss_sum = 0.0
        bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", enabled=di.main and not quiet)
        for step, batch in enumerate(train_loader):
            if step >= steps_per_epoch:
                break
            x, y = batch[0], batch[-1]
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = net(x)
                loss = criterion(logits.float(), y)
                if teacher is not None:
                    clean = batch[1].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    loss = loss + cfg.consistency * consistency_loss(logits, teacher_logits(teacher, clean))
                elif table is not None:
                    loss = loss + cfg.consistency * consistency_loss(logits, batch[1].to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
            bar.update(step + 1, loss=loss_sum / seen, acc=correct / seen,
                       ips=seen * di.world / max(time.time() - t0, 1e-9))
        bar.close()
        train_time = time.time() - t0
        if cfg.bn_recal_images:
            recalibrate_bn(evaluated, bn_loader(epoch), device, precision, cfg.bn_recal_images, keep=frozen)

        logits, labels = predict(evaluated, eval_loader(parts["val"]), device, precision)
        val = compute_metrics(labels.numpy(), logits.argmax(1).numpy(), ds.class_names)
        val_loss = float(nn.functional.cross_entropy(logits, labels))
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
               "val_loss": val_loss, "val_acc": val["accuracy"], "val_f1_macro": val["f1_macro"],
               "lr": optimizer.param_groups[0]["lr"], "seconds": train_time,
               "images_per_s": seen * di.world / max(train_time, 1e-9)}
        shifted_f1, shifted_said = None, ""
        if shifted_val is not None:
            s_logits, s_labels = predict(evaluated, shifted_val, device, precision)
            sv = compute_metrics(s_labels.numpy(), s_logits.argmax(1).numpy(), ds.class_names)
            shifted_f1 = sv["f1_macro"]
            row.update(val_shifted_acc=sv["accuracy"], val_shifted_f1_macro=shifted_f1)
            shifted_said = f"  shifted acc {100 * sv['accuracy']:.2f}% F1 {100 * shifted_f1:.2f}"
        score = selection_score(val["f1_macro"], shifted_f1)
        row["selection_score"] = score
        history.append(row)
        improved = score > best_f1  # best_f1: the best selection score so far (the clean F1 without shifts)
        if improved:
            best_f1, bad_epochs = score, 0
        else:
            bad_epochs += 1
        say(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  acc {100 * row['train_acc']:.2f}%  "
            f"val_loss {val_loss:.4f}  val_acc {100 * val['accuracy']:.2f}%  val_F1 {100 * val['f1_macro']:.2f}"
            f"{shifted_said}  {train_time:.1f}s ({row['images_per_s']:.1f} img/s){'  *best*' if improved else ''}")
        if di.main:
            if improved:
                save_checkpoint(out / "best.pt", model=evaluated, spec=spec, epoch=epoch, **ckpt_common)
            resume_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "best_f1": best_f1, "bad_epochs": bad_epochs, "history": history,
                            "rng_state": torch.get_rng_state()}
            if ema is not None:
                resume_state.update(train_state_dict=model.state_dict(), ema=ema.state())
            save_checkpoint(out / "last.pt", model=evaluated, spec=spec, epoch=epoch, **ckpt_common,
                            extra=resume_state)
            write_history(out, history)
        if bad_epochs >= cfg.patience:
            say(f"early stop: the selection score ({SHIFT_AWARE if shifted_val is not None else CLEAN}) has not "
                f"improved for {cfg.patience} epochs")
            break

    # -- test ------------------------------------------------------------------
    # the kept epoch (best.pt): the first with the best selection score (rows of runs from before the score: clean F1)
    kept = max(history, key=lambda h: h.get("selection_score", h["val_f1_macro"])) if history else None
    kept_f1 = kept["val_f1_macro"] if kept else best_f1
    test_metrics = None
    if di.main:
        best = load_checkpoint(out / "best.pt") if (out / "best.pt").is_file() else None
        if best is not None:
            model.load_state_dict(best.state_dict)
        elif ema is not None:
            model.load_state_dict(ema.module.state_dict())
        if parts["test"]:
            logits, labels = predict(model, eval_loader(parts["test"]), device, "fp32")
            test_metrics = compute_metrics(labels.numpy(), logits.argmax(1).numpy(), ds.class_names)
            test_metrics["split"] = "test"
            write_metrics(test_metrics, out, title=f"{cfg.model} — test split")
        ood = None
        if cfg.fit_ood:
            ood = fit_ood(model, eval_loader(parts["train"]), eval_loader(parts["val"]), num_classes, device=device)
            say(f"OOD score fitted on the train split; threshold {ood['threshold']:.3f} flags "
                f"{100 * ood['val_flagged']:.1f} % of the validation split")
        calibration, review, quality = None, None, None
        if cfg.calibrate:
            quality = fit_content_check(parts["train"], spec, ds.images, what="training split")
            say(f"field-content check: images scoring below {quality['min_content']:.2f} ({quality['rule']}) "
                "are routed to review")
            logits, labels = predict(model, eval_loader(parts["val"]), device, "fp32")
            calibration, review = fit_calibration(logits.numpy(), labels.numpy(), target_risk=cfg.review_target_risk,
                                                  fitted_on=f"validation split ({len(parts['val'])} images)")
            say(f"calibration: temperature {calibration['temperature']:.3f} (validation NLL "
                f"{calibration['before']['nll']:.4f} → {calibration['after']['nll']:.4f}, ECE "
                f"{calibration['before']['ece_15']:.4f} → {calibration['after']['ece_15']:.4f}); review below "
                f"confidence {review:.4f}")
            if cfg.shifted_target_risk is not None:
                s_logits, s_labels = predict(model, shifted_val, device, "fp32")
                calibration, review = hold_on_shifted(calibration, review, s_logits.numpy(), s_labels.numpy(),
                                                      target_risk=cfg.shifted_target_risk,
                                                      fitted_on=f"{len(shifted_val.dataset)} shifted validation "
                                                                f"images ({cfg.select_shifted} per image)")
                rec = calibration["shifted_review"]
                say(f"shifted review rule: threshold {rec['threshold']:.4f} on {rec['fitted_on']} (accuracy "
                    f"{100 * rec['accuracy']:.1f} %); review below confidence {review:.4f}")
        final_spec = make_spec(cfg, ds, split_counts, metrics=metrics_summary(test_metrics),
                               weights=weights_sha256(model.state_dict()), ood=ood, calibration=calibration,
                               review_threshold=review, quality=quality)
        if best is not None:
            save_checkpoint(out / "best.pt", model=model, spec=final_spec, epoch=best.epoch,
                            metrics=test_metrics, ood=ood, **ckpt_common)
        summary = {"best_val_f1_macro": kept_f1, "selection": SHIFT_AWARE if cfg.select_shifted else CLEAN,
                   "best_selection_score": best_f1, "best_epoch": kept["epoch"] if kept else None,
                   "epochs_run": epoch + 1, "seconds": time.time() - t_start,
                   "skipped_images": ds.skipped, "precision": precision, "device": str(device), "world": di.world}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_curves(out, history)
        if ds.skipped:
            say(f"warning: {len(ds.skipped)} unreadable image(s) were skipped (listed in summary.json)")
        if test_metrics:
            say(f"test: accuracy {100 * test_metrics['accuracy']:.2f}%  macro-F1 {100 * test_metrics['f1_macro']:.2f}"
                f"  → {out / 'metrics.json'}")
    if di.world > 1:
        dist.barrier()
    return FitResult(out, kept_f1, test_metrics, epoch + 1, time.time() - t_start)


def write_history(out: Path, history: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in history for k in row))  # a resumed older run's rows lack new columns
    with (out / "history.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(history)


def plot_curves(out: Path, history: list[dict]) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=110)
    axes[0].plot(ep, [h["train_loss"] for h in history], label="train")
    axes[0].plot(ep, [h["val_loss"] for h in history], label="val")
    axes[0].set_title("loss")
    axes[1].plot(ep, [h["train_acc"] for h in history], label="train acc")
    axes[1].plot(ep, [h["val_acc"] for h in history], label="val acc")
    axes[1].plot(ep, [h["val_f1_macro"] for h in history], label="val macro-F1")
    axes[1].set_title("accuracy / F1")
    axes[2].plot(ep, [h["lr"] for h in history])
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png")
    plt.close(fig)


