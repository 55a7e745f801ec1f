"""Interleaved latency on one released file: ORT through the runtime's session factory, OpenVINO with its default
hints, and the runtime's OpenVINO backend (f32 hint) — ROUNDS rounds of RUNS calls each, so the machine's drift
hits all three alike (the bench times its rows one after another).

    .venv/bin/python scripts/ab_openvino.py models/cadbcnn.int8.onnx BATCH ROUNDS RUNS
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import openvino as ov  # noqa: E402

from cadbcnn_runtime.openvino_backend import openvino_session  # noqa: E402
from cadbcnn_runtime.session import make_session  # noqa: E402


def main(path: str, batch: int, rounds: int, runs: int) -> None:
    x = (np.random.default_rng(0).random((batch, 3, 224, 224)) * 255).astype(np.uint8)
    ort_session = make_session(path, threads=2)
    core = ov.Core()
    peer = core.compile_model(core.read_model(path), "CPU")
    request = peer.create_infer_request()
    backend = openvino_session(Path(path).read_bytes(), threads=2, name=path)
    fns = {"ort (runtime session)": lambda: ort_session.run(None, {"image": x}),
           "openvino default hints": lambda: request.infer({"image": x}),
           "openvino runtime backend (f32 hint)": lambda: backend.run(None, {"image": x})}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    print(f"precision hint: peer {peer.get_property('INFERENCE_PRECISION_HINT')}, runtime backend {backend.precision}")
    for name, t in times.items():
        print(f"batch {batch} {name:40s} p50 {np.median(t) * 1e3:7.2f} ms  min {min(t) * 1e3:7.2f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
