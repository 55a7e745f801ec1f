"""The optional OpenVINO backend (``Classifier.from_file(..., backend="openvino")``, extra ``cadbcnn[openvino]``).

OpenVINO's CPU plugin runs the very same ONNX files as ONNX Runtime and is faster on some CPUs (measured on a
2-core AVX-512 VNNI/BF16 EPYC: the INT8 file 16.9 ms vs ORT's 21.7 ms at batch 1). It is chosen explicitly,
never as a fallback: a missing ``openvino`` is an error naming the extra, and ``device="cuda"`` is refused.

``OpenVINOSession`` looks like the small part of ``onnxruntime.InferenceSession`` that ``Classifier`` uses
(``run``, ``get_inputs``, ``get_outputs``, ``get_providers``), so the spec check of the graph's inputs and
outputs (``classifier._check_io``) and everything after it is the same code for both backends.

* **Built from the verified bytes.** ``Core.read_model`` reads the ONNX model from memory: the bytes whose
  content hash the Classifier checked are the bytes OpenVINO compiles; the file is not read again and no
  temporary file is written.
* **Exact FP32.** ``INFERENCE_PRECISION_HINT=f32`` always: OpenVINO's default computes in bf16 on CPUs that
  have it, which is faster but changes the logits by ~1e-2 (not what the file's parity gate measured). The
  quantised convolutions of an INT8 file still run in int8; everything else in f32. The precision the compiled
  model reports is checked, so a plugin that ignored the hint is refused rather than used.
* **Threads.** ``INFERENCE_NUM_THREADS`` is ``session.resolve_threads``'s (0: OpenVINO's default), one stream,
  latency hint — the same budget as the ORT sessions. Threads are not pinned to cores (``ENABLE_CPU_PINNING``
  off; OpenVINO pins them by default with the latency hint): a pinned thread cannot move off a core another
  process is using, so on a shared machine — the host GUI, an acquisition loop, other jobs — each inference
  waits for the busiest core (measured on a loaded 2-core EPYC: 23 ms pinned vs 13 ms unpinned, INT8, batch 4).
  ONNX Runtime does not pin either.
* **INT8 only on CPUs with VNNI.** On a 2-core AVX2 EPYC without VNNI, OpenVINO's INT8 kernels did not
  reproduce the gated INT8 file: 99.09 % test accuracy and 99.3 % top-1 agreement with FP32, where ONNX Runtime
  runs the same file at 99.77 % and 100 % (mean |Δlogit| to FP32 0.166 vs 0.096; on the AVX-512 VNNI EPYC the two
  backends agree to 0.017). ``check_precision`` refuses the INT8 file there rather than run a model that lost
  what its gate measured; the FP32 file, or ONNX Runtime for the INT8 file, are the fixes it names.
* **Thread-safe.** An OpenVINO ``InferRequest`` is not; with one stream the plugin runs one inference at a time
  anyway, so one request behind a lock costs nothing and makes ``Classifier`` safe to share between threads.

``openvino`` is imported only inside these functions: the base runtime never needs it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import ArgumentError, ModelLoadError

INSTALL_HINT = "pip install 'cadbcnn[openvino]'"
PRECISION = "f32"
_ORT_TYPES = {"u8": "tensor(uint8)", "i8": "tensor(int8)", "f32": "tensor(float)", "f16": "tensor(float16)",
              "i32": "tensor(int32)", "i64": "tensor(int64)", "boolean": "tensor(bool)"}


@dataclass(frozen=True)
class NodeInfo:
    """An input or output as ``onnxruntime.NodeArg`` shows it: dynamic dimensions are None."""

    name: str
    type: str
    shape: list


def require_openvino():
    """The ``openvino`` module, or ArgumentError with the install command when it is not installed."""
    try:
        import openvino
    except ImportError:
        raise ArgumentError(f"backend 'openvino' needs OpenVINO, which is not installed: {INSTALL_HINT}, or use "
                            "the default backend (--backend onnxruntime)") from None
    return openvino


def check_precision(precision: str, name: str) -> None:
    """Refuse (ArgumentError) the INT8 file on a CPU without VNNI: OpenVINO's INT8 kernels there lose accuracy
    the file's INT8 gate did not allow (module docstring)."""
    if precision != "int8":
        return
    from . import machine

    cpu = machine.cpu_info()
    if not cpu.has_vnni:
        raise ArgumentError(f"{name}: backend 'openvino' does not run INT8 files on a CPU without VNNI ({cpu.isa}): "
                            "its INT8 kernels there lose accuracy the file's INT8 gate did not allow (measured: "
                            "99.09 % vs 99.77 % test accuracy). Use --backend onnxruntime for the INT8 file, or "
                            "--precision fp32 with --backend openvino.")


def _node(port) -> NodeInfo:
    kind = port.get_element_type().get_type_name()
    shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    return NodeInfo(port.get_any_name(), _ORT_TYPES.get(kind, f"tensor({kind})"), shape)


def reason(exc: BaseException) -> str:
    """The informative line of an OpenVINO exception (its first lines name the C++ source file that threw)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    return (useful or lines or [type(exc).__name__])[-1][:300]


def _config(threads: int) -> dict[str, Any]:
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISION, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                              "ENABLE_CPU_PINNING": False}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class OpenVINOSession:
    """A compiled OpenVINO CPU model behind the ``InferenceSession`` calls ``Classifier`` makes."""

    def __init__(self, compiled, precision: str):
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()
        self._ports = {name: port for port in compiled.outputs for name in port.get_names()}
        self.precision = precision

    def get_inputs(self) -> list[NodeInfo]:
        return [_node(p) for p in self._compiled.inputs]

    def get_outputs(self) -> list[NodeInfo]:
        return [_node(p) for p in self._compiled.outputs]

    def get_providers(self) -> list[str]:
        return [f"OpenVINO CPU ({self.precision})"]

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Like ``InferenceSession.run``: the named outputs (all when None), in that order, as new arrays."""
        names = list(output_names) if output_names else [p.get_any_name() for p in self._compiled.outputs]
        with self._lock:  # results are copies (share_outputs=False), so they outlive the next request
            try:
                result = self._request.infer(feeds)
            except Exception as exc:  # the Classifier turns this into a ModelRunError
                raise RuntimeError(reason(exc)) from None
            return [np.asarray(result[self._ports[n]]) for n in names]


def openvino_session(data: bytes, *, threads: int = 0, name: str = "<bytes>") -> OpenVINOSession:
    """Compile the ONNX model DATA (already verified by the caller) for OpenVINO's CPU plugin in FP32 precision.

    ``threads``: as ``session.resolve_threads`` returns it (0: OpenVINO's default). Raises ArgumentError when
    OpenVINO is not installed and ModelLoadError when it cannot compile the model or would not compute in f32.
    """
    ov = require_openvino()
    try:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(bytes(data)), "CPU", _config(threads))
        precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    except Exception as exc:  # OpenVINO raises its own exception types
        raise ModelLoadError(f"{name}: OpenVINO cannot load this file ({reason(exc)}). Is it an ONNX model exported "
                             "with cadbcnn-export? Or use --backend onnxruntime.") from None
    if precision != PRECISION:
        raise ModelLoadError(f"{name}: OpenVINO compiled the model for {precision} inference instead of the f32 asked "
                             f"for (openvino {ov.__version__}); its results would not match the file's. Use --backend "
                             "onnxruntime.")
    return OpenVINOSession(compiled, precision)
