"""What the benchmark times: a ``Runner`` per format (PyTorch eager, ONNX Runtime through the runtime's own
session factory), the timing loop and the FLOP count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cadbcnn_runtime.spec import INPUT_NAME, OUTPUT_NAME


# ---------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------
@dataclass
class Runner:
    name: str
    run: Callable[[np.ndarray], np.ndarray]         # uint8 NCHW → logits
    set_threads: Callable[[int], None]
    provider: str
    size_mb: float | None = None
    load: Callable[[], None] = lambda: None
    classifier_path: Path | None = None             # runtime formats: the file end-to-end runs classify with
    backend: str = "onnxruntime"                    # the runtime backend of the end-to-end run


def torch_runner(model, precision: str, size_mb: float | None, device: str = "cpu") -> Runner:
    """PyTorch eager (channels_last) at PRECISION (fp32, or bf16/fp16 autocast) on DEVICE. On CUDA a copy of the
    model is moved there and each run includes the uint8 batch's copy to the GPU and the logits' copy back (which
    waits for the GPU), as an application would see it; named ``torch-cuda-PRECISION``."""
    import copy

    import torch

    from cadbcnn_train.env import autocast

    dev = torch.device(device)
    model = (model if dev.type == "cpu" else copy.deepcopy(model)).eval().to(dev, memory_format=torch.channels_last)

    @torch.no_grad()
    def run(x):
        t = torch.from_numpy(x).to(dev).contiguous(memory_format=torch.channels_last)
        with autocast(dev, precision):
            return model(t).float().cpu().numpy()

    name = f"torch-{precision}" if dev.type == "cpu" else f"torch-{dev.type}-{precision}"
    return Runner(name, run, torch.set_num_threads, f"torch-{dev.type}", size_mb)


def session_runner(name: str, path: Path, provider: str, build: Callable[[int], Any], *,
                   backend: str = "onnxruntime") -> Runner:
    """A runner over a session-like object (``run(names, feeds)``) that ``build(threads)`` makes; rebuilt only
    when the thread count changes. ``runner.session()`` is the session in use."""
    state: dict[str, Any] = {}

    def set_threads(t):
        if state.get("threads") != t:
            state["s"], state["threads"] = build(t), t

    def run(x):
        return state["s"].run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    r = Runner(name, run, set_threads, provider, path.stat().st_size / 1e6, classifier_path=path, backend=backend)
    r.session = lambda: state["s"]  # type: ignore[attr-defined]
    return r


def ort_runner(name: str, path: Path, provider: str) -> Runner:
    from cadbcnn_runtime.session import make_session

    def build(threads: int):  # the very session options cadbcnn_runtime.Classifier uses
        providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
        s = make_session(path, providers=providers, threads=threads)
        if provider not in s.get_providers():
            raise RuntimeError(f"{provider} did not initialise (got {s.get_providers()})")
        return s

    return session_runner(name, path, provider, build)


def runtime_openvino_runner(name: str, path: Path) -> Runner | str:
    """The runtime's own OpenVINO backend (``cadbcnn_runtime.openvino_backend``: the adapter ``Classifier`` runs,
    FP32 inference precision), so that its end-to-end row is compared with the same path model-only. A string
    when OpenVINO is not installed."""
    from cadbcnn_runtime.errors import ArgumentError
    from cadbcnn_runtime._onnxmeta import metadata_of
    from cadbcnn_runtime.openvino_backend import INSTALL_HINT, check_precision, openvino_session, require_openvino
    from cadbcnn_runtime.session import resolve_threads
    from cadbcnn_runtime.spec import ModelSpec
    from cadbcnn_runtime.variants import variant_key

    try:
        require_openvino()
    except ArgumentError:
        return f"OpenVINO not installed ({INSTALL_HINT})"
    data = path.read_bytes()
    try:  # the runtime refuses what it refuses here too (INT8 on a CPU without VNNI)
        check_precision(variant_key(ModelSpec.from_metadata(metadata_of(data, path), source=str(path))), str(path))
    except ArgumentError as exc:
        return f"refused by the runtime: {exc}"
    return session_runner(name, path, "OpenVINO CPU (runtime backend)",
                          lambda threads: openvino_session(data, threads=resolve_threads(threads), name=str(path)),
                          backend="openvino")


def time_it(fn: Callable[[], Any], min_time: float, warmup: int = 2, min_runs: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def flops_per_image(model, image_size) -> float | None:
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model.eval()(torch.zeros(1, 3, *image_size, dtype=torch.uint8))
        return float(fc.get_total_flops())
    except Exception:  # noqa: BLE001 — FLOP counting is informational
        return None


# ---------------------------------------------------------------------------
# Peer: OpenVINO on the very same ONNX files (optional extra `cadbcnn[bench]`)
# ---------------------------------------------------------------------------
OPENVINO_HINT = "pip install 'cadbcnn[bench]' (OpenVINO)"


def openvino_runner(name: str, path: Path, *, precision_hint: str | None = None) -> Runner | str:
    """OpenVINO's CPU plugin compiling the same ONNX file. ``precision_hint=None`` keeps OpenVINO's default
    hints (it may compute in bf16 on CPUs that have it); ``"f32"`` forces FP32. A string when not installed."""
    try:
        import openvino as ov
    except ImportError:
        return f"OpenVINO not installed ({OPENVINO_HINT})"
    core = ov.Core()
    state: dict[str, Any] = {}

    def make(threads: int) -> None:
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": int(threads)}
        if precision_hint:
            config["INFERENCE_PRECISION_HINT"] = precision_hint
        compiled = core.compile_model(str(path), "CPU", config)
        state.update(request=compiled.create_infer_request(), output=compiled.output(OUTPUT_NAME), threads=threads,
                     precision=str(compiled.get_property("INFERENCE_PRECISION_HINT")))

    def set_threads(t: int) -> None:
        if state.get("threads") != t:
            make(t)

    def run(x: np.ndarray) -> np.ndarray:
        if "request" not in state:
            make(1)
        state["request"].infer({INPUT_NAME: x})
        return np.array(state["request"].get_tensor(state["output"]).data, copy=True)

    r = Runner(name, run, set_threads, "OpenVINO CPU", path.stat().st_size / 1e6)
    r.precision = lambda: state.get("precision")  # type: ignore[attr-defined]
    return r
