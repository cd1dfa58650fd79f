"""One copy of a backbone's weights for all its ONNX Runtime sessions.

Every shape of a backbone is its own artifact (fixed spatial dims run faster in ONNX Runtime and
Triton batches per shape), but the weights are the same tensors. `SharedWeights` reads each
artifact's initializers once, keeps one OrtValue per distinct tensor content (dtype, dims and
bytes: shape-dependent constants such as interpolated position tables or shift masks differ and
stay per session) and hands it to each session with `SessionOptions.add_initializer`, which makes
ONNX Runtime use that buffer instead of allocating its own. Content, not name, is the key: the
exporter names folded constants (transposed MatMul weights, `val_1655`) by their position in the
traced graph, so the same weight has a different name in every shape's artifact. Adding a shape
therefore adds its activations and shape-dependent constants, not another copy of the weights.

Pre-packing is disabled for the same reason: ONNX Runtime would otherwise re-lay out each shared
MatMul weight into a private buffer per session (measured in bench/results/memory.json).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

# Smaller tensors (biases, norms, scalars) are not worth a lookup.
MIN_SHARED_BYTES = 4096


class SharedWeights:
    """Initializer OrtValues by content, shared by the sessions of one process."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[np.ndarray, ort.OrtValue]] = {}
        self._lock = threading.Lock()

    def attach(self, artifact: Path, options: ort.SessionOptions) -> int:
        """Register the shared copy of every large initializer of `artifact` on `options`, under the
        name this artifact gives it; returns the bytes reused from sessions created before it."""
        model = onnx.load(str(artifact), load_external_data=True)
        reused = 0
        with self._lock:
            for tensor in model.graph.initializer:
                array = numpy_helper.to_array(tensor)
                if array.nbytes < MIN_SHARED_BYTES:
                    continue
                key = _digest(array)
                if key in self._values:
                    reused += array.nbytes
                else:
                    kept = np.ascontiguousarray(array)
                    self._values[key] = (kept, ort.OrtValue.ortvalue_from_numpy(kept))
                options.add_initializer(tensor.name, self._values[key][1])
        return reused

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct tensors held."""
        return sum(array.nbytes for array, _ in self._values.values())


def _digest(array: np.ndarray) -> str:
    header = f"{array.dtype}{array.shape}".encode()
    return hashlib.blake2b(header + np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


__all__ = ["SharedWeights"]
