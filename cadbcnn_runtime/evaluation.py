"""Evaluation of a model on a set of images, torch-free: run it through the runtime, the calibration and
risk–coverage numbers of a labelled set, and the two figures (reliability diagram, risk–coverage curve).

Shared by ``cadbcnn-train shift-report`` and ``cadbcnn-infer validate``. The figures need matplotlib (the
``report`` extra: ``pip install 'cadbcnn[report]'``); everything else needs only the base runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .classifier import Classifier, _chunks
from .errors import ArgumentError
from .reliability import (
    brier,
    expected_calibration_error,
    nll,
    reliability_bins,
    risk_coverage,
)

BATCH = 32


# ---------------------------------------------------------------------------
# Running the model
# ---------------------------------------------------------------------------
@dataclass
class Outputs:
    """Per-image runtime results of one set."""

    index: np.ndarray          # predicted class
    confidence: np.ndarray
    needs_review: np.ndarray
    ood: np.ndarray | None     # out_of_distribution flags, None without an OOD output
    probs: np.ndarray          # (N, K) in the spec's class order
    ood_score: np.ndarray | None = None    # the OOD score, None without an OOD output
    low_content: np.ndarray | None = None  # blank-field flags, None without a field-content check
    atypical_appearance: np.ndarray | None = None  # appearance-check flags, None without the check


def outputs_of(preds: list, class_names, has_ood: bool) -> Outputs:
    """The per-image arrays of a list of ``Prediction``s."""
    has_content = any(p.content_score is not None for p in preds)
    has_look = any(p.appearance_score is not None for p in preds)
    return Outputs(np.array([p.index for p in preds], np.int64), np.array([p.confidence for p in preds]),
                   np.array([p.needs_review for p in preds], bool),
                   np.array([p.out_of_distribution for p in preds], bool) if has_ood else None,
                   np.array([[p.probabilities[n] for n in class_names] for p in preds]).reshape(len(preds),
                                                                                             len(class_names)),
                   ood_score=np.array([p.ood_score for p in preds], np.float64) if has_ood else None,
                   low_content=np.array([p.low_content for p in preds], bool) if has_content else None,
                   atypical_appearance=np.array([p.atypical_appearance for p in preds], bool) if has_look else None)


def run_model(clf: Classifier, images: Iterable[np.ndarray], *, batch: int = BATCH) -> Outputs:
    """The runtime's predictions (``Classifier.preprocess`` + ``classify``) for RGB uint8 images."""
    preds = []
    for chunk in _chunks(images, batch):
        preds += clf.classify(np.stack([clf.preprocess(im) for im in chunk]))
    return outputs_of(preds, clf.spec.class_names, clf.spec.ood is not None)


# ---------------------------------------------------------------------------
# Calibration and operating points of a labelled set
# ---------------------------------------------------------------------------
def clean_metrics(out: Outputs, truth: np.ndarray, review_threshold: float) -> dict[str, Any]:
    """Calibration of the clean split and the operating points on its risk–coverage curve."""
    correct = out.index == truth
    rc = risk_coverage(out.confidence, correct)
    kept_conf = out.confidence >= review_threshold
    kept = ~out.needs_review
    return {
        "nll": nll(out.probs, truth), "brier": brier(out.probs, truth),
        "ece": expected_calibration_error(out.confidence, correct), "aurc": rc.aurc,
        "reliability_bins": [b.__dict__ for b in reliability_bins(out.confidence, correct)],
        "risk_coverage": {"thresholds": rc.thresholds.tolist(), "coverage": rc.coverage.tolist(),
                          "risk": rc.risk.tolist()},
        "at_review_threshold": {"coverage": float(kept_conf.mean()),
                                "risk": float((~correct[kept_conf]).mean()) if kept_conf.any() else None},
        "operating_point": {"coverage": float(kept.mean()),
                            "risk": float((~correct[kept]).mean()) if kept.any() else None},
    }


# ---------------------------------------------------------------------------
# Figures (matplotlib)
# ---------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ArgumentError("the report's figures need matplotlib: pip install 'cadbcnn[report]' (or pass "
                            "--no-figures)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Write a figure as a 256-colour palette PNG (about 4x smaller than matplotlib's RGBA output; these
    figures are committed under docs/)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def plot_reliability(clean: dict[str, Any], path: Path, title: str) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with each bin's image count."""
    plt = _pyplot()
    bins = [b for b in clean["reliability_bins"] if b["count"]]
    fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=100)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.bar([b["lo"] for b in bins], [b["acc"] for b in bins], width=[b["hi"] - b["lo"] for b in bins],
           align="edge", color="tab:blue", edgecolor="white", alpha=0.8, label="accuracy")
    ax.plot([b["mean_conf"] for b in bins], [b["acc"] for b in bins], "o", color="tab:red", ms=4,
            label="(mean confidence, accuracy)")
    for b in bins:
        ax.text((b["lo"] + b["hi"]) / 2, min(b["acc"], 0.93) + 0.02, str(b["count"]), ha="center", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence (top-class probability)", ylabel="accuracy",
           title=f"{title}\nECE {clean['ece']:.4f} (15 bins; numbers: images per bin)")
    ax.title.set_fontsize(9)
    ax.legend(loc="center left", fontsize=7)  # below 1/K confidence is impossible: usually empty
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_risk_coverage(clean: dict[str, Any], review_threshold: float, path: Path, title: str) -> None:
    """Risk (error rate among kept images) against coverage, with the model's review threshold marked."""
    plt = _pyplot()
    rc = clean["risk_coverage"]
    fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=100)
    ax.step(rc["coverage"], [100 * r for r in rc["risk"]], where="post", color="tab:blue",
            label=f"keep most confident first (AURC {clean['aurc']:.5f})")
    at, op = clean["at_review_threshold"], clean["operating_point"]
    if at["risk"] is not None:
        ax.plot(at["coverage"], 100 * at["risk"], "o", color="tab:red", ms=7,
                label=f"confidence ≥ {review_threshold:.2f}: coverage {100 * at['coverage']:.1f} %, "
                      f"risk {100 * at['risk']:.2f} %")
    if op["risk"] is not None:
        ax.plot(op["coverage"], 100 * op["risk"], "x", color="black", ms=8, mew=2,
                label=f"needs_review false (+ OOD flag): coverage {100 * op['coverage']:.1f} %, "
                      f"risk {100 * op['risk']:.2f} %")
    ax.set(xlim=(0, 1.02), xlabel="coverage (fraction not sent to review)", ylabel="risk: error rate among kept (%)",
           title=title)
    ax.set_ylim(0, 115 * max(max(rc["risk"]), 1e-3))
    ax.title.set_fontsize(9)
    ax.legend(loc="center left", fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
