"""report.md and charts from a results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(v, fmt="{:.1f}", none="–"):
    return none if v is None else fmt.format(v)


def write_report(res: dict[str, Any], out: Path) -> None:
    c = res["conditions"]
    rows = res["rows"]
    isa = ", ".join(k for k, v in c["isa"].items() if v) or "none of the listed"
    lines = [
        "# cadbcnn benchmark", "",
        f"{c['date']} · commit `{c['git_commit']}` · CPU **{c['cpu']}** ({c['cores']} cores; {isa}) · "
        f"GPU {c['gpu'] or 'none'}", "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in c["versions"].items())
        + f". Providers available: {', '.join(c['providers_available'])}.", "",
        f"Model: {res['checkpoint']}; {(res['flops_per_image'] or 0) / 1e9:.2f} GFLOP per image "
        "(PyTorch FLOP counter, 2 × MAC).", "",
        "## Model-only latency and throughput", "",
        "Preallocated uint8 input; p50/p90/p99 over ≥ the minimum time after warm-up. Ratios are batch-matched "
        "p50 latency relative to PyTorch eager FP32, to ORT FP32 and to the best peer (the fastest OpenVINO row "
        "on the same files) at the same threads (< 1 is faster).", "",
        "| format | status | threads | batch | p50 ms | p90 ms | p99 ms | ms/img | img/s | GFLOP/s | mem MB | "
        "file MB | ×torch fp32 | ×ORT fp32 | ×best peer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "passed":
            lines.append(f"| {r['format']} | {r['status']}: {r['reason']} |" + " |" * 13)
            continue
        lines.append(
            f"| {r['format']} | passed | {r['threads']} | {r['batch']} | {_f(r['p50_ms'])} | {_f(r['p90_ms'])} | "
            f"{_f(r['p99_ms'])} | {_f(r['p50_ms_per_image'])} | {_f(r['images_per_s'])} | {_f(r['gflops_per_s'])} | "
            f"{_f(r['mem_mb'], '{:.0f}')} | {_f(r['size_mb'])} | {_f(r['vs_torch_fp32'], '{:.2f}')} | "
            f"{_f(r['vs_ort_fp32'], '{:.2f}')} | {_f(r.get('vs_best_peer'), '{:.2f}')} |")
    passed = [r for r in rows if r["status"] == "passed"]
    if passed:
        lines += ["", "Fastest format per batch size (p50, at the most threads measured):", ""]
        top = max(r["threads"] for r in passed)
        for b in sorted({r["batch"] for r in passed}):
            at = sorted((r for r in passed if r["batch"] == b and r["threads"] == top), key=lambda r: r["p50_ms"])
            lines.append(f"* batch {b}: **{at[0]['format']}** {at[0]['p50_ms']:.1f} ms"
                         + (f" (next: {at[1]['format']} {at[1]['p50_ms']:.1f} ms)" if len(at) > 1 else ""))
    if res.get("accuracy"):
        lines += ["", "## Accuracy per format", "", "| format | images | top-1 % | macro-F1 | agreement with FP32 % |",
                  "|---|---:|---:|---:|---:|"]
        for k, a in res["accuracy"].items():
            lines.append(f"| {k} | {a['n']} | {100 * a['top1']:.2f} | {100 * a['f1_macro']:.2f} | "
                         f"{_f(100 * a['agreement_with_fp32'] if 'agreement_with_fp32' in a else None, '{:.2f}')} |")
        for k, why in res.get("accuracy_skipped", {}).items():
            lines.append(f"| {k} | — | — | — | — ({why}) |")
    if res.get("end_to_end"):
        lines += ["", "## End-to-end (decode + preprocess + infer, `cadbcnn-infer`'s pipeline)", "",
                  "Each row runs its own file at that file's precision, on the backend named. The ratio is "
                  "the median over rounds of (pipeline pass) / (model-only burst of the same Classifier session on "
                  "as many preloaded images), measured back to back, because the machine's speed drifts; the "
                  "model-only table's figure for the same batch is shown beside it.", "",
                  "| format | runs | batch | images | end-to-end img/s | model-only img/s (interleaved) | ratio "
                  "(rounds) | model-only img/s (table above) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for k, e in res["end_to_end"].items():
            if e.get("status", "passed") != "passed":
                lines.append(f"| {k} | {e['status']}: {e['reason']} |" + " |" * 6)
                continue
            rounds = ", ".join(f"{r:.2f}" for r in e["round_ratios"])
            lines.append(f"| {k} | {e['file']} ({e['precision']}, {e['backend']}) | {e['batch']} | {e['images']} | "
                         f"{e['images_per_s']:.1f} | {e['model_only_interleaved_images_per_s']:.1f} | "
                         f"{e['ratio']:.2f} ({rounds}) | {e['model_only_images_per_s']:.1f} |")
    if res.get("cold_start"):
        lines += ["", "## Cold start (new process → import → session → first result; median of 3 starts after "
                  "the first, which runs with an empty optimised-graph cache)", "",
                  "| model | process total s | import s | session s | first result s | graph cache | first start "
                  "(empty cache) s | torch loaded |", "|---|---:|---:|---:|---:|---|---:|---|"]
        for k, v in res["cold_start"].items():
            if "error" in v:
                lines.append(f"| {k} | failed: {v['error']} | | | | | | |")
            else:
                first = v.get("first_start_s")
                lines.append(f"| {k} | {v['process_total_s']:.2f} | {v['import_s']:.2f} | {v['session_s']:.2f} | "
                             f"{v['first_result_s']:.2f} | {v.get('session_cache', '–')} | "
                             f"{'–' if first is None else f'{first:.2f}'} | {v['torch_loaded']} |")
    lines += ["", "## Charts", "", "![latency](latency.png)", "", "![throughput](throughput.png)", ""]
    if res.get("accuracy"):
        lines += ["![accuracy vs latency](accuracy_latency.png)", ""]
    lines += ["", "Providers actually used: " + ", ".join(f"{k}: {v}" for k, v in c["providers_used"].items()), ""]
    (Path(out) / "report.md").write_text("\n".join(lines) + "\n")


def write_charts(res: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in res["rows"] if r["status"] == "passed"]
    if not rows:
        return
    threads = max(r["threads"] for r in rows)
    rows = [r for r in rows if r["threads"] == threads]
    fmts = list(dict.fromkeys(r["format"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    get = lambda f, b, k: next((r[k] for r in rows if r["format"] == f and r["batch"] == b), np.nan)  # noqa: E731

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    w = 0.8 / len(fmts)
    for i, f in enumerate(fmts):
        ax.bar(np.arange(len(batches)) + i * w, [get(f, b, "p50_ms_per_image") for b in batches], w, label=f)
    ax.set_xticks(np.arange(len(batches)) + 0.4 - w / 2, [f"batch {b}" for b in batches])
    ax.set_ylabel("p50 ms per image")
    ax.set_title(f"Latency per image ({threads} threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(out) / "latency.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for f in fmts:
        ax.plot(batches, [get(f, b, "images_per_s") for b in batches], marker="o", label=f)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("images/s")
    ax.set_title(f"Throughput vs batch ({threads} threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(out) / "throughput.png")
    plt.close(fig)

    if res.get("accuracy"):
        fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
        for f, a in res["accuracy"].items():
            ax.scatter(get(f, 1, "p50_ms"), 100 * a["top1"], label=f)
        ax.set_xlabel("batch-1 p50 latency (ms)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(Path(out) / "accuracy_latency.png")
        plt.close(fig)
