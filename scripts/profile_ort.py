"""ONNX Runtime's kernel time per op type for one model, through the runtime's session options (2 threads).

    .venv-runtime/bin/python scripts/profile_ort.py models/cadbcnn.int8.onnx [BATCH] [RUNS]

Prints the p50 latency of RUNS timed calls and, from ORT's profiler over the warm-up and timed calls, each op type's
share of kernel time, ms per call and node count (how the INT8 requantisations around the ReLUs were found).
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cadbcnn_runtime.session import session_options  # noqa: E402


def main(path: str, batch: int = 1, runs: int = 20, warmup: int = 5) -> None:
    so = session_options(threads=2)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name:
            (np.random.default_rng(0).random((batch, 3, 224, 224)) * 255).astype(np.uint8)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    print(f"{path}: batch {batch}, p50 {np.median(times) * 1e3:.2f} ms over {runs} runs")
    events = json.loads(Path(session.end_profiling()).read_text())
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    calls = warmup + runs
    all_us = sum(total.values())
    for op, us in total.most_common():
        print(f"{op:28s} {us / all_us * 100:6.1f} %  {us / calls / 1e3:7.2f} ms/call  {count[op] // calls:4d} nodes")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
