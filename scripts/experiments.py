"""The paper's comparison and our ablations under one reduced protocol, plus the grouped split.

    python scripts/experiments.py run    --data ../shared/data/all-leukemia --out runs/exp [--only NAME ...]
    python scripts/experiments.py report --out runs/exp --md docs/EXPERIMENTS.md [--release-runs runs/release-s*]

`run` trains every row that has no metrics.json yet (so it can be resumed); `report` builds the table from
what finished, adding parameters, GFLOPs and ONNX Runtime CPU latency (batch 1, 224 px) per architecture,
plus the full-protocol seed table from the `scripts/release.sh candidate` runs. Text below the
`READING_MARKER` line of an existing report is kept, so the hand-written reading survives a regeneration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from release_rule import chosen_checkpoint, history, ood_gate, pick  # noqa: E402 — the rule lives beside release.sh

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
    """Parameters, GFLOPs and ORT CPU batch-1 latency (2 threads, median of 15) at 224 px — weights do not matter."""
    import numpy as np
    import torch

    from cadbcnn_bench.runners import flops_per_image
    from cadbcnn_export.graph import torch_to_onnx
    from cadbcnn_runtime.session import make_session
    from cadbcnn_runtime.spec import INPUT_NAME
    from cadbcnn_train.model import count_parameters, create_model

    torch.manual_seed(0)
    m = create_model(model, num_classes=4).eval()
    proto = torch_to_onnx(m, (224, 224), 18)
    s = make_session(proto.SerializeToString(), threads=2)  # what cadbcnn_runtime.Classifier runs
    x = np.zeros((1, 3, 224, 224), np.uint8)
    for _ in range(3):
        s.run(None, {INPUT_NAME: x})
    times = []
    for _ in range(15):
        t = time.perf_counter()
        s.run(None, {INPUT_NAME: x})
        times.append(time.perf_counter() - t)
    return {"params_m": count_parameters(m) / 1e6, "gflops": flops_per_image(m, (224, 224)) / 1e9,
            "ort_ms": 1000 * statistics.median(times)}


READING_MARKER = "<!-- end of generated part: text below is kept by `experiments.py report` -->"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) >= 2 else f"{xs[0]:.2f}"


def release_seeds(runs: list[Path]) -> list[str]:
    """Full-protocol seed table: one row per finished `scripts/release.sh candidate` run."""
    rows = []
    for run in runs:
        if not (run / "test" / "metrics.json").is_file():
            continue
        chosen = chosen_checkpoint(run)
        val = json.loads((run / f"val-{chosen}" / "metrics.json").read_text())
        cfg = json.loads((run / "config.json").read_text())
        hist = history(run)
        # the kept epoch as the fit recorded it (train.py's rule; summaries from before it have none)
        best_epoch = json.loads((run / "summary.json").read_text()).get("best_epoch")
        best = f"best (epoch {best_epoch})" if best_epoch is not None else "best"
        rows.append((cfg["seed"], chosen if chosen == "last" else best, val,
                     json.loads((run / "test" / "metrics.json").read_text()),
                     sum(r["seconds"] for r in hist), len(hist), run, ood_gate(run)))
    if not rows:
        return []
    lines = ["## CADBCNN seeds at the full protocol (the released recipe)", "",
             "224 px, 30 epochs, batch 32, bf16, precise BN, `scripts/release.sh candidate SEED` — seed 0 drew the "
             "split, seeds 1 and 2 reuse its `split.csv`, so the seeds differ in initialisation, augmentation and "
             "batch order only and share one validation and one test set. Each run keeps the better of its "
             "best-on-validation and last checkpoint on validation macro-F1 (after precise BN).", "",
             "| seed | checkpoint | val acc % | val F1 macro | test acc % | test precision (macro) | "
             "test recall (macro) | test F1 macro | test F1 weighted | test errors | epochs | train time (s) | "
             "OOD gate (val) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for seed, chosen, v, t, secs, epochs, run, gate in rows:
        errors = round(t["n"] * (1 - t["accuracy"]))
        lines.append(f"| {seed} | {chosen} | {_pct(v['accuracy'])} | {_pct(v['f1_macro'])} | {_pct(t['accuracy'])} | "
                     f"{_pct(t['precision_macro'])} | {_pct(t['recall_macro'])} | {_pct(t['f1_macro'])} | "
                     f"{_pct(t['f1_weighted'])} | {errors} / {t['n']} | {epochs} | {secs:.0f} | {gate} |")
    if len(rows) >= 2:
        lines += ["", f"Mean ± sd over {len(rows)} seeds: test accuracy "
                      f"{_mean_sd([100 * r[3]['accuracy'] for r in rows])} %, test macro-F1 "
                      f"{_mean_sd([100 * r[3]['f1_macro'] for r in rows])}; validation macro-F1 "
                      f"{_mean_sd([100 * r[2]['f1_macro'] for r in rows])}."]
    released, best = pick([r[6] for r in rows])  # the release rule (release_rule.py)
    seed_of = {r[6]: r[0] for r in rows}
    lines += ["", f"Best on validation: seed {seed_of[best]} (`{best}`). The release rule: the best on "
                  "validation among the candidates that pass every gate of `scripts/release.sh ship` (export parity "
                  "gates and the OOD gate: every foreign set built from validation images flagged ≥ 90 %); test "
                  "scores play no part. "
                  + (f"Released by that rule: seed {seed_of[released]} (`{released}`)." if released else
                     "No candidate has passed the OOD gate yet."), ""]
    return lines


def report(args) -> None:
    out = Path(args.out)
    res, costs = {}, {}
    for name in ROWS:
        p = out / name / "metrics.json"
        if p.is_file():
            m = json.loads(p.read_text())
            cfg = json.loads((out / name / "config.json").read_text())
            res[name] = (m, cfg, sum(r["seconds"] for r in history(out / name)))
    # Costs depend on the architecture only: reuse earlier measurements (latency must be measured on an idle
    # machine, and training runs usually are not idle) unless --remeasure.
    cached = out / "experiments.json"
    if cached.is_file() and not args.remeasure:
        for r in json.loads(cached.read_text()).values():
            costs[r["config"]["model"]] = r["costs"]
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
        lines += ["", f"Reduced protocol, CADBCNN over {len(seeds)} seeds (each seed also draws its split): accuracy {statistics.mean(acc):.2f} ± "
                      f"{statistics.stdev(acc):.2f} %, macro-F1 {statistics.mean(f1):.2f} ± {statistics.stdev(f1):.2f} "
                      "(mean ± sd)."]
    head = [
        "# Experiments: the paper's comparison, ablations, seeds and the grouped split", "",
        "Generated by `python scripts/experiments.py report` from the runs of `python scripts/experiments.py run "
        "--data ../shared/data/all-leukemia` and `scripts/release.sh candidate SEED` on the 2-core CPU machine.",
        ""]
    protocol = [
        "**Protocol (every row):** " + " ".join(PROTOCOL) + " — i.e. 112-px images, 8 epochs from scratch, "
        "batch 32, bf16 autocast, precise BN before each validation, class-weighted loss and augmentation unless "
        "the row says otherwise; best epoch on validation macro-F1; test split evaluated once. This is a shorter "
        "schedule than the released model's (224 px, 30 epochs, ≈ 55 min per run), chosen so that every row "
        "fits the CPU budget; the same schedule is used for every row. Parameters, GFLOPs and ONNX Runtime CPU "
        "latency are per architecture at the deployment size (224 px, batch 1, 2 threads). `stratified` = "
        "image-level split with duplicates grouped; `grouped` = blocks of 20 consecutive file numbers kept "
        "together (patient proxy) plus duplicates grouped.", ""]
    md = Path(args.md)
    old = md.read_text() if md.is_file() else ""
    kept = old.split(READING_MARKER, 1)[1] if READING_MARKER in old else ""
    seeds_md = release_seeds(sorted(Path(r) for r in args.release_runs))
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(head + seeds_md + ["## The paper's comparison and ablations (reduced protocol)", ""]
                            + protocol + lines + ["", READING_MARKER]) + (kept or "\n"))
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
    p.add_argument("--remeasure", action="store_true", help="measure latency again instead of reusing it")
    p.add_argument("--release-runs", nargs="*", default=[str(r) for r in sorted(Path("runs").glob("release-s*"))
                                                          if r.is_dir()])
    a = ap.parse_args()
    run(a) if a.cmd == "run" else report(a)
