"""The paper's comparison and our ablations under one reduced protocol, plus the grouped split.

    python scripts/experiments.py run    --data ../shared/data/all-leukemia --out runs/exp [--only NAME ...]
    python scripts/experiments.py report --out runs/exp --md docs/EXPERIMENTS.md

`run` trains every row that has no metrics.json yet (so it can be resumed); `report` builds the table from
what finished, adding parameters, GFLOPs and ONNX Runtime CPU latency (batch 1, 224 px) per architecture.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Reduced protocol (2-core CPU budget): 112 px, 8 epochs, batch 32, bf16 — identical for every row.
PROTOCOL = ["--image-size", "112", "--epochs", "8", "--batch-size", "32", "--patience", "8", "--no-ood"]
ROWS = {
    "cadbcnn-s0": ["--model", "cadbcnn", "--seed", "0"],
    "cadbcnn-s1": ["--model", "cadbcnn", "--seed", "1"],
    "cadbcnn-s2": ["--model", "cadbcnn", "--seed", "2"],
    "dual_concat": ["--model", "dual_concat"],
    "resnet18": ["--model", "resnet18"],
    "resnet34": ["--model", "resnet34"],
    "resnet50": ["--model", "resnet50"],
    "efficientnet_b0": ["--model", "efficientnet_b0"],
    "cadbcnn-no-augment": ["--model", "cadbcnn", "--no-augment"],
    "cadbcnn-no-class-weights": ["--model", "cadbcnn", "--no-class-weights"],
    "grouped-cadbcnn": ["--model", "cadbcnn", "--split", "grouped"],
    "grouped-resnet34": ["--model", "resnet34", "--split", "grouped"],
}


def run(args) -> None:
    out = Path(args.out)
    for name in args.only or ROWS:  # --only also sets the order
        extra = ROWS[name]
        if (out / name / "metrics.json").is_file():
            continue
        cmd = [str(Path(sys.executable).parent / "cadbcnn-train"), "fit", "--data", args.data, "--out",
               str(out / name), *PROTOCOL, *extra]
        if (out / name / "last.pt").is_file():
            cmd.append("--resume")
        print(" ".join(cmd), flush=True)
        t = time.time()
        subprocess.run(cmd, check=True)
        print(f"{name}: {time.time() - t:.0f} s", flush=True)


def arch_costs(model: str) -> dict:
    """Parameters, GFLOPs and ORT CPU batch-1 latency (2 threads) at 224 px — weights do not matter."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from cadbcnn_bench.bench import flops_per_image
    from cadbcnn_export.exporter import torch_to_onnx
    from cadbcnn_train.model import count_parameters, create_model

    torch.manual_seed(0)
    m = create_model(model, num_classes=4).eval()
    proto = torch_to_onnx(m, (224, 224), 18)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.zeros((1, 3, 224, 224), np.uint8)
    for _ in range(3):
        s.run(None, {"image": x})
    times = []
    for _ in range(15):
        t = time.perf_counter()
        s.run(None, {"image": x})
        times.append(time.perf_counter() - t)
    return {"params_m": count_parameters(m) / 1e6, "gflops": flops_per_image(m, (224, 224)) / 1e9,
            "ort_ms": 1000 * statistics.median(times)}


def report(args) -> None:
    out = Path(args.out)
    res, costs = {}, {}
    for name in ROWS:
        p = out / name / "metrics.json"
        if p.is_file():
            m = json.loads(p.read_text())
            cfg = json.loads((out / name / "config.json").read_text())
            hist = (out / name / "history.csv").read_text().splitlines()[1:]
            secs = sum(float(line.split(",")[7]) for line in hist)
            res[name] = (m, cfg, secs)
    for name, (m, cfg, _) in res.items():
        if cfg["model"] not in costs:
            costs[cfg["model"]] = arch_costs(cfg["model"])
    lines = ["| run | model | split | test acc % | precision (macro) | recall (macro) | F1 macro | F1 weighted | "
             "params (M) | GFLOPs @224 | ORT CPU ms @224 (b1, 2 thr) | train time (s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (m, cfg, secs) in res.items():
        c = costs[cfg["model"]]
        lines.append(f"| {name} | {cfg['model']} | {cfg['split']} | {100 * m['accuracy']:.2f} | "
                     f"{100 * m['precision_macro']:.2f} | {100 * m['recall_macro']:.2f} | {100 * m['f1_macro']:.2f} | "
                     f"{100 * m['f1_weighted']:.2f} | {c['params_m']:.1f} | {c['gflops']:.2f} | {c['ort_ms']:.1f} | "
                     f"{secs:.0f} |")
    seeds = [res[n][0] for n in ("cadbcnn-s0", "cadbcnn-s1", "cadbcnn-s2") if n in res]
    if len(seeds) >= 2:
        acc = [100 * m["accuracy"] for m in seeds]
        f1 = [100 * m["f1_macro"] for m in seeds]
        lines += ["", f"CADBCNN over {len(seeds)} seeds: accuracy {statistics.mean(acc):.2f} ± "
                      f"{statistics.stdev(acc):.2f} %, macro-F1 {statistics.mean(f1):.2f} ± {statistics.stdev(f1):.2f} "
                      "(mean ± sd)."]
    head = [
        "# Experiments: the paper's comparison, ablations, seeds and the grouped split", "",
        "Generated by `python scripts/experiments.py report` from the runs of `python scripts/experiments.py run "
        "--data ../shared/data/all-leukemia` on the 2-core CPU machine.", "",
        "**Protocol (every row):** " + " ".join(PROTOCOL) + " — i.e. 112-px images, 8 epochs from scratch, "
        "batch 32, bf16 autocast, precise BN before each validation, class-weighted loss and augmentation unless "
        "the row says otherwise; best epoch on validation macro-F1; test split evaluated once. This is a shorter "
        "schedule than the released model's (224 px, 30 epochs, ≈ 55 min per run), chosen so that every row "
        "fits the CPU budget; the same schedule is used for every row. Parameters, GFLOPs and ONNX Runtime CPU "
        "latency are per architecture at the deployment size (224 px, batch 1, 2 threads). `stratified` = "
        "image-level split with duplicates grouped; `grouped` = blocks of 20 consecutive file numbers kept "
        "together (patient proxy) plus duplicates grouped.", ""]
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text("\n".join(head + lines) + "\n")
    (out / "experiments.json").write_text(json.dumps({n: {"metrics": r[0], "config": r[1], "train_seconds": r[2],
                                                          "costs": costs[r[1]["model"]]} for n, r in res.items()},
                                                     indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--out", default="runs/exp")
    r.add_argument("--only", nargs="*")
    p = sub.add_parser("report")
    p.add_argument("--out", default="runs/exp")
    p.add_argument("--md", default="docs/EXPERIMENTS.md")
    a = ap.parse_args()
    run(a) if a.cmd == "run" else report(a)
