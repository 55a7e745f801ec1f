"""The one place ONNX Runtime sessions are made: options, providers and thread budget.

Used by ``Classifier``; the exporter's parity checks and the benchmark's model-only rows should build their
sessions here too, so that what is measured is what users run.

Threads: ``intra_op_num_threads`` defaults to — and is capped at — the CPUs this process may use
(``os.sched_getaffinity`` and, where readable, the cgroup CPU quota), so ``threads=8`` in a 1-CPU container
runs one compute thread instead of oversubscribing. Spinning is off by default
(``session.intra_op.allow_spinning=0``) so a host GUI or acquisition loop is not starved between calls.

Backends: ONNX Runtime (the default, these functions) or, chosen explicitly, OpenVINO's CPU plugin
(``openvino_backend``, extra ``cadbcnn[openvino]``); ``check_backend`` refuses a bad choice before any work.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CPU_EP, CUDA_EP = "CPUExecutionProvider", "CUDAExecutionProvider"
BACKENDS = ("onnxruntime", "openvino")
BACKEND_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}  # as messages name them


def check_backend(backend: str, device: str) -> None:
    """Refuse, before any work, an unknown backend, OpenVINO on CUDA, or OpenVINO when it is not installed.

    Never a silent fallback: the backend asked for is the backend that runs, or this raises ``ArgumentError``.
    """
    from .errors import ArgumentError

    if backend not in BACKENDS:
        raise ArgumentError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "openvino":
        if device == "cuda":
            raise ArgumentError("backend 'openvino' runs on the CPU only (OpenVINO's CPU plugin); use --device cpu "
                                "(or auto), or --backend onnxruntime for CUDA")
        from .openvino_backend import require_openvino

        require_openvino()


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), None when unlimited/unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def allowed_cpus() -> int:
    """How many CPUs this process may really use (affinity mask, then cgroup quota); at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def resolve_threads(threads: int | None) -> int:
    """The intra-op thread count: the request capped at ``allowed_cpus()``.

    With no request: ONNX Runtime's own default (one thread per physical core, returned as 0) when the process
    may use every CPU of the machine, else the number of CPUs it may use.
    """
    cap = allowed_cpus()
    if threads:
        return max(1, min(int(threads), cap))
    return 0 if cap >= (os.cpu_count() or 1) else cap


def session_options(*, threads: int | None = None, spinning: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    so.intra_op_num_threads = resolve_threads(threads)  # 0 = ONNX Runtime's default
    return so


def make_session(model: str | os.PathLike | bytes, *, providers=(CPU_EP,), threads: int | None = None,
                 spinning: bool = False):
    """An ``InferenceSession`` with cadbcnn's options. ``model`` is a path or the serialized bytes."""
    import onnxruntime as ort

    source = bytes(model) if isinstance(model, (bytes, bytearray, memoryview)) else str(model)
    return ort.InferenceSession(source, sess_options=session_options(threads=threads, spinning=spinning),
                                providers=list(providers))


def make_verified_session(data: bytes, content_sha256: str, *, providers=(CPU_EP,), threads: int | None = None,
                          spinning: bool = False):
    """``make_session`` for bytes whose content hash was verified, through the optimised-graph cache on CPU.

    Returns ``(session, cache_status)``: ``"hit"``, ``"miss"`` or ``"off (…)"`` (``session_cache``).
    """
    import onnxruntime as ort

    from .session_cache import cached_cpu_session

    if list(providers) != [CPU_EP]:
        return make_session(data, providers=providers, threads=threads, spinning=spinning), "off (not CPU-only)"

    def build(source, so):
        return ort.InferenceSession(source, sess_options=so, providers=[CPU_EP])

    r = cached_cpu_session(bytes(data), content_sha256, build,
                           lambda: session_options(threads=threads, spinning=spinning))
    return r.session, r.status
