"""Running both sides of a parity check: PyTorch reference outputs, ONNX Runtime outputs (through the
runtime's one session factory) and their comparison (max |Δlogit|, top-1 agreement, per-class accuracy).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from cadbcnn_runtime.reliability import softmax
from cadbcnn_runtime.session import make_session
from cadbcnn_runtime.spec import INPUT_NAME


# ---------------------------------------------------------------------------
# Running both sides
# ---------------------------------------------------------------------------
def torch_logits(model, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return torch_outputs(model, x, batch)[0]


def torch_outputs(model, x: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, ood_score or None) of a ``torch.nn.Module`` — models wrapped in ``WithOOD`` return both.
    (torch is imported here only: the ONNX Runtime side of this module is torch-free.)"""
    import torch

    model.eval()
    logits, ood = [], []
    for i in range(0, len(x), batch):
        with torch.no_grad():
            out = model(torch.from_numpy(x[i:i + batch]))
        if isinstance(out, tuple):
            logits.append(out[0].float().numpy())
            ood.append(out[1].float().numpy())
        else:
            logits.append(out.float().numpy())
    return np.concatenate(logits), (np.concatenate(ood) if ood else None)


def ort_session(path_or_bytes, providers=("CPUExecutionProvider",), threads: int | None = None):
    """A session built by the runtime's own factory (the options users get)."""
    return make_session(path_or_bytes, providers=providers, threads=threads)


def ort_outputs(session: ort.InferenceSession, x: np.ndarray, batch: int = 32):
    names = [o.name for o in session.get_outputs()]
    outs = [session.run(names, {INPUT_NAME: x[i:i + batch]}) for i in range(0, len(x), batch)]
    logits = np.concatenate([o[0] for o in outs])
    return logits, (np.concatenate([o[1] for o in outs]) if len(names) > 1 else None)


def compare(ref, got, labels: np.ndarray | None = None, class_names: Sequence[str] = (),
            ood_threshold: float | None = None, got_ood_threshold: float | None = None) -> dict[str, Any]:
    """Compare (logits, ood) pairs; plain logits arrays are accepted too. GOT's OOD flag uses GOT_OOD_THRESHOLD
    when it has statistics of its own (a refitted INT8 variant), else OOD_THRESHOLD."""
    ref, ref_ood = ref if isinstance(ref, tuple) else (ref, None)
    got, got_ood = got if isinstance(got, tuple) else (got, None)
    d = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    r = {
        "n": int(len(ref)),
        "max_abs_logit": float(d.max()),
        "mean_abs_logit": float(d.mean()),
        "max_abs_prob": float(np.abs(softmax(ref) - softmax(got)).max()),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
    }
    if ref_ood is not None and got_ood is not None:
        rel = np.abs(ref_ood.astype(np.float64) - got_ood) / np.maximum(1.0, np.abs(ref_ood))
        r["ood_max_rel_diff"] = float(rel.max())
        if ood_threshold is not None:
            got_thr = ood_threshold if got_ood_threshold is None else got_ood_threshold
            r["ood_flag_agreement"] = float(((ref_ood > ood_threshold) == (got_ood > got_thr)).mean())
            r["ood_flagged_ref"] = float((ref_ood > ood_threshold).mean())
            r["ood_flagged"] = float((got_ood > got_thr).mean())
    if labels is not None and len(labels) and (labels >= 0).all():
        r["accuracy_ref"] = float((ref.argmax(1) == labels).mean())
        r["accuracy"] = float((got.argmax(1) == labels).mean())
        r["per_class"] = {}
        for k, name in enumerate(class_names):
            m = labels == k
            if m.any():
                r["per_class"][name] = {"n": int(m.sum()), "accuracy_ref": float((ref[m].argmax(1) == k).mean()),
                                        "accuracy": float((got[m].argmax(1) == k).mean())}
    return r
