"""Out-of-distribution score: class-conditional Gaussians on the fused features, and (models trained from v0.2.0
on) one Gaussian per early ResNet stage of each branch — the maximum of the parts' scaled Mahalanobis scores.

Each part is a squared Mahalanobis distance divided by its feature dimension (``cadbcnn_runtime.oodstats``,
the one home of the fitting math and the union rule that sets every part's scale). Its statistics are stored
as plain tensors in the checkpoint; the exporter adds ``OODHead`` to the graph as a second output, so the
runtime needs no extra code or dependencies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cadbcnn_runtime import oodstats
from cadbcnn_runtime.spec import OOD_OUTPUT_NAME

METHOD = oodstats.METHOD
OUTPUT_NAME = OOD_OUTPUT_NAME
FUSED = oodstats.FUSED
#: The ResNet stages whose feature maps the score reads, in every branch (``forward_stages`` names them
#: ``a_layer1`` … for CADBCNN's two trunks, ``layer1`` … for a single ResNet). ``layer4`` is left out: the fused
#: features already summarise it, and its 1,024-d statistics would add 4 MB per released file.
STAGES = ("layer1", "layer2", "layer3")


def pooled_statistics(fmap: Tensor) -> Tensor:
    """(B, C, H, W) → (B, 2C): the mean and the standard deviation of every channel over the feature map."""
    f = fmap.float()
    mean = f.mean(dim=(2, 3))
    var = (f * f).mean(dim=(2, 3)) - mean * mean
    return torch.cat([mean, var.clamp_min(0.0).sqrt()], dim=1)


def ood_features(model: nn.Module, x: Tensor, stages: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """(fused features, {part: features (B, D)}) of X in one pass; only the fused part where STAGES is false or
    the model has none."""
    if not stages or not hasattr(model, "forward_stages"):
        f = model.forward_features(x)
        return f, {FUSED: f}
    maps, fused = model.forward_stages(x)
    feats = {FUSED: fused}
    feats.update({k: pooled_statistics(m) for k, m in maps.items() if k.rsplit("_", 1)[-1] in STAGES})
    return fused, feats


def _score(features: Tensor, whitening: Tensor, means_w: Tensor) -> Tensor:
    z = features.float() @ whitening                           # (B, D)
    diff = z.unsqueeze(1) - means_w.unsqueeze(0)               # (B, K, D)
    return (diff * diff).sum(-1).min(dim=1).values / whitening.shape[0]  # (B,)


class _Part(nn.Module):
    def __init__(self, whitening: Tensor, means_w: Tensor):
        super().__init__()
        self.register_buffer("whitening", whitening.float())
        self.register_buffer("means_w", means_w.float())

    def forward(self, features: Tensor) -> Tensor:
        return _score(features, self.whitening, self.means_w)


class OODHead(nn.Module):
    """features (B, D) [and stage features] → the OOD score, shape (B,).

    The fused part's statistics are ``ood.whitening`` / ``ood.means_w`` in the graph; each stage's are
    ``ood.stages.<name>.whitening`` / ``.means_w`` (scales folded in). Without stages the score is the fused
    part's alone, as in every model before v0.2.0."""

    def __init__(self, whitening: Tensor, means_w: Tensor, stages: dict[str, tuple[Tensor, Tensor]] | None = None):
        super().__init__()
        self.register_buffer("whitening", whitening.float())
        self.register_buffer("means_w", means_w.float())
        self.stages = nn.ModuleDict({k: _Part(w, m) for k, (w, m) in (stages or {}).items()})
        self.dim = whitening.shape[0]

    def forward(self, features: Tensor, stage_features: dict[str, Tensor] | None = None) -> Tensor:
        score = _score(features, self.whitening, self.means_w)
        if not len(self.stages):
            return score
        parts = [score] + [part(stage_features[k]) for k, part in self.stages.items()]
        return torch.stack(parts, dim=0).amax(dim=0)


class WithOOD(nn.Module):
    """The classifier plus its OOD head: ``forward`` → (logits, ood_score)."""

    def __init__(self, model: nn.Module, head: OODHead):
        super().__init__()
        self.model, self.ood = model, head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f, feats = ood_features(self.model, x, stages=len(self.ood.stages) > 0)
        return self.model.forward_head(f), self.ood(f, feats)


