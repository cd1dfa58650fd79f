"""Progress of long work (exports, benchmarks): one line per finished step with elapsed time and ETA.

    [2/6] vit_global_384 12.4 s, elapsed 31.0 s, ETA 62.0 s

Lines go to stderr, so results on stdout stay parseable, and only where someone watches: on a
terminal, and not under CI (`CI` set to anything but false/0), where logs keep the step lines anyway.
The ETA assumes the remaining steps cost the mean of the finished ones.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def watched(stream: TextIO) -> bool:
    """True on a terminal outside CI: the only place progress lines help."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false")
    return not ci and stream.isatty()


class Progress:
    """Counts `total` steps; `step(name)` reports one that just finished."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.total = max(1, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = watched(self.stream) if enabled is None else enabled
        self._started = self._last = time.perf_counter()

    def step(self, name: str) -> str:
        """Record a finished step; returns its line (written to the stream when enabled)."""
        now = time.perf_counter()
        self.done += 1
        elapsed, took = now - self._started, now - self._last
        self._last = now
        remaining = max(0, self.total - self.done)
        eta = elapsed / self.done * remaining
        line = f"[{self.done}/{self.total}] {name} {took:.1f} s, elapsed {elapsed:.1f} s, ETA {eta:.1f} s"
        if self.enabled:
            print(line, file=self.stream, flush=True)
        return line
