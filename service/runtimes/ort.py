"""Embedded ONNX Runtime: the default runtime.

Providers are picked from what the installed onnxruntime offers: TensorRT and CUDA when
onnxruntime-gpu and a GPU are present, else CPU. Intra-op threads are set explicitly (the
gateway runs one session per entry and one batch at a time per session), and the session is
warmed up at load so the first request does not pay for kernel selection and allocation.

Memory (README "Memory"): the sessions of one backbone map one copy of its pre-packed weights
from files written once (ort_prepacked, `VITSERVE_ORT_PREPACKED_CACHE`, on by default), or, where
that cache is off or unusable, share one unpacked copy (ort_weights.SharedWeights,
`VITSERVE_ORT_SHARE_WEIGHTS`); the CPU arena is
off by default (`VITSERVE_ORT_CPU_ARENA`): with one session per shape, per-session arenas each keep
their peak activations for good, while without them large activation buffers go back to the system
after each batch. ONNX Runtime's memory pattern (one block per run, planned from earlier runs) is off
too (`VITSERVE_ORT_MEM_PATTERN`): measured no slower at ViT-S 224, faster on Swin-T from 448 up, and
lower at native 2048 (README "Memory").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail

from export.repository import ModelEntry
from service.runtimes.ort_prepacked import PrepackedCache
from service.runtimes.ort_weights import SharedWeights
from service.settings import SpinningPolicy

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# One store per process: every session of a backbone finds the weights the first one loaded.
SHARED_WEIGHTS = SharedWeights()

# How intra-op worker threads wait for their next piece of work (VITSERVE_ORT_SPINNING):
# - "off": block at once. Every operator of a run then pays a thread wake-up, which adds up
#   to milliseconds per batch-1 run of a small model.
# - "run": spin, for at most SPIN_DURATION_US between operators, only while a run executes; at the
#   end of each run the workers stop spinning (force_spinning_stop).
# - "always": ONNX Runtime's default: workers also keep spinning after a run returns, which is
#   fastest for back-to-back runs in an otherwise idle process and takes CPU from the gateway's
#   decode and HTTP threads under load.
# - "idle" (the default): "always" while the batch is all the work the process has (no request is
#   in flight beside the batch's rows), "run" otherwise: each entry then has a second session that
#   stops spinning when its run ends, built and warmed at load.
#   bench.serving measured `always` fastest at concurrency 1 and `run` fastest under load; `off`,
#   the busy session's policy before, served 0.8x what `run` did at c16 with mapped weights (README
#   "Benchmarks").
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
# "idle": the session that runs lone batches, and the one that runs batches beside other work.
IDLE_SPINNING, BUSY_SPINNING = "always", "run"


def available_providers() -> list[str]:
    offered = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in offered]


class OnnxRuntime:
    """One InferenceSession per repository entry (two with the "idle" spinning policy).

    With "idle", `demand()` is the number of requests the process is serving now: a batch whose rows
    are all of them runs on the always-spinning session; one that runs while other requests are
    decoded, queued or computed runs on a session whose workers stop spinning when its run ends, so
    they leave the cores to that work between batches. Both sessions are built at load; with mapped
    or shared weights the second holds only its own constants and plan.
    """

    def __init__(
        self,
        entry: ModelEntry,
        threads: int,
        spinning: SpinningPolicy = "off",
        *,
        share_weights: bool = True,
        prepacked: PrepackedCache | None = None,
        cpu_arena: bool = False,
        mem_pattern: bool = False,
        demand: Callable[[], int] | None = None,
    ):
        if spinning == "idle" and demand is None:
            raise ValueError("the idle spinning policy needs demand(), the requests in flight")
        self.entry = entry
        self._threads, self._share_weights = threads, share_weights
        self._prepacked = prepacked
        self._model = self._mapped_model() if prepacked else None
        self._cpu_arena, self._mem_pattern = cpu_arena, mem_pattern
        self._demand = demand if spinning == "idle" else None
        self.session = self._session(IDLE_SPINNING if spinning == "idle" else spinning)
        self._input = entry.input_name
        self._outputs = [entry.logits_name, entry.embedding_name]
        self._run(self.session, np.zeros((1, *entry.input_shape), dtype=np.float32))
        self._busy = self._build_busy() if spinning == "idle" else None

    def _session(self, spinning: str) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        for key, value in SPINNING_CONFIG[spinning].items():
            options.add_session_config_entry(key, value)
        options.enable_cpu_mem_arena = self._cpu_arena
        options.enable_mem_pattern = self._mem_pattern
        if self._model is not None:
            try:
                return ort.InferenceSession(str(self._model), options, providers=available_providers())
            except OrtFail as exc:
                self._cache_unusable(exc)
        if self._share_weights:
            options.add_session_config_entry("session.disable_prepacking", "1")
            SHARED_WEIGHTS.attach(self.entry.artifact, options)
        return ort.InferenceSession(str(self.entry.artifact), options, providers=available_providers())

    def _mapped_model(self) -> Path | None:
        """The entry's pre-packed model from the cache, or None (weights as ORT_SHARE_WEIGHTS says)
        when it cannot be written or read: a cache is an optimisation, never a reason not to serve."""
        if available_providers()[0] != "CPUExecutionProvider":
            return None
        try:
            return self._prepacked.model_for(self.entry.artifact)
        except (OSError, OrtFail) as exc:
            self._cache_unusable(exc)
            return None

    def _cache_unusable(self, exc: Exception) -> None:
        log.warning(
            "pre-packed model cache unusable; loading the artifact itself",
            extra={"model": self.entry.name, "cache": str(self._prepacked.directory), "reason": repr(exc)},
        )
        self._model = None

    def run(self, batch: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
        return self._run(self.session_for(len(batch)), batch)

    def session_for(self, rows: int) -> ort.InferenceSession:
        """The session a batch of `rows` runs on: the busy one while other requests are in flight."""
        busy = self._busy is not None and self._demand is not None and self._demand() > rows
        return self._busy if busy else self.session

    def _run(self, session: ort.InferenceSession, batch: np.ndarray) -> dict[str, np.ndarray]:
        logits, embedding = session.run(self._outputs, {self._input: batch})
        return {"logits": logits, "embedding": embedding}

    def _build_busy(self) -> ort.InferenceSession | None:
        """The "idle" policy's busy session, built and warmed at load: built on the first overlap
        instead, it took the cores from the batches it was meant to serve (a first pair of Swin-T
        756x1008 requests took 2.3 and 3.6 s against 1.4 s for later pairs)."""
        try:
            session = self._session(BUSY_SPINNING)
            self._run(session, np.zeros((1, *self.entry.input_shape), dtype=np.float32))
        except Exception as exc:
            log.warning(
                "busy session failed; every batch keeps the spinning one",
                extra={"model": self.entry.name, "reason": repr(exc)},
            )
            return None
        return session

    @property
    def busy_session(self) -> ort.InferenceSession | None:
        """The session batches beside other work run on ("idle" policy)."""
        return self._busy

    def describe(self) -> str:
        return f"onnxruntime {ort.__version__} ({self.session.get_providers()[0]})"
