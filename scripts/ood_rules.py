"""Which OOD score passes the release gate for every model? An offline study for #12 item 4 (docs/OOD.md).

For each model (an exported cadbcnn ONNX file with an OOD head) the script reads features out of the graph —
the fused vector the shipped score reads (`cat`) and the global average and standard deviation of every ResNet
stage's output in both branches — and scores the same images with several candidate rules. Every rule is fitted
on training images and thresholded on validation images only (98th percentile: 2 % of validation flagged); the
gate sets are the release gate's (`cadbcnn-train ood-report --split val`: the central cell cut out onto black,
built from the validation images, and five synthetic non-blood sets), blank fields come from the shift report,
and the test split and other labs' folders are only reported.

    python scripts/ood_rules.py --split build/release-split.csv --out docs/ood/rules \
        --model v0.1.0=models/cadbcnn.onnx --model std-112=runs/ablate/std/model.onnx …

Rules (higher score = more foreign):
  shipped        the in-graph score with the spec's threshold (class-conditional Mahalanobis on `cat`)
  maha-cat       the same score refitted here on the training subset (a check: ≈ shipped)
  knn-cat        distance to the k-th nearest training feature, L2-normalised `cat` (Sun et al. 2022), k = 10
  maha-stages    one Gaussian per stage and branch on [mean, std] of the stage's feature maps, each score
                 standardised on validation, the maximum over stages (Lee et al. 2018, several layers)
  maha-cat+stages  max of the standardised maha-cat and maha-stages scores
  shipped|stages   the shipped flag, or maha-stages above a strict threshold (--strict-rate of validation, 0.5 %):
                 it flags a superset of the shipped flag, so it can never add a silent error, and the stages only
                 have to catch what is far away (noise, blank fields, other material)
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cadbcnn_runtime import oodstats  # noqa: E402
from cadbcnn_runtime.preprocess import preprocess, read_image  # noqa: E402
from cadbcnn_runtime.session import make_session  # noqa: E402
from cadbcnn_runtime.spec import ModelSpec  # noqa: E402
from cadbcnn_train.ood_eval import _central_cell_on_black, foreign_images  # noqa: E402
from cadbcnn_runtime.calibration import temperature_of  # noqa: E402
from cadbcnn_runtime.reliability import softmax  # noqa: E402
from cadbcnn_train.shift_report import blank_fields  # noqa: E402
from cadbcnn_train.shifts import SHIFTS, shifted  # noqa: E402

BLOCKS = {"a": (2, 2, 2, 2), "b": (3, 4, 6, 3)}  # ResNet18 and ResNet34 basic blocks per stage
RULES = ("shipped", "maha-cat", "knn-cat", "maha-stages", "maha-cat+stages", "shipped|stages")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def stage_outputs(proto: onnx.ModelProto) -> list[str]:
    """The output tensor of each ResNet stage, branch a then b: the Relu after each block's residual Add."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    block_ends = [n.output[0] for n in proto.graph.node
                  if n.op_type == "Relu" and producers.get(n.input[0]) is not None
                  and producers[n.input[0]].op_type == "Add"]
    want = sum(sum(b) for b in BLOCKS.values())
    if len(block_ends) != want:
        raise SystemExit(f"found {len(block_ends)} residual blocks, expected {want}: not a CADBCNN graph")
    names, i = [], 0
    for blocks in BLOCKS.values():
        for n in blocks:
            i += n
            names.append(block_ends[i - 1])
    return names


