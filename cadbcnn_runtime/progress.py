"""A dependency-free progress bar (stderr; redraws only on a terminal)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream=None):
        self.total, self.desc = total, desc
        self.stream = stream or sys.stderr
        self.enabled = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.t0 = self.last = time.time()
        self.shown = False

    @property
    def elapsed(self) -> float:
        return time.time() - self.t0

    def update(self, n: int, **fields: float) -> None:
        if not self.enabled:
            return
        now = time.time()
        if now - self.last < 0.25 and n < self.total:
            return
        self.last = now
        width = 24
        done = int(width * n / max(self.total, 1))
        eta = (now - self.t0) / max(n, 1) * (self.total - n)
        extra = "  ".join(f"{k} {v:.3f}" if k != "ips" else f"{v:.1f} img/s" for k, v in fields.items())
        self.stream.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {n}/{self.total}  {extra}  "
                          f"ETA {eta:4.0f}s ")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()
