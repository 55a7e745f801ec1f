"""Interleaved latency on one released file through the bench's own runners: ORT (the runtime's session factory),
OpenVINO with its default hints (the peer row) and the runtime's OpenVINO backend — ROUNDS rounds of RUNS calls
each, so the machine's drift hits all three alike (``cadbcnn-bench`` times its rows one after another).

    .venv/bin/python scripts/ab_openvino.py models/cadbcnn.int8.onnx BATCH ROUNDS RUNS
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cadbcnn_bench.runners import Runner, openvino_runner, ort_runner, runtime_openvino_runner  # noqa: E402


def main(path: str, batch: int, rounds: int, runs: int, threads: int = 2) -> None:
    model = Path(path)
    runners: dict[str, Runner | str] = {
        "ort (runtime session)": ort_runner("ort", model, "CPUExecutionProvider"),
        "openvino default hints": openvino_runner("openvino", model),
        "openvino runtime backend (f32 hint)": runtime_openvino_runner("runtime-openvino", model)}
    for name, r in runners.items():
        if isinstance(r, str):
            sys.exit(f"{name}: {r}")
    x = (np.random.default_rng(0).random((batch, 3, 224, 224)) * 255).astype(np.uint8)
    for r in runners.values():
        r.set_threads(threads)
        for _ in range(3):
            r.run(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, r in runners.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                r.run(x)
                times[name].append(time.perf_counter() - t0)
    print(f"OpenVINO default-hint precision: {runners['openvino default hints'].precision()}")
    for name, t in times.items():
        print(f"batch {batch} {name:40s} p50 {np.median(t) * 1e3:7.2f} ms  min {min(t) * 1e3:7.2f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
