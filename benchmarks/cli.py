"""`cadbcnn-bench`: benchmark every deployable format."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from cadbcnn_runtime.exits import cli_errors

app = typer.Typer(add_completion=False)

BenchDevice = Enum("BenchDevice", {d: d for d in ("cpu", "cuda", "all")}, type=str)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected a comma-separated list of integers, got {text!r}") from None


@app.command()
@cli_errors
def bench(
    out: Path = typer.Option(..., help="Folder for report.md, results.json and charts."),
    checkpoint: Optional[Path] = typer.Option(None, help="Trained checkpoint (default: full-size CADBCNN with random "
                                              "weights — timings are the same, accuracy is not)."),
    model: List[Path] = typer.Option([], help="ONNX model(s) from cadbcnn-export (FP32, INT8, FP16; repeatable). "
                                     "Missing formats are exported from the checkpoint."),
    data: Optional[Path] = typer.Option(None, help="Labelled folder-per-class images for the accuracy columns."),
    images: Optional[Path] = typer.Option(None, help="Folder of images for end-to-end throughput (default: --data)."),
    batch: str = typer.Option("1,8,32", help="Batch sizes."),
    threads: str = typer.Option("1,0", help="Thread counts (0 = all cores)."),
    device: BenchDevice = typer.Option("cpu", help="Which execution providers to benchmark."),
    min_time: float = typer.Option(3.0, help="Seconds of timed runs per measurement (after warm-up)."),
    data_limit: Optional[int] = typer.Option(None, help="Use at most N images of --data."),
    no_cold_start: bool = typer.Option(False, "--no-cold-start"),
) -> None:
    """Latency (p50/p90/p99), throughput, memory, accuracy and cold start per format → report.md."""
    import os

    from .bench import BenchOptions, run_benchmark

    th = [t or (os.cpu_count() or 1) for t in _ints(threads)]
    opts = BenchOptions(out=out, checkpoint=checkpoint, models=list(model), data=data, images=images,
                        batches=_ints(batch), threads=list(dict.fromkeys(th)), device=device.value, min_time=min_time,
                        data_limit=data_limit, cold_start=not no_cold_start)
    run_benchmark(opts, log=typer.echo)
    typer.echo(f"report: {out / 'report.md'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
