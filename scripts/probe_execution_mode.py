"""Does running the two ResNet branches side by side (ONNX Runtime's parallel executor) beat one sequential run
with intra-op threads? Interleaved rounds on one random batch; medians and minima per configuration.

    .venv-runtime/bin/python scripts/probe_execution_mode.py MODEL.onnx [BATCH] [ROUNDS]

Plain ``onnxruntime`` sessions (not the runtime's factory) because the factory deliberately offers only the
sequential executor; see docs/STATUS.md for the measured answer.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

CONFIGS = {"sequential, intra 2": dict(intra=2), "parallel, inter 2 × intra 1": dict(intra=1, inter=2, parallel=True),
           "parallel, inter 2 × intra 2": dict(intra=2, inter=2, parallel=True), "sequential, intra 1": dict(intra=1)}


def session(path: str, intra: int, inter: int = 1, parallel: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.intra_op_num_threads, so.inter_op_num_threads = intra, inter
    so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main(path: str, batch: int = 1, rounds: int = 10) -> None:
    sessions = {k: session(path, **v) for k, v in CONFIGS.items()}
    inp = next(iter(sessions.values())).get_inputs()[0]
    size = [d if isinstance(d, int) else batch for d in inp.shape]
    x = np.random.default_rng(0).integers(0, 256, size).astype(np.uint8)
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {inp.name: x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            for _ in range(3):
                s.run(None, {inp.name: x})
            times[k].append((time.perf_counter() - t) / 3 * 1e3)
    for k, v in times.items():
        print(f"{k:30s} p50 {statistics.median(v):7.2f} ms   min {min(v):7.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
