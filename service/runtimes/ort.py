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

import logging
import threading

import numpy as np
import onnxruntime as ort

from export.repository import ModelEntry
from service.runtimes.lanes import PoolLanes
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
    """One InferenceSession per repository entry, and a narrow one for running beside other batches.

    With `lanes` (the pool's PoolLanes, CPU only), a batch that starts while another batch of the pool
    runs uses a session of threads / lanes intra-op threads (service/runtimes/lanes.py). That session
    is built the first time it is needed, in the background (the batch that asked runs on the wide
    session meanwhile), so entries that never see concurrent load hold only one session.
    """

    def __init__(
        self,
        entry: ModelEntry,
        threads: int,
        spinning: SpinningPolicy = "off",
        *,
        share_weights: bool = True,
        cpu_arena: bool = False,
        lanes: PoolLanes | None = None,
    ):
        self.entry = entry
        self._spinning, self._share_weights, self._cpu_arena = spinning, share_weights, cpu_arena
        self.session = self._session(threads)
        on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
        self._lanes = lanes if on_cpu and lanes is not None and lanes.lanes > 1 else None
        self._narrow_threads = max(1, threads // lanes.lanes) if self._lanes is not None else threads
        self._narrow: ort.InferenceSession | None = None
        self._narrow_started = False
        self._narrow_lock = threading.Lock()
        self._input = entry.input_name
        self._outputs = [entry.logits_name, entry.embedding_name]
        self._run(self.session, np.zeros((1, *entry.input_shape), dtype=np.float32))

    def _session(self, threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        for key, value in SPINNING_CONFIG[self._spinning].items():
            options.add_session_config_entry(key, value)
        options.enable_cpu_mem_arena = self._cpu_arena
        if self._share_weights:
            options.add_session_config_entry("session.disable_prepacking", "1")
            SHARED_WEIGHTS.attach(self.entry.artifact, options)
        return ort.InferenceSession(str(self.entry.artifact), options, providers=available_providers())

    def run(self, batch: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
        if self._lanes is None:
            return self._run(self.session, batch)
        with self._lanes.batch() as alone:
            session = self.session if alone else self._narrow_session()
            return self._run(session, batch)

    def _run(self, session: ort.InferenceSession, batch: np.ndarray) -> dict[str, np.ndarray]:
        logits, embedding = session.run(self._outputs, {self._input: batch})
        return {"logits": logits, "embedding": embedding}

    def _narrow_session(self) -> ort.InferenceSession:
        """The narrow session once built; until then the wide one, after starting the build once."""
        with self._narrow_lock:
            if self._narrow is None and not self._narrow_started:
                self._narrow_started = True
                threading.Thread(
                    target=self._build_narrow, name=f"narrow-{self.entry.name}", daemon=True
                ).start()
        return self._narrow or self.session

    def _build_narrow(self) -> None:
        try:
            session = self._session(self._narrow_threads)
            self._run(session, np.zeros((1, *self.entry.input_shape), dtype=np.float32))
        except Exception as exc:
            log.warning(
                "narrow session failed; batches keep the wide one",
                extra={"model": self.entry.name, "reason": repr(exc)},
            )
            return
        self._narrow = session

    @property
    def narrow_ready(self) -> bool:
        """Whether batches beside others run on the narrow session yet."""
        return self._narrow is not None

    def describe(self) -> str:
        return f"onnxruntime {ort.__version__} ({self.session.get_providers()[0]})"
