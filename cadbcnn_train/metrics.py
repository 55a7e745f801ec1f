"""Classification metrics (scikit-learn) and their readable renderings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def compute_metrics(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]) -> dict[str, Any]:
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    labels = list(range(len(class_names)))
    out: dict[str, Any] = {"n": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out["per_class"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(class_names)
    }
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    out["class_names"] = list(class_names)
    return out


def metrics_summary(m: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the model spec records of a metrics dict (no confusion matrix, no per-class precision/recall)."""
    if not m:
        return None
    return {"split": m.get("split", "test"), "n": m["n"], "accuracy": m["accuracy"], "f1_macro": m["f1_macro"],
            "f1_weighted": m["f1_weighted"],
            "per_class_f1": {k: v["f1"] for k, v in m["per_class"].items()}}


def metrics_markdown(m: dict[str, Any], title: str = "Metrics") -> str:
    lines = [f"# {title}", "", f"Images: {m['n']}  ", f"Accuracy: **{100 * m['accuracy']:.2f} %**  ",
             f"Macro F1: **{100 * m['f1_macro']:.2f}** · weighted F1: {100 * m['f1_weighted']:.2f} · "
             f"macro precision {100 * m['precision_macro']:.2f} · macro recall {100 * m['recall_macro']:.2f}", "",
             "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, c in m["per_class"].items():
        lines.append(f"| {name} | {100 * c['precision']:.2f} | {100 * c['recall']:.2f} | {100 * c['f1']:.2f} "
                     f"| {c['support']} |")
    names = m["class_names"]
    lines += ["", "Confusion matrix (rows: true, columns: predicted)", "",
              "| true \\ pred | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, row in zip(names, m["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot_confusion(m: dict[str, Any], path: Path, title: str = "Confusion matrix") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(m["confusion_matrix"])
    names = m["class_names"]
    fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=120)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(f"{title}\naccuracy {100 * m['accuracy']:.2f} %, macro F1 {100 * m['f1_macro']:.2f}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_metrics(m: dict[str, Any], out: Path, title: str = "Metrics") -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    (out / "metrics.md").write_text(metrics_markdown(m, title), encoding="utf-8")
    plot_confusion(m, out / "confusion_matrix.png", title)
