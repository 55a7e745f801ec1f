"""Out-of-distribution score: class-conditional Gaussians with a shared covariance
(Mahalanobis distance) on the model's fused, pooled features.

The score is the squared Mahalanobis distance to the nearest class mean divided
by the feature dimension (≈ 1 for typical training images). Its statistics are
stored as plain tensors in the checkpoint; the exporter adds ``OODHead`` to the
graph as a second output, so the runtime needs no extra code or dependencies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cadbcnn_runtime.spec import OOD_OUTPUT_NAME
from torch.utils.data import DataLoader

METHOD = "mahalanobis-shared-cov"
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


def fit_statistics(feats: Tensor, labels: Tensor, num_classes: int, shrinkage: float = 0.01) -> tuple[Tensor, Tensor]:
    """Class means and a shrunk shared covariance → (whitening Σ^-1/2, whitened means)."""
    f = feats.double()
    present = [k for k in range(num_classes) if (labels == k).any()]
    means = torch.stack([f[labels == k].mean(0) for k in present])
    centered = f - means[[present.index(int(k)) for k in labels]]
    cov = centered.T @ centered / max(len(f) - 1, 1)
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * torch.trace(cov) / d * torch.eye(d, dtype=cov.dtype)
    evals, evecs = torch.linalg.eigh(cov)
    whitening = evecs @ torch.diag(evals.clamp_min(1e-12).rsqrt()) @ evecs.T
    return whitening.float(), (means @ whitening).float()


def fit_ood(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, num_classes: int, *,
            flag_rate: float = 0.02, device=torch.device("cpu")) -> dict[str, Any]:
    """Fit on the training split, choose the threshold on the validation split (≤ flag_rate flagged)."""
    ftr, ytr = collect_features(model, train_loader, device)
    whitening, means_w = fit_statistics(ftr, ytr, num_classes)
    head = OODHead(whitening, means_w)
    fval, _ = collect_features(model, val_loader, device)
    with torch.no_grad():
        val_scores = head(fval).numpy()
    threshold = float(np.quantile(val_scores, 1 - flag_rate, method="higher"))
    return {
        "method": METHOD,
        "feature": "forward_features (fused, pooled)",
        "whitening": whitening,
        "means_w": means_w,
        "threshold": threshold,
        "fitted_on": f"train split ({len(ftr)} images)",
        "threshold_rule": f"{100 * (1 - flag_rate):.0f}th percentile of the validation split ({len(fval)} images)",
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
