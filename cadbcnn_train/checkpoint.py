"""Checkpoints that hold everything needed to rebuild and export a model."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cadbcnn_runtime.errors import CheckpointError
from cadbcnn_runtime.spec import ModelSpec

from .model import create_model

FORMAT = "cadbcnn-checkpoint"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    model_name: str
    model_kwargs: dict[str, Any]
    class_folders: tuple[str, ...]
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    split_hash: str | None
    epoch: int
    metrics: dict[str, Any] | None
    ood: dict[str, Any] | None   # the OOD statistics (tensors); threshold and provenance live in spec.ood
    raw: dict[str, Any]

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names  # one home: the spec

    def build_model(self) -> nn.Module:
        """The model in eval mode with the checkpoint's weights."""
        model = create_model(self.model_name, num_classes=len(self.class_names), **self.model_kwargs)
        model.load_state_dict(self.state_dict)
        return model.eval()


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: Path, *, model: nn.Module, model_name: str, model_kwargs: dict, spec: ModelSpec,
                    class_folders, config: dict, split_hash: str | None, epoch: int,
                    metrics: dict | None = None, ood: dict | None = None, extra: dict | None = None) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "class_folders": list(class_folders),
        "spec": spec.to_dict(),
        "state_dict": state,
        "config": config,
        "split_hash": split_hash,
        "epoch": epoch,
        "metrics": metrics,
        "ood": ood_statistics(ood),
        **(extra or {}),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


_CORE_KEYS = ("format", "format_version", "model_name", "model_kwargs", "class_names", "class_folders", "spec",
              "state_dict", "config", "split_hash", "epoch", "metrics", "ood")


#: What a checkpoint keeps of a fitted OOD score: the statistics the graph needs. The threshold and its
#: provenance are facts of the model spec (``spec.ood``, from ``cadbcnn_train.ood.spec_entry``).
OOD_STATISTICS = ("method", "feature", "whitening", "means_w", "stages")


def ood_statistics(ood: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if ood is None else {k: ood[k] for k in OOD_STATISTICS if k in ood}


def resave_checkpoint(ck: Checkpoint, dest: Path, *, model: nn.Module, spec: ModelSpec | None = None,
                      metrics: dict | None = None, ood: dict | None = None, extra: dict | None = None,
                      drop: tuple[str, ...] = ()) -> None:
    """Write CK again with new weights/spec/metrics/OOD, keeping everything else it carried (e.g. resume state).

    ``drop``: derived fields ("metrics", "ood") to remove rather than keep — they were computed on weights that
    changed. The caller drops them from ``spec`` too.
    """
    unknown = set(drop) - {"metrics", "ood"}
    if unknown:
        raise ValueError(f"drop: unknown fields {sorted(unknown)}")
    kept = {k: v for k, v in ck.raw.items() if k not in _CORE_KEYS}
    save_checkpoint(dest, model=model, model_name=ck.model_name, model_kwargs=ck.model_kwargs,
                    spec=spec or ck.spec, class_folders=ck.class_folders, config=ck.config, split_hash=ck.split_hash,
                    epoch=ck.epoch,
                    metrics=None if "metrics" in drop else metrics if metrics is not None else ck.metrics,
                    ood=None if "ood" in drop else ood if ood is not None else ck.ood, extra={**kept, **(extra or {})})


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found. Train one with `cadbcnn-train fit` "
                              "(it writes OUT/best.pt).")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/foreign files
        raise CheckpointError(f"{path}: cannot be read as a cadbcnn checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}). Pass the best.pt written by "
                              "`cadbcnn-train fit`.") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cadbcnn checkpoint (no '{FORMAT}' marker) — a plain state_dict or "
                              "another project's file? Pass the best.pt written by `cadbcnn-train fit`.")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {raw.get('format_version')} is not supported "
                              f"(this cadbcnn reads {FORMAT_VERSION}); retrain or use the matching release.")
    try:
        spec = ModelSpec.from_dict(raw["spec"], source=str(path))
        if "class_names" in raw and tuple(raw["class_names"]) != spec.class_names:  # written by cadbcnn ≤ 0.1
            raise CheckpointError(f"{path}: its class names {raw['class_names']} differ from its spec's "
                                  f"{list(spec.class_names)}; the file was edited or damaged.")
        if bool(raw.get("ood")) != bool(spec.ood):
            raise CheckpointError(f"{path}: OOD statistics and the spec's OOD entry must come together (statistics "
                                  f"{'present' if raw.get('ood') else 'absent'}, spec entry "
                                  f"{'present' if spec.ood else 'absent'}); run `cadbcnn-train fit-ood` on it.")
        return Checkpoint(
            path=path,
            model_name=raw["model_name"],
            model_kwargs=dict(raw["model_kwargs"]),
            class_folders=tuple(raw["class_folders"]),
            spec=spec,
            state_dict=raw["state_dict"],
            config=dict(raw["config"]),
            split_hash=raw.get("split_hash"),
            epoch=int(raw["epoch"]),
            metrics=raw.get("metrics"),
            ood=ood_statistics(raw.get("ood")),
            raw=raw,
        )
    except KeyError as exc:
        raise CheckpointError(f"{path}: checkpoint is missing the field {exc}; it is damaged or from an "
                              "incompatible version.") from None
