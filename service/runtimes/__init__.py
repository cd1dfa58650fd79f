"""Runtimes execute one batch of one repository entry; nothing upstream knows which one runs.

Every runtime reads the same model repository entry and returns outputs keyed by role
("logits", "embedding"), whatever the artifact's own output names are.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from export.repository import ModelEntry

RUNTIMES = ("onnxruntime",)


class Runtime(Protocol):
    """Blocking batch execution; called from a worker thread, never from the event loop."""

    entry: ModelEntry

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(B, 3, H, W) float32 -> {"logits": (B, C), "embedding": (B, D)}."""
        ...

    def describe(self) -> str:
        """Runtime and device in a few words, for /v1/models."""
        ...


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot execute now (e.g. a remote pool is down); the gateway answers 503."""


def load_runtime(kind: str, entry: ModelEntry, threads: int) -> Runtime:
    """Instantiate and warm up the runtime `kind` for `entry`."""
    if kind == "onnxruntime":
        from service.runtimes.ort import OnnxRuntime

        return OnnxRuntime(entry, threads)
    raise ValueError(f"unknown runtime {kind!r}; choose one of {', '.join(RUNTIMES)}")