@torch.no_grad()
def collect_features(model: nn.Module, loader: DataLoader, device=torch.device("cpu"), stages: bool = True
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({part: features (N, D), float64}, labels (N,)) of every image LOADER yields."""
    model.eval()
    feats: dict[str, list[Tensor]] = {}
    labels = []
    for x, y in loader:
        _, f = ood_features(model, x.to(device), stages)
        for k, v in f.items():
            feats.setdefault(k, []).append(v.float().cpu())
        labels.append(y)
    return {k: torch.cat(v).double().numpy() for k, v in feats.items()}, torch.cat(labels).numpy()


def fit_statistics(feats: Tensor, labels: Tensor, num_classes: int, shrinkage: float = oodstats.SHRINKAGE
                   ) -> tuple[Tensor, Tensor]:
    """Class means and a shrunk shared covariance → (whitening Σ^-1/2, whitened means); the math lives in
    ``cadbcnn_runtime.oodstats`` (shared with the torch-free refit of exported models)."""
    st = oodstats.fit_statistics(feats.double().numpy(), labels.numpy(), num_classes, shrinkage=shrinkage)
    return torch.from_numpy(st.whitening).float(), torch.from_numpy(st.means_w).float()


def fit_ood(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, num_classes: int, *,
            flag_rate: float = oodstats.FLAG_RATE, strict_rate: float = oodstats.STRICT_RATE,
            device=torch.device("cpu"), stages: bool = True) -> dict[str, Any]:
    """Fit on the training split; scales and threshold on the validation split (≤ flag_rate flagged in all, of
    which ≤ strict_rate by the stages alone). ``stages=False``: the fused part only (the rule before v0.2.0)."""
    ftr, ytr = collect_features(model, train_loader, device, stages)
    raw = oodstats.fit_parts(ftr, ytr, num_classes)
    fval, _ = collect_features(model, val_loader, device, stages)
    held = {k: st.scores(fval[k]) for k, st in raw.items()}
    flagged, strict = oodstats.flag_counts(len(fval[FUSED]), flag_rate, strict_rate)
    scales, threshold, rule = oodstats.part_scales(held, flagged=flagged, strict=strict)
    parts = {k: oodstats.scaled(st, scales[k]) for k, st in raw.items()}
    val_scores = oodstats.combined_scores(parts, fval)
    multi = len(parts) > 1

    def tensors(st: oodstats.OODStatistics) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(st.whitening).float(), torch.from_numpy(st.means_w).float()

    whitening, means_w = tensors(parts[FUSED])
    return {
        "method": oodstats.METHOD_MULTI if multi else METHOD,
        "feature": "forward_features (fused, pooled)" + (f" + mean/std of {', '.join(STAGES)} of every branch"
                                                         if multi else ""),
        "whitening": whitening,
        "means_w": means_w,
        "stages": {k: tensors(st) for k, st in parts.items() if k != FUSED},
        "parts": oodstats.describe_parts(raw, scales),
        "rule": rule,
        "threshold": threshold,
        "fitted_on": f"train split ({len(ftr[FUSED])} images)",
        "threshold_rule": oodstats.threshold_rule(flag_rate, len(val_scores), "the validation split", union=multi),
        "flag_rate": flag_rate,
        "val_flagged": float((val_scores > threshold).mean()),
    }


def head_from(ood: dict[str, Any]) -> OODHead:
    return OODHead(ood["whitening"], ood["means_w"], ood.get("stages"))


def spec_entry(ood: dict[str, Any]) -> dict[str, Any]:
    """What the model spec records about the OOD output (no tensors)."""
    extra = {k: ood[k] for k in ("parts", "rule", "flag_rate") if ood.get(k) is not None}
    return {"output": OUTPUT_NAME, "method": ood["method"], "feature": ood["feature"],
            "threshold": float(ood["threshold"]), "fitted_on": ood["fitted_on"],
            "threshold_rule": ood["threshold_rule"], "val_flagged": float(ood["val_flagged"]),
            "higher_is": "more out-of-distribution", **extra}
