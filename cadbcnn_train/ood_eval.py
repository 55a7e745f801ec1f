"""How well does the OOD score flag shifted and foreign images?

Builds evaluation sets from the in-distribution images of one split (the test
split for the published report, the validation split for the release gate;
labels are never used): colour/stain shifts, blur, black background around the
central cell, heavy JPEG, changed magnification — and non-blood images
(synthetic textures and patterns). For each set: the fraction flagged by the
model's threshold and the AUROC against the clean images of that split, for
three candidate scores (the
in-graph Mahalanobis score, the energy score −logsumexp(logits), and
1 − max softmax).

As a release gate (``min_foreign_flagged``) every *foreign* set — the central
cell cut out onto black, and the non-blood images — must be flagged at least
that often, or ``OODGateError`` is raised after the report is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from cadbcnn_runtime.classifier import Classifier
from cadbcnn_runtime.errors import DatasetError, ModelSpecError, OODGateError
from cadbcnn_runtime.preprocess import preprocess, read_image

from . import data as D
from .transforms import hsv_shift, jpeg, zoom


_hsv, _jpeg, _zoom = hsv_shift, jpeg, zoom  # the names the reports used before transforms.py


def _central_cell_on_black(img):
    """Keep the stained (saturated) blob nearest the centre; everything else black."""
    sat = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1]
    _, mask = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    n, lab, stats, cent = cv2.connectedComponentsWithStats(mask)
    if n <= 1:
        return np.zeros_like(img)
    h, w = img.shape[:2]
    k = 1 + int(np.argmin([np.hypot(cx - w / 2, cy - h / 2) - 0.01 * stats[i + 1, cv2.CC_STAT_AREA]
                           for i, (cx, cy) in enumerate(cent[1:])]))
    keep = cv2.dilate((lab == k).astype(np.uint8), np.ones((7, 7), np.uint8))
    return img * keep[..., None]


SHIFTS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "hue +20° (mild stain shift)": ("mild", lambda im: _hsv(im, dh=10)),
    "hue +90°, saturation ×1.3 (other stain)": ("strong", lambda im: _hsv(im, dh=45, ds=1.3)),
    "saturation ×0.3 (faded stain)": ("strong", lambda im: _hsv(im, ds=0.3)),
    "brightness ×0.6 (darker exposure)": ("mild", lambda im: _hsv(im, dv=0.6)),
    "gaussian blur σ=1.5 (slightly out of focus)": ("mild", lambda im: cv2.GaussianBlur(im, (0, 0), 1.5)),
    "gaussian blur σ=5 (out of focus)": ("strong", lambda im: cv2.GaussianBlur(im, (0, 0), 5)),
    "JPEG quality 30": ("mild", lambda im: _jpeg(im, 30)),
    "JPEG quality 3 (heavy)": ("strong", lambda im: _jpeg(im, 3)),
    "zoom ×1.3 (magnification)": ("mild", lambda im: _zoom(im, 1.3)),
    "zoom ×0.5 (tiled, lower magnification)": ("strong", lambda im: _zoom(im, 0.5)),
    "central cell on black background": ("foreign", _central_cell_on_black),
}


def foreign_images(n: int, size: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    sets: dict[str, list[np.ndarray]] = {"uniform noise": [], "smooth noise textures": [], "checkerboards / stripes": [],
                                         "random shapes (non-blood scene)": [], "flat colour fields": []}
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        sets["uniform noise"].append(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        sets["smooth noise textures"].append(cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC))
        period = int(rng.integers(4, 40))
        pat = ((xx // period + (yy // period if i % 2 else 0)) % 2 * 255).astype(np.uint8)
        col = rng.integers(0, 256, 3)
        sets["checkerboards / stripes"].append((pat[..., None] / 255 * col).astype(np.uint8))
        scene = np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8)
        for _ in range(12):
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                cv2.rectangle(scene, tuple(int(v) for v in rng.integers(0, size, 2)),
                              tuple(int(v) for v in rng.integers(0, size, 2)), c, -1)
            else:
                cv2.line(scene, tuple(int(v) for v in rng.integers(0, size, 2)),
                         tuple(int(v) for v in rng.integers(0, size, 2)), c, int(rng.integers(1, 8)))
        sets["random shapes (non-blood scene)"].append(scene)
        sets["flat colour fields"].append(np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8))
    return sets


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score_out > score_in) with ties counted half (Mann–Whitney U)."""
    scores = np.concatenate([inside, outside])
    ranks = np.empty(len(scores))
    order = scores.argsort(kind="mergesort")
    ranks[order] = np.arange(1, len(scores) + 1)
    for v in np.unique(scores):  # average ranks of ties
        m = scores == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    r_out = ranks[len(inside):].sum()
    n_in, n_out = len(inside), len(outside)
    return float((r_out - n_out * (n_out + 1) / 2) / (n_in * n_out))


