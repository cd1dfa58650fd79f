"""Explanation sessions: one instrumented ONNX Runtime session per entry, built on first use.

Explaining is for people looking at a page, not for traffic, so it stays off the serving path: the
serving sessions are untouched, explanations run one at a time on their own thread, at most
`max_explain_queue` wait (more answer 429), and a waiting request whose deadline passes is not
computed (504). Sessions are cached by artifact path, so a new entry version gets a new session.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export.repository import ModelEntry
from service.batcher import DeadlineExceeded, QueueFull
from service.explain import HeatMap, NotExplainable, check_explainable, heat_map, instrument
from service.threads import named_executor

ONNX_PLATFORM = "onnxruntime_onnx"
CACHED_SESSIONS = 4
RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class Explanation:
    logits: np.ndarray
    heat_map: HeatMap


class EntryExplainer:
    """The entry's ONNX graph with its attention probabilities (and final tokens) as extra outputs."""

    def __init__(self, entry: ModelEntry, threads: int):
        if entry.platform != ONNX_PLATFORM:
            raise NotExplainable(
                f"entry {entry.name} is {entry.platform}; explanations read ONNX artifacts "
                "(export it with --format onnx)"
            )
        check_explainable(entry.config)
        self.entry = entry
        model = onnx.load(str(entry.artifact))
        self.probes = instrument(model, entry.embedding_name)
        expected = len(entry.config.attention_kinds)
        if len(self.probes.attention) != expected:
            raise NotExplainable(
                f"entry {entry.name} has {len(self.probes.attention)} fused Attention nodes where its config has "
                f"{expected} attention layers; explanations need a fused export (without --unfused)"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        tokens = (self.probes.tokens,) if self.probes.tokens else ()
        self._outputs = [entry.logits_name, entry.embedding_name, *self.probes.attention, *tokens]

    def explain(self, pixels: np.ndarray, content: tuple[int, int]) -> Explanation:
        """Logits and heat map of one preprocessed image (3, H, W) whose image part (not padding)
        is the top-left `content` (height, width) pixels."""
        outputs = self.session.run(self._outputs, {self.entry.input_name: pixels[None]})
        logits, embedding = outputs[0], outputs[1]
        layers = len(self.probes.attention)
        attention = outputs[2 : 2 + layers]
        tokens = outputs[2 + layers] if self.probes.tokens else None
        return Explanation(
            logits[0], heat_map(self.entry.config, pixels.shape[1:], content, attention, tokens, embedding)
        )


class Explainers:
    """Per-entry explainers behind one thread, a bounded wait and an LRU of sessions."""

    def __init__(self, threads: int, max_queue: int):
        self._threads = threads
        self._max_queue = max_queue
        self._waiting = 0
        self._sessions: OrderedDict[Path, EntryExplainer] = OrderedDict()
        self._executor = named_executor(1, "explain")

    async def explain(
        self, entry: ModelEntry, pixels: np.ndarray, content: tuple[int, int], deadline: float
    ) -> Explanation:
        """Explain on the explain thread; QueueFull when `max_queue` already wait, DeadlineExceeded
        when the deadline passes before the work starts, NotExplainable for unsupported entries."""
        if self._waiting >= self._max_queue:
            raise QueueFull(f"{self._waiting} explanations are already waiting; retry shortly", RETRY_AFTER_S)
        self._waiting += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._run, entry, pixels, content, deadline)
        finally:
            self._waiting -= 1

    def _run(
        self, entry: ModelEntry, pixels: np.ndarray, content: tuple[int, int], deadline: float
    ) -> Explanation:
        if time.monotonic() > deadline:
            raise DeadlineExceeded(
                "the request deadline passed while waiting to be explained; it was not computed"
            )
        return self._explainer(entry).explain(pixels, content)

    def _explainer(self, entry: ModelEntry) -> EntryExplainer:
        """The cached explainer of `entry` (only the explain thread calls this, so no lock)."""
        explainer = self._sessions.get(entry.artifact)
        if explainer is None:
            explainer = EntryExplainer(entry, self._threads)
            self._sessions[entry.artifact] = explainer
            while len(self._sessions) > CACHED_SESSIONS:
                self._sessions.popitem(last=False)
        self._sessions.move_to_end(entry.artifact)
        return explainer

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
