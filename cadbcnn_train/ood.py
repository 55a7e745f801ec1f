"""Out-of-distribution score: class-conditional Gaussians with a shared covariance
(Mahalanobis distance) on the model's fused, pooled features.

The score is the squared Mahalanobis distance to the nearest class mean divided
by the feature dimension (≈ 1 for typical training images). Its statistics are
stored as plain tensors in the checkpoint; the exporter adds ``OODHead`` to the
graph as a second output, so the runtime needs no extra code or dependencies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cadbcnn_runtime import oodstats
from cadbcnn_runtime.spec import OOD_OUTPUT_NAME

METHOD = oodstats.METHOD
OUTPUT_NAME = OOD_OUTPUT_NAME


class OODHead(nn.Module):
    """features (B, D) → squared whitened distance to the nearest class mean / D, shape (B,)."""

    def __init__(self, whitening: Tensor, means_w: Tensor):
        super().__init__()
        self.register_buffer("whitening", whitening.float())
        self.register_buffer("means_w", means_w.float())
        self.dim = whitening.shape[0]

    def forward(self, features: Tensor) -> Tensor:
        z = features.float() @ self.whitening                      # (B, D)
        diff = z.unsqueeze(1) - self.means_w.unsqueeze(0)          # (B, K, D)
        return (diff * diff).sum(-1).min(dim=1).values / self.dim  # (B,)


class WithOOD(nn.Module):
    """The classifier plus its OOD head: ``forward`` → (logits, ood_score)."""

    def __init__(self, model: nn.Module, head: OODHead):
        super().__init__()
        self.model, self.ood = model, head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.model.forward_features(x)
        return self.model.forward_head(f), self.ood(f)


@torch.no_grad()
def collect_features(model: nn.Module, loader: DataLoader, device=torch.device("cpu")) -> tuple[Tensor, Tensor]:
    model.eval()
    feats, labels = [], []
    for x, y in loader:
        feats.append(model.forward_features(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def fit_statistics(feats: Tensor, labels: Tensor, num_classes: int, shrinkage: float = oodstats.SHRINKAGE
                   ) -> tuple[Tensor, Tensor]:
    """Class means and a shrunk shared covariance → (whitening Σ^-1/2, whitened means); the math lives in
    ``cadbcnn_runtime.oodstats`` (shared with the torch-free refit of exported models)."""
    st = oodstats.fit_statistics(feats.double().numpy(), labels.numpy(), num_classes, shrinkage=shrinkage)
    return torch.from_numpy(st.whitening).float(), torch.from_numpy(st.means_w).float()


def fit_ood(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, num_classes: int, *,
            flag_rate: float = oodstats.FLAG_RATE, device=torch.device("cpu")) -> dict[str, Any]:
    """Fit on the training split, choose the threshold on the validation split (≤ flag_rate flagged)."""
    ftr, ytr = collect_features(model, train_loader, device)
    whitening, means_w = fit_statistics(ftr, ytr, num_classes)
    head = OODHead(whitening, means_w)
    fval, _ = collect_features(model, val_loader, device)
    with torch.no_grad():
        val_scores = head(fval).numpy()
    threshold = oodstats.threshold_for(val_scores, flag_rate)
    return {
        "method": METHOD,
        "feature": "forward_features (fused, pooled)",
        "whitening": whitening,
        "means_w": means_w,
        "threshold": threshold,
        "fitted_on": f"train split ({len(ftr)} images)",
        "threshold_rule": oodstats.threshold_rule(flag_rate, len(fval), "the validation split"),
        "flag_rate": flag_rate,
        "val_flagged": float((val_scores > threshold).mean()),
    }


def head_from(ood: dict[str, Any]) -> OODHead:
    return OODHead(ood["whitening"], ood["means_w"])


def spec_entry(ood: dict[str, Any]) -> dict[str, Any]:
    """What the model spec records about the OOD output (no tensors)."""
    return {"output": OUTPUT_NAME, "method": ood["method"], "feature": ood["feature"],
            "threshold": float(ood["threshold"]), "fitted_on": ood["fitted_on"],
            "threshold_rule": ood["threshold_rule"], "val_flagged": float(ood["val_flagged"]),
            "higher_is": "more out-of-distribution"}
