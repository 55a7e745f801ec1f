"""The conditions of a benchmark run: resident memory, its peak while a runner works, and the machine,
software and threads a report states.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import threading
import time
from typing import Any

import numpy as np

from cadbcnn_runtime.machine import git_commit


# ---------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------
def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


class PeakRSS:
    """Samples this process's resident memory in a thread; reports the peak above a baseline (``base``: taken
    now unless given, e.g. before a session was built so that its memory counts).

    The sampling thread competes with the measured work for the cores (≈ 10 % of the latency on 2 cores), so
    never time anything inside it: time first, then repeat a few runs inside it (``bench.measure``).
    """

    def __init__(self, interval: float = 0.01, base: float | None = None):
        self.interval, self.base, self.peak = interval, rss_mb() if base is None else base, 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def delta(self) -> float:
        return self.peak - self.base


def conditions(threads: list[int], providers_used: dict[str, list[str]]) -> dict[str, Any]:
    import onnxruntime as ort

    from cadbcnn_runtime.machine import cpu_info

    cpu, flags = cpu_info().name, set(cpu_info().flags)
    gpu = None
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {"python": platform.python_version(), "onnxruntime": ort.__version__, "numpy": np.__version__}
    try:
        import torch

        versions["torch"] = str(torch.__version__)
    except ImportError:
        pass
    commit = git_commit(short=True)
    return {
        "cpu": cpu, "cores": os.cpu_count(),
        "isa": {k: k in flags for k in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")},
        "gpu": gpu, "versions": versions, "providers_available": ort.get_available_providers(),
        "providers_used": providers_used, "threads": threads,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": commit,
    }