def feature_model(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """PROTO with extra outputs: `cat`, and per stage [mean, std] over the feature map (N, 2C)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    outs = ["cat"]
    m.graph.output.append(helper.make_tensor_value_info("cat", TensorProto.FLOAT, None))
    axes = helper.make_tensor("study_axes", TensorProto.INT64, [2], [2, 3])
    m.graph.initializer.append(axes)
    for k, t in enumerate(stage_outputs(proto)):
        p = f"study_s{k}"
        m.graph.node.extend([
            helper.make_node("ReduceMean", [t, "study_axes"], [f"{p}_mean"], keepdims=0),
            helper.make_node("Mul", [t, t], [f"{p}_sq"]),
            helper.make_node("ReduceMean", [f"{p}_sq", "study_axes"], [f"{p}_msq"], keepdims=0),
            helper.make_node("Mul", [f"{p}_mean", f"{p}_mean"], [f"{p}_m2"]),
            helper.make_node("Sub", [f"{p}_msq", f"{p}_m2"], [f"{p}_var"]),
            helper.make_node("Relu", [f"{p}_var"], [f"{p}_varp"]),
            helper.make_node("Sqrt", [f"{p}_varp"], [f"{p}_std"]),
            helper.make_node("Concat", [f"{p}_mean", f"{p}_std"], [p], axis=1),
        ])
        m.graph.output.append(helper.make_tensor_value_info(p, TensorProto.FLOAT, None))
        outs.append(p)
    return m, outs


def run(session, names: list[str], x: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    all_names = [session.get_outputs()[0].name, "ood_score", *names]
    parts = [session.run(all_names, {session.get_inputs()[0].name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    res = {k: np.concatenate([p[j] for p in parts]) for j, k in enumerate(["logits", "ood", *names])}
    return res


class Rules:
    """Every candidate rule fitted on TRAIN features (with labels) and standardised/thresholded on VAL."""

    def __init__(self, tr: dict, tr_labels: np.ndarray, va: dict, n_classes: int, stages: list[str], *,
                 shipped_threshold: float, strict_rate: float = 0.005, k: int = 10):
        self.shipped_threshold = shipped_threshold
        self.stages = stages
        self.k = k
        self.cat = oodstats.fit_statistics(tr["cat"], tr_labels, n_classes, shrinkage="auto")
        self.bank = self._norm(tr["cat"])
        self.stage_stats = {s: oodstats.fit_statistics(tr[s], np.zeros(len(tr[s]), int), 1, shrinkage="auto")
                            for s in stages}
        raw_va = self.raw(va)
        self.standard = {n: (float(v.mean()), float(v.std()) + 1e-12) for n, v in raw_va.items()}  # on val
        comb = self.combined(raw_va)
        self.thr = {r: oodstats.threshold_for(comb[r]) for r in comb}
        self.thr["shipped"] = shipped_threshold
        self.thr["stages-strict"] = oodstats.threshold_for(comb["maha-stages"], strict_rate)

    @staticmethod
    def _norm(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, np.float64)
        return f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)

    def raw(self, d: dict) -> dict[str, np.ndarray]:
        out = {"maha-cat": self.cat.scores(d["cat"])}
        q = self._norm(d["cat"])
        sims = q @ self.bank.T
        kth = -np.partition(-sims, self.k - 1, axis=1)[:, self.k - 1]
        out["knn-cat"] = 1 - kth
        for s in self.stages:
            out[s] = self.stage_stats[s].scores(d[s])
        return out

    def combined(self, raw: dict) -> dict[str, np.ndarray]:
        z = {n: (v - self.standard[n][0]) / self.standard[n][1] for n, v in raw.items()}
        stages = np.max([z[s] for s in self.stages], axis=0)
        return {"maha-cat": raw["maha-cat"], "knn-cat": raw["knn-cat"], "maha-stages": stages,
                "maha-cat+stages": np.maximum(z["maha-cat"], stages)}

    def flags(self, d: dict) -> dict[str, np.ndarray]:
        comb = self.combined(self.raw(d))
        out = {r: comb[r] > self.thr[r] for r in comb}
        out["shipped"] = d["ood"] > self.shipped_threshold
        out["shipped|stages"] = out["shipped"] | (comb["maha-stages"] > self.thr["stages-strict"])
        return out


def load_split(root: Path, split_csv: Path, which: str) -> tuple[list[np.ndarray], list[str]]:
    rows = [r for r in csv.DictReader(split_csv.open()) if r["split"] == which]
    return [read_image(root / r["path"]) for r in rows], [r["label"] for r in rows]


def load_folder(folder: Path) -> list[np.ndarray]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    out = []
    for p in files:
        try:
            out.append(read_image(p))
        except Exception:
            pass
    return out


def study(name: str, model: Path, images: dict, train_labels: np.ndarray, truth: dict[str, np.ndarray], *,
          min_flagged: float, threads: int, strict_rate: float) -> dict:
    """Flag rates of every rule on every set; for labelled sets (TRUTH) also review and silent-error rates, with
    review = confidence below the spec's review threshold (calibrated softmax) or flagged by the rule."""
    proto = onnx.load(str(model))
    spec = ModelSpec.from_onnx(model)
    fm, names = feature_model(proto)
    session = make_session(fm.SerializeToString(), threads=threads)
    feats = {}
    for set_name, imgs in images.items():
        x = np.stack([preprocess(im, spec) for im in imgs])
        feats[set_name] = run(session, names, x)
        print(f"  {name}: {set_name} ({len(imgs)})", flush=True)
    rules = Rules(feats["train"], train_labels, feats["val"], len(spec.class_names), names[1:],
                  shipped_threshold=float(spec.ood["threshold"]), strict_rate=strict_rate)
    res = {"model": str(model), "sets": {}, "review": {}, "silent": {}}
    temperature, review_thr = temperature_of(spec.calibration), float(spec.review_threshold)
    for set_name, f in feats.items():
        if set_name == "train":
            continue
        flags = rules.flags(f)
        res["sets"][set_name] = {r: float(v.mean()) for r, v in flags.items()}
        if set_name in truth:
            p = softmax(f["logits"].astype(np.float64), temperature)
            wrong, unsure = p.argmax(1) != truth[set_name], p.max(1) < review_thr
            res["review"][set_name] = {r: float((unsure | v).mean()) for r, v in flags.items()}
            res["silent"][set_name] = {r: float((wrong & ~(unsure | v)).mean()) for r, v in flags.items()}
    gate = [s for s in res["sets"] if s.startswith("gate:")]
    res["gate"] = {r: {"min": min(res["sets"][s][r] for s in gate),
                       "worst": min(gate, key=lambda s: res["sets"][s][r]),
                       "passed": all(res["sets"][s][r] >= min_flagged for s in gate)} for r in RULES}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="NAME=MODEL.onnx (repeatable)")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/all-leukemia"))
    ap.add_argument("--split", type=Path, required=True, help="split.csv shared by the models")
    ap.add_argument("--external", type=Path, default=Path("../shared/data/external"))
    ap.add_argument("--train-images", type=int, default=1024, help="Training images the rules are fitted on.")
    ap.add_argument("--min-flagged", type=float, default=0.9, help="The release gate's bar for every foreign set.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strict-rate", type=float, default=0.005,
                    help="shipped|stages: share of validation the stages' strict threshold flags.")
    ap.add_argument("--shift-stride", type=int, default=3, help="Shifted sets use every N-th test image.")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    train, train_labels = load_split(a.data, a.split, "train")
    keep = np.sort(np.random.default_rng(0).choice(len(train), min(a.train_images, len(train)), replace=False))
    train, train_labels = [train[i] for i in keep], [train_labels[i] for i in keep]
    val, _ = load_split(a.data, a.split, "val")
    test, test_labels = load_split(a.data, a.split, "test")
    sub = list(range(0, len(test), a.shift_stride))
    results = {}
    for item in a.model:
        name, _, path = item.partition("=")
        spec = ModelSpec.from_onnx(Path(path))
        folders = list(spec.training.get("class_folders") or spec.class_names)
        labels = np.array([folders.index(lbl) for lbl in train_labels])
        test_idx = np.array([folders.index(lbl) for lbl in test_labels])
        truth = {"test": test_idx}
        size = spec.image_size[0]
        images = {"train": train, "val": val, "test": test,
                  "gate: central cell on black": [_central_cell_on_black(im) for im in val]}
        for k, imgs in foreign_images(100, size).items():
            images[f"gate: {k}"] = imgs
        for sh in SHIFTS:
            key = f"{sh.severity}: {sh.name}"
            images[key] = list(shifted(sh, [test[i] for i in sub], seed=0))
            truth[key] = test_idx[sub]
        images["blank fields"] = blank_fields(spec.image_size, noise=False) + blank_fields(spec.image_size, noise=True)
        for ext in ("bccd-fields", "pbc-cells"):
            if (a.external / ext).is_dir():
                images[f"external: {ext}"] = load_folder(a.external / ext)
        print(f"{name}: {path}", flush=True)
        results[name] = study(name, Path(path), images, labels, truth, min_flagged=a.min_flagged, threads=a.threads,
                              strict_rate=a.strict_rate)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ood_rules.json").write_text(json.dumps(results, indent=2) + "\n")
    text = tables(results)
    (a.out / "ood_rules.md").write_text(text)
    print(text)


