"""Grad-CAM overlays and t-SNE of the fused and per-branch features."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cadbcnn_runtime.evaluation import save_png

from . import data as D
from .checkpoint import load_checkpoint


def cam_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Each branch's last conv block (Grad-CAM targets)."""
    if hasattr(model, "branch_a"):
        return {"ResNet18 branch": model.branch_a[-1], "ResNet34 branch": model.branch_b[-1]}
    if hasattr(model.net, "layer4"):
        return {"layer4": model.net.layer4}
    return {"features": model.net.features}


def gradcam(model: nn.Module, x: torch.Tensor, target: int, layers: dict[str, nn.Module]) -> dict[str, np.ndarray]:
    """Grad-CAM maps (H, W) in [0, 1] for one image (1, 3, H, W) and one class."""
    acts: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, k=k: acts.__setitem__(k, out)) for k, m in layers.items()]
    try:
        model.eval()
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(x)
            grads = torch.autograd.grad(logits[0, target], [acts[k] for k in layers])
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for (k, a), g in zip(acts.items(), grads):
        w = g.mean((2, 3), keepdim=True)
        cam = torch.relu((w * a).sum(1))[0].detach().numpy()
        cam = cv2.resize(cam, (x.shape[3], x.shape[2]), interpolation=cv2.INTER_LINEAR)
        out[k] = cam / cam.max() if cam.max() > 0 else cam
    return out


def overlay(img: np.ndarray, cam: np.ndarray) -> np.ndarray:
    heat = cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return (0.55 * img + 0.45 * heat).astype(np.uint8)


@torch.no_grad()
def features(model: nn.Module, loader: DataLoader) -> dict[str, np.ndarray]:
    model.eval()
    out: dict[str, list] = {"fused": [], "branch_a": [], "branch_b": [], "logits": []}
    for x, _ in loader:
        if hasattr(model, "branch_a"):
            fa, fb = model.forward_branches(x)
            f = model.fusion(fa, fb)
            out["branch_a"].append(fa.mean((2, 3)).numpy())
            out["branch_b"].append(fb.mean((2, 3)).numpy())
        else:
            f = model.forward_features(x)
        out["fused"].append(f.numpy())
        out["logits"].append(model.forward_head(f).numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


def explain(checkpoint: Path, data: Path, out: Path, *, split_file: Path | None = None, split: str = "test",
            per_class: int = 2, log=print) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    ck = load_checkpoint(checkpoint)
    model = ck.build_model()
    root = Path(data)
    sf = Path(split_file) if split_file else Path(checkpoint).parent / "split.csv"
    wanted = {root / r["path"] for r in D.split_rows(sf) if r["split"] == split}
    ds = D.load(root, class_folders=ck.class_folders, only=wanted)
    dataset = D.ImageDataset(ds.samples, ck.spec, images=ds.images)
    feats = features(model, DataLoader(dataset, batch_size=64))
    labels = np.array([s.label for s in ds.samples])
    pred = feats["logits"].argmax(1)
    names = ck.class_names
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # -- Grad-CAM: correct and wrong examples of every class ------------------------------------
    layers = cam_layers(model)
    rows = []
    for k in range(len(names)):
        right = np.flatnonzero((labels == k) & (pred == k))[:per_class]
        wrong = np.flatnonzero((labels == k) & (pred != k))[:per_class]
        rows += [(i, True) for i in right] + [(i, False) for i in wrong]
    cols = 1 + len(layers)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.3 * cols, 2.3 * len(rows)), dpi=90, squeeze=False)
    for r, (i, ok) in enumerate(rows):
        img = dataset.image(i)
        x = dataset[i][0].unsqueeze(0)
        cams = gradcam(model, x, int(pred[i]), layers)
        img_r = cv2.resize(img, (x.shape[3], x.shape[2]))
        axes[r, 0].imshow(img_r)
        axes[r, 0].set_title(f"true {names[labels[i]]}\npred {names[pred[i]]} ({'✓' if ok else '✗'})", fontsize=8,
                             color="green" if ok else "red")
        for c, (k, cam) in enumerate(cams.items(), start=1):
            axes[r, c].imshow(overlay(img_r, cam))
            axes[r, c].set_title(f"Grad-CAM: {k}", fontsize=8)
        for a in axes[r]:
            a.axis("off")
    fig.tight_layout()
    save_png(fig, out / "gradcam.png")
    plt.close(fig)

    # -- t-SNE ---------------------------------------------------------------------------------
    spaces = [("fused (cross-attention)", "fused"), ("ResNet18 branch pooled", "branch_a"),
              ("ResNet34 branch pooled", "branch_b")]
    spaces = [(t, k) for t, k in spaces if k in feats]
    fig, axes = plt.subplots(1, len(spaces), figsize=(4.2 * len(spaces), 4), dpi=90, squeeze=False)
    for ax, (title, key) in zip(axes[0], spaces):
        emb = TSNE(n_components=2, perplexity=min(30, len(labels) - 1), init="pca", random_state=0).fit_transform(
            feats[key])
        for k, n in enumerate(names):
            m = labels == k
            ax.scatter(emb[m, 0], emb[m, 1], s=6, label=n)
        ax.set_title(f"t-SNE: {title}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    save_png(fig, out / "tsne.png")
    plt.close(fig)
    log(f"wrote {out / 'gradcam.png'} ({len(rows)} examples) and {out / 'tsne.png'} ({len(labels)} {split} images)")
