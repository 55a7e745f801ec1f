"""Consistency with the starting model (``fit --init MODEL.onnx --consistency W``): fine-tune for robustness
without forgetting what the starting model knew.

A robust fine-tune of the released file learns to survive stain, exposure and scale shifts but loses 1–2 points
of clean accuracy (docs/SHIFT.md, the stage-1 runs). Here the starting model, frozen, is the teacher: it sees the
*clean* training image, the model being trained sees the augmented one, and the loss adds
``W · KL(teacher(clean) ‖ model(augmented))`` to the label's cross-entropy (knowledge distillation, Hinton et
al. 2015, with the teacher's view un-augmented as in consistency training, e.g. AugMix's clean-vs-augmented
term, Hendrycks et al. 2020). The teacher's answer on the clean image is what the model should give on every
augmented copy of it: the augmentation has to become invisible, and the clean answers stay the released ones.

The teacher's answer on a clean training image does not change during the run, so it can also come from a
**table** (``fit --consistency W --teacher TEACHER.json``, written by ``cadbcnn-train teacher MODEL.onnx``): the
same targets without the teacher's forward pass (a third of a step's cost), and without the teacher's weights —
so a model trained from scratch can learn from the released one (distillation) where its 67 MB cannot travel (the
GPU machine: docs/STATUS.md, "GPU sessions"). The table holds the raw logits of the model's graph on each clean
training image, keyed by its path relative to the data folder, with the model's name, class names and sha256.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cadbcnn_runtime.errors import ArgumentError

TEACHER_FORMAT = "cadbcnn-teacher-logits"


def teacher_of(model: nn.Module) -> nn.Module:
    """A frozen copy of MODEL (eval mode, no gradients): the starting point's answers, fixed for the run."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def consistency_loss(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(softmax(teacher) ‖ softmax(logits)), mean over the batch; zero when the two agree. Gradients reach
    ``logits`` only."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), F.log_softmax(teacher_logits.detach().float(), dim=1),
                    reduction="batchmean", log_target=True)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, clean: Tensor) -> Tensor:
    return teacher(clean)


def teacher_table(model_path: Path, class_names: Sequence[str], paths: Sequence[str], logits: np.ndarray) -> dict:
    """The ``--teacher`` file's content: LOGITS (N, C) of the model at MODEL_PATH on the clean images PATHS
    (relative to the data folder, POSIX)."""
    logits = np.asarray(logits, np.float64)
    if logits.shape != (len(paths), len(class_names)) or not np.isfinite(logits).all():
        raise ValueError(f"expected finite ({len(paths)}, {len(class_names)}) logits, got {logits.shape}")
    return {"format": TEACHER_FORMAT, "model": Path(model_path).name,
            "model_sha256": hashlib.sha256(Path(model_path).read_bytes()).hexdigest(),
            "class_names": list(class_names), "logits": {p: [float(v) for v in row] for p, row in zip(paths, logits)}}


def read_teacher(path: Path) -> dict:
    """A ``--teacher`` file, checked (ArgumentError naming the file and the fix)."""
    fix = "write it with `cadbcnn-train teacher MODEL.onnx --data DATA --out TEACHER.json`"
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArgumentError(f"--teacher {path}: not found; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArgumentError(f"--teacher {path}: not a readable JSON file ({exc}); {fix}") from None
    if not isinstance(raw, dict) or raw.get("format") != TEACHER_FORMAT or not isinstance(raw.get("logits"), dict):
        raise ArgumentError(f"--teacher {path}: not a teacher-logits file; {fix}")
    return raw


def teacher_provenance(path: Path) -> dict:
    """What the spec records of a ``--teacher`` file: the file's name and sha256, and the model it was written
    with."""
    raw = read_teacher(path)
    return {"file": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "model": raw.get("model"), "model_sha256": raw.get("model_sha256"), "images": len(raw["logits"])}


def teacher_targets(path: Path, rel_paths: Sequence[str], class_names: Sequence[str]) -> torch.Tensor:
    """(N, C) float32 teacher logits for the training images REL_PATHS from the ``--teacher`` file at PATH; refuses a
    file of other classes or without a row for one of the images."""
    raw = read_teacher(path)
    if list(raw.get("class_names", [])) != list(class_names):
        raise ArgumentError(f"--teacher {path}: its classes {raw.get('class_names')} are not this data's "
                            f"{list(class_names)}; write it with a model of the same classes")
    table = raw["logits"]
    missing = [p for p in rel_paths if p not in table]
    if missing:
        raise ArgumentError(f"--teacher {path}: no logits for {len(missing)} of the {len(rel_paths)} training images "
                            f"(first: {missing[0]}); write it on this data folder and split")
    rows = [table[p] for p in rel_paths]
    bad = next((p for p, row in zip(rel_paths, rows) if not isinstance(row, list) or len(row) != len(class_names)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            for v in row)), None)
    if bad is not None:
        raise ArgumentError(f"--teacher {path}: the row of {bad} is not {len(class_names)} finite logits; "
                            f"write the file again with `cadbcnn-train teacher`")
    return torch.tensor(rows, dtype=torch.float32)


def write_teacher(model: Path, data: Path, out: Path, *, split_file: Path | None = None, split: str = "train",
                  batch_size: int = 32, threads: int | None = None, log=print) -> dict:
    """Run the exported MODEL (ONNX Runtime, CPU) on the clean images of DATA — those of SPLIT in SPLIT_FILE, or
    every image without one — and write their logits to OUT (the ``fit --teacher`` file)."""
    from cadbcnn_runtime import Classifier
    from cadbcnn_runtime.atomic import write_atomic

    from . import data as D

    folders, names, samples = D.scan(Path(data))
    if split_file is not None:
        assignment = D.read_split_csv(Path(split_file), Path(data), samples, folders)
        samples = [s for s, a in zip(samples, assignment) if a == split]
        if not samples:
            raise ArgumentError(f"{split_file}: no {split!r} images under {data}; pass the split the student trains on")
    with Classifier.from_file(model, device="cpu", threads=threads) as clf:
        if list(clf.spec.class_names) != list(names):
            raise ArgumentError(f"{model}: its classes {list(clf.spec.class_names)} are not {data}'s {list(names)}")
        logits = []
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            logits.append(clf.run(np.stack([clf.preprocess(s.path) for s in chunk])))
            log(f"teacher: {min(i + batch_size, len(samples))}/{len(samples)} images")
    rel = [s.path.relative_to(Path(data)).as_posix() for s in samples]
    table = teacher_table(Path(model), names, rel, np.concatenate(logits))
    write_atomic(Path(out), (json.dumps(table) + "\n").encode())
    return table
