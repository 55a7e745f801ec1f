"""Local engine vs Ray (1 and 2 actors) on the same images: end-to-end `cadbcnn-infer` throughput.

    python -m cadbcnn_bench.engines IMAGES --model models/cadbcnn.onnx --out benchmarks/results/engines-<cpu>

Each configuration runs ``cadbcnn_runtime.job.classify_to_file`` exactly as ``cadbcnn-infer`` does (CSV output,
its own Ray instance started and stopped inside the timing, as a user's run would). Reported per row: wall time
(start to finished file, Ray start-up included), images/s over the wall time, and images/s of the classification
phase alone (``Summary``: from handing the items to the engine to the last row; for Ray this includes actor
start-up, not ``ray.init``). Torch-free; needs the ``distributed`` extra for the Ray rows.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from cadbcnn_runtime.job import classify_to_file
from cadbcnn_runtime.machine import cpu_info
from cadbcnn_runtime.session import allowed_cpus

# (name, engine, actors, threads per actor) — threads None: the local engine's default (all allowed CPUs)
CONFIGS = (
    ("local (default)", "local", None, None),
    ("ray, 1 actor × 1 thread", "ray", 1, 1),
    ("ray, 1 actor × 2 threads", "ray", 1, 2),
    ("ray, 2 actors × 1 thread", "ray", 2, 1),
)

app = typer.Typer(add_completion=False)


def run_config(images: Path, model: Optional[Path], engine: str, actors, threads, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = classify_to_file(images, Path(tmp) / "r.csv", model=model, engine=engine, actors=actors,
                               threads=threads, batch=batch, say=lambda _: None)
        wall = time.perf_counter() - t0
    n = res.summary.ok + res.summary.errors
    return {"engine": engine, "actors": actors, "threads": threads, "images": n, "errors": res.summary.errors,
            "wall_s": round(wall, 2), "img_per_s_wall": round(n / wall, 2),
            "img_per_s_classify": round(n / res.summary.seconds, 2) if res.summary.seconds else 0.0,
            "engine_info": res.engine_info}


def render(meta: dict, rows: list[dict], out: Path) -> str:
    """The Markdown report; ratios are to the median of the local-engine runs (the machine drifts)."""
    import statistics

    base = statistics.median(r["img_per_s_classify"] for r in rows if r["engine"] == "local")
    lines = ["# cadbcnn-infer engines: local vs Ray", "",
             f"{rows[0]['images']} images from `{meta['images_folder']}`, model `{meta['model']}`, batch "
             f"{meta['batch']}, {meta['allowed_cpus']} CPUs ({meta['cpu']}). Command: `python -m "
             f"cadbcnn_bench.engines {meta['images_folder']} --out {out}`. One run per row, in this order; "
             "\"× local\" is relative to the median of the local-engine rows.", "",
             "| engine | wall s | img/s (wall) | img/s (classification phase) | × local |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['wall_s']:.1f} | {r['img_per_s_wall']:.1f} | "
                     f"{r['img_per_s_classify']:.1f} | {r['img_per_s_classify'] / base:.2f} |")
    one = next((r for r in rows if r["engine"] == "ray" and r["actors"] == 1 and r["threads"] == 1), None)
    two = next((r for r in rows if r["engine"] == "ray" and r["actors"] == 2 and r["threads"] == 1), None)
    if one and two:
        lines += ["", f"Scaling 1 → 2 single-thread actors: {two['img_per_s_classify'] / one['img_per_s_classify']:.2f}×"
                  " (classification phase)."]
    return "\n".join(lines) + "\n"


@app.command()
def main(images: Path = typer.Argument(..., help="Folder of images."),
         model: Optional[Path] = typer.Option(None, help="ONNX model (default: the released one)."),
         out: Path = typer.Option(..., help="Folder for engines.md and engines.json."),
         batch: int = typer.Option(16, min=1),
         repeat_local: bool = typer.Option(True, help="Run the local engine again last (drift check).")) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    configs = list(CONFIGS) + ([("local (again, drift check)", "local", None, None)] if repeat_local else [])
    for name, engine, actors, threads in configs:
        if threads is not None and threads > allowed_cpus():
            continue
        r = run_config(images, model, engine, actors, threads, batch)
        r["name"] = name
        rows.append(r)
        typer.echo(f"{name:<28} {r['images']} images  wall {r['wall_s']:6.1f} s  {r['img_per_s_wall']:6.1f} img/s "
                   f"(classification phase {r['img_per_s_classify']:6.1f} img/s)", err=True)
    meta = {"cpu": f"{cpu_info().name}, {cpu_info().isa}", "allowed_cpus": allowed_cpus(),
            "model": str(model or "released"), "images_folder": str(images), "batch": batch}
    (out / "engines.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "engines.md").write_text(render(meta, rows, out))
    typer.echo((out / "engines.md").read_text())


if __name__ == "__main__":
    app()