def tables(results: dict) -> str:
    first = next(iter(results.values()))["sets"]
    gate_sets = [s for s in first if s.startswith("gate:")]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = ["Flagged by the rule (%): validation (the threshold's 2 %), test, the release gate's foreign sets, blank "
             "fields, other labs' healthy images.", "",
             "| model | rule | val | test | " + " | ".join(g.replace("gate: ", "") for g in gate_sets)
             + " | gate | blank | BCCD | PBC |",
             "|---|---|" + "---:|" * (2 + len(gate_sets)) + "---|---:|---:|---:|"]
    for name, r in results.items():
        s = r["sets"]
        for rule in RULES:
            cell = lambda k: "–" if k not in s else pct(s[k][rule])  # noqa: E731
            lines.append(f"| {name} | {rule} | {cell('val')} | {cell('test')} | "
                         + " | ".join(cell(g) for g in gate_sets)
                         + f" | {'**passed**' if r['gate'][rule]['passed'] else 'failed'} | {cell('blank fields')} | "
                           f"{cell('external: bccd-fields')} | {cell('external: pbc-cells')} |")
    lines += ["", "Review and silent errors (%), review = calibrated confidence below the spec's review threshold "
              "or flagged by the rule; shifted sets pooled by severity (mean over the sets of the shift report).", "",
              "| model | rule | test review | test silent | mild flagged | mild review | mild silent | strong flagged "
              "| strong review | strong silent |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for rule in RULES:
            row = [pct(r["review"]["test"][rule]), pct(r["silent"]["test"][rule])]
            for sev in ("mild", "strong"):
                keys = [k for k in r["review"] if k.startswith(f"{sev}: ")]
                row += [pct(np.mean([r["sets"][k][rule] for k in keys])),
                        pct(np.mean([r["review"][k][rule] for k in keys])),
                        pct(np.mean([r["silent"][k][rule] for k in keys]))]
            lines.append(f"| {name} | {rule} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
