"""Embedded ONNX Runtime: the default runtime.

Providers are picked from what the installed onnxruntime offers: TensorRT and CUDA when
onnxruntime-gpu and a GPU are present, else CPU. Intra-op threads are set explicitly (the
gateway runs one session per entry and one batch at a time per session), and the session is
warmed up at load so the first request does not pay for kernel selection and allocation.

Memory (README "Memory"): the sessions of one backbone share one copy of its weights
(ort_weights.SharedWeights, `VITSERVE_ORT_SHARE_WEIGHTS`), and the CPU arena is off by default
(`VITSERVE_ORT_CPU_ARENA`): with one session per shape, per-session arenas each keep their peak
activations for good, while without them large activation buffers go back to the system after
each batch.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from export.repository import ModelEntry
from service.runtimes.ort_weights import SharedWeights
from service.settings import SpinningPolicy

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# One store per process: every session of a backbone finds the weights the first one loaded.
SHARED_WEIGHTS = SharedWeights()

# How intra-op worker threads wait for their next piece of work (VITSERVE_ORT_SPINNING):
# - "off": block at once. Every operator of a run then pays a thread wake-up, which adds up
#   to milliseconds per batch-1 run of a small model.
# - "run": spin, for at most SPIN_DURATION_US between operators, only while a run executes; at the
#   end of each run the workers stop spinning (force_spinning_stop). Inside a run the workers
#   would idle anyway between operators, while between runs the cores belong to the decode and
#   preprocess threads of the next requests. Spinning happens only while the session holds the
#   cores. In bench.serving on the shared 2-core machine (other jobs runnable) `off` answered
#   fastest, `run` second, `always` last, so `off` stays the default until a quiet run says otherwise.
# - "always": ONNX Runtime's default: workers also keep spinning after a run returns, which is
#   fastest for back-to-back runs in an otherwise idle process and starves the gateway's other
#   threads under load.
SPIN_DURATION_US = 200
SPINNING_CONFIG: dict[str, dict[str, str]] = {
    "off": {"session.intra_op.allow_spinning": "0"},
    "run": {
        "session.intra_op.allow_spinning": "1",
        "session.intra_op.spin_duration_us": str(SPIN_DURATION_US),
        "session.force_spinning_stop": "1",
    },
    "always": {"session.intra_op.allow_spinning": "1"},
}


def available_providers() -> list[str]:
    offered = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in offered]


class OnnxRuntime:
    """One InferenceSession per repository entry."""

    def __init__(
        self,
        entry: ModelEntry,
        threads: int,
        spinning: SpinningPolicy = "off",
        *,
        share_weights: bool = True,
        cpu_arena: bool = False,
    ):
        self.entry = entry
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        for key, value in SPINNING_CONFIG[spinning].items():
            options.add_session_config_entry(key, value)
        options.enable_cpu_mem_arena = cpu_arena
        if share_weights:
            options.add_session_config_entry("session.disable_prepacking", "1")
            SHARED_WEIGHTS.attach(entry.artifact, options)
        self.session = ort.InferenceSession(str(entry.artifact), options, providers=available_providers())
        self._input = entry.input_name
        self._outputs = [entry.logits_name, entry.embedding_name]
        self.run(np.zeros((1, *entry.input_shape), dtype=np.float32))

    def run(self, batch: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
        logits, embedding = self.session.run(self._outputs, {self._input: batch})
        return {"logits": logits, "embedding": embedding}

    def describe(self) -> str:
        return f"onnxruntime {ort.__version__} ({self.session.get_providers()[0]})"
