"""FP32 vs INT8 side by side, per image set: accuracy (labelled sets), top-1 agreement, OOD flag rates and
their agreement — the numbers of the INT8 section of models/MODEL_CARD.md.

    python scripts/int8_agreement.py models/cadbcnn.onnx models/cadbcnn.int8.onnx build/int8-agreement.json \
        val=build/val-split test=build/test-split bccd-fields=../shared/data/external/bccd-fields \
        pbc-cells=../shared/data/external/pbc-cells:300

A set is NAME=FOLDER[:LIMIT]; class sub-folders named as the model's class folders make it labelled. Two
synthetic sets are added: uniform grey fields (with and without sensor noise) and random noise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cadbcnn_export.images import load_image_set  # noqa: E402
from cadbcnn_runtime import Classifier  # noqa: E402


def run(clf: Classifier, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outs = [clf.run_all(x[i:i + 32]) for i in range(0, len(x), 32)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def main(fp32: str, int8: str, out: str, *sets: str) -> None:
    c32 = Classifier.from_file(fp32, device="cpu", precision="fp32")
    c8 = Classifier.from_file(int8, device="cpu")
    spec = c32.spec
    folders = tuple(spec.training.get("class_folders") or spec.class_names)
    h, w = spec.image_size
    rng = np.random.default_rng(0)
    grey = np.stack([np.full((3, h, w), v, np.uint8) for v in range(128, 250, 4)])
    named: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for item in sets:
        name, _, where = item.partition("=")
        folder, _, limit = where.partition(":")
        s = load_image_set(Path(folder), spec, folders, limit=int(limit) if limit else None)
        named[name] = (s.x, s.labels if s.labelled else None)
    named["blank"] = (np.concatenate([grey, np.clip(grey + rng.normal(0, 6, grey.shape), 0, 255).astype(np.uint8)]),
                      None)
    named["random"] = (rng.integers(0, 256, (64, 3, h, w), dtype=np.uint8), None)
    result = {}
    for name, (x, y) in named.items():
        (l32, o32), (l8, o8) = run(c32, x), run(c8, x)
        f32, f8 = o32 > c32.ood_threshold, o8 > c8.ood_threshold
        r = {"n": int(len(x)), "fp32_flagged": float(f32.mean()), "int8_flagged": float(f8.mean()),
             "flag_agreement": float((f32 == f8).mean()), "top1_agreement": float((l32.argmax(1) == l8.argmax(1)).mean())}
        if y is not None:
            r["accuracy_fp32"], r["accuracy_int8"] = float((l32.argmax(1) == y).mean()), float((l8.argmax(1) == y).mean())
            r["per_class"] = {spec.class_names[k]: {"n": int((y == k).sum()),
                                                    "fp32": float((l32.argmax(1)[y == k] == k).mean()),
                                                    "int8": float((l8.argmax(1)[y == k] == k).mean())}
                              for k in range(len(spec.class_names)) if (y == k).any()}
        result[name] = r
        print(name, json.dumps(r), flush=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
