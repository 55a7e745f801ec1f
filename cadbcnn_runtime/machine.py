"""What this CPU is and can do — the one place that reads ``/proc/cpuinfo`` (torch-free)."""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class CpuInfo:
    name: str
    flags: frozenset

    @property
    def has_bf16(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def has_vnni(self) -> bool:
        """INT8 dot-product instructions (AVX512-VNNI or AVX-VNNI): where INT8 inference pays off most."""
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def isa(self) -> str:
        """A short summary such as 'AVX-512 VNNI BF16' or 'AVX2'."""
        parts = ["AVX-512" if "avx512f" in self.flags else "AVX2" if "avx2" in self.flags else "SSE"]
        parts += [n for n, ok in (("VNNI", self.has_vnni), ("BF16", self.has_bf16),
                                  ("AMX", "amx_tile" in self.flags)) if ok]
        return " ".join(parts)


def parse_cpuinfo(text: str) -> CpuInfo:
    name, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name is None:
            name = value.strip()
        elif key == "flags" and flags is None:
            flags = frozenset(value.split())
    return CpuInfo(name or platform.processor() or platform.machine(), flags or frozenset())


def git_commit(short: bool = False) -> str | None:
    """The commit of the cadbcnn source tree this runs from (None outside a git checkout)."""
    cmd = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return CpuInfo(platform.processor() or platform.machine(), frozenset())