def _scores(clf: Classifier, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    x = np.stack([preprocess(im, clf.spec) for im in images])
    logits, ood = zip(*(clf.run_all(x[i:i + 32]) for i in range(0, len(x), 32)))
    logits = np.concatenate(logits).astype(np.float64)
    m = logits.max(1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    p = np.exp(logits - lse[:, None])
    # energy score E = −logsumexp(logits): higher = more out-of-distribution
    out = {"energy": -lse, "1-maxsoftmax": 1 - p.max(1)}
    if ood[0] is not None:
        out["mahalanobis"] = np.concatenate(ood)
    return out


def ood_report(model: Path, data: Path, split_file: Path, out: Path, *, split: str = "test",
               limit: int | None = None, n_foreign: int = 100, min_foreign_flagged: float | None = None) -> dict:
    clf = Classifier.from_file(model, device="cpu")
    if clf.spec.ood is None:
        raise ModelSpecError(f"{model}: has no OOD output; fit it (cadbcnn-train fit-ood) and re-export")
    root = Path(data)
    rows = [r for r in D.split_rows(split_file) if r["split"] == split]
    if not rows:
        raise DatasetError(f"{split_file}: has no rows of split {split!r}; use one of train, val, test")
    if limit:
        rows = rows[:: max(1, len(rows) // limit)][:limit]
    clean = [read_image(root / r["path"]) for r in rows]
    thr = clf.ood_threshold
    base = _scores(clf, clean)
    result = {"model": str(model), "threshold": thr, "split": split, "n_images": len(clean),
              "in_distribution_flagged": float((base["mahalanobis"] > thr).mean()), "sets": {}}
    sets: dict[str, tuple[str, list[np.ndarray]]] = {k: (kind, [f(im) for im in clean])
                                                      for k, (kind, f) in SHIFTS.items()}
    for k, imgs in foreign_images(n_foreign, clf.spec.image_size[0]).items():
        sets[f"non-blood: {k}"] = ("foreign", imgs)
    for name, (kind, imgs) in sets.items():
        s = _scores(clf, imgs)
        result["sets"][name] = {
            "kind": kind, "n": len(imgs), "flagged": float((s["mahalanobis"] > thr).mean()),
            "auroc": {k: auroc(base[k], s[k]) for k in s},
        }
    failed = []
    if min_foreign_flagged is not None:
        failed = [f"{n} {100 * r['flagged']:.1f} %" for n, r in result["sets"].items()
                  if r["kind"] == "foreign" and r["flagged"] < min_foreign_flagged]
        result["gate"] = {"min_foreign_flagged": min_foreign_flagged, "passed": not failed, "failed": failed}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ood_report.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Threshold {thr:.4f} (from the spec); in-distribution {split} split flagged: "
             f"**{100 * result['in_distribution_flagged']:.1f} %** of {len(clean)}. "
             f"Shifted sets are built from the same {split} images.", "",
             "| set | kind | n | flagged % | AUROC Mahalanobis | AUROC energy | AUROC 1−max softmax |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in result["sets"].items():
        a = r["auroc"]
        lines.append(f"| {name} | {r['kind']} | {r['n']} | {100 * r['flagged']:.1f} | {a['mahalanobis']:.3f} | "
                     f"{a['energy']:.3f} | {a['1-maxsoftmax']:.3f} |")
    if min_foreign_flagged is not None:
        lines += ["", f"Release gate (every foreign set flagged ≥ {100 * min_foreign_flagged:.0f} %): "
                      + ("**passed**" if not failed else "**failed** — " + "; ".join(failed))]
    text = "\n".join(lines) + "\n"
    (out / "ood_report.md").write_text(text)
    if failed:
        raise OODGateError(
            f"{model}: the OOD flag misses foreign images ({'; '.join(failed)}; the gate needs "
            f">= {100 * min_foreign_flagged:.0f} %). Do not ship this model: choose another candidate run, or "
            f"refit the threshold (cadbcnn-train fit-ood --flag-rate) and re-export. Report: {out / 'ood_report.md'}",
            report=text)
    return result
