"""The KServe v2 operations both transports serve: HTTP (`service.api_v2`) and gRPC (`service.grpc_server`).

Model lookup, readiness, metadata and running a checked infer request through the entry's batcher
live here once, so the two transports cannot drift apart: the same request gets the same 404, 429,
503 or 504 and the same rows are co-batched with /v1 image requests whichever way they came in.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from export.repository import ModelEntry
from service.batcher import Batcher
from service.errors import APIError
from service.schemas import V2ModelMetadata, V2TensorMetadata
from service.state import ServingState
from service.v2_tensors import OUTPUT_KEYS, ParsedInfer

SERVER_NAME = "vitserve"
EXTENSIONS = ("binary_tensor_data", "classification", "model_repository")


def served_entry(state: ServingState, model: str, version: str | None = None) -> ModelEntry:
    """The served entry called `model`; 404 naming the served ones, or the version it has."""
    if model not in state.entries:
        known = ", ".join(sorted(state.entries)) or "none"
        raise APIError(404, "model_not_found", f"unknown model {model!r}; served models: {known}")
    entry = state.entries[model]
    if version not in (None, "", str(entry.version)):
        raise APIError(
            404, "version_not_found", f"model {entry.name} has version {entry.version}, not {version}"
        )
    return entry


def model_ready(state: ServingState, entry: ModelEntry) -> bool:
    return state.probe_ready and entry.name in state.runtimes


def model_metadata(entry: ModelEntry) -> V2ModelMetadata:
    cfg = entry.config
    return V2ModelMetadata(
        name=entry.name,
        versions=[str(entry.version)],
        platform=entry.platform,
        inputs=[V2TensorMetadata(name=entry.input_name, datatype="FP32", shape=[-1, *entry.input_shape])],
        outputs=[
            V2TensorMetadata(
                name=entry.logits_name, datatype="FP32", shape=[-1, cfg.num_classes or cfg.num_features]
            ),
            V2TensorMetadata(name=entry.embedding_name, datatype="FP32", shape=[-1, cfg.num_features]),
        ],
    )


def max_request_rows(state: ServingState, entry: ModelEntry) -> int:
    """The most rows one infer request may carry (config.pbtxt's max_batch_size unless the settings
    cap it); not `state.batch_limit`, the calibrated batch the batcher forms."""
    return state.settings.max_batch_size or entry.max_batch_size


def _protocol_deadline(parsed: ParsedInfer, deadline: float) -> float:
    """The v2 `timeout` parameter tightens the request's deadline."""
    if parsed.timeout_us is None:
        return deadline
    return min(deadline, time.monotonic() + parsed.timeout_us / 1e6)


async def _submit_rows(batcher: Batcher, pixels: np.ndarray, request_deadline: float) -> list[dict]:
    """Admit all rows at once (or 429), submit each; when one fails, withdraw the rows still queued.

    Rows that a batch has already taken still run: the batcher queues rows one at a time.
    """
    with batcher.reserve(len(pixels)) as reservation:
        rows = [asyncio.ensure_future(batcher.submit(row, request_deadline, reservation)) for row in pixels]
        try:
            return await asyncio.gather(*rows)
        except BaseException:
            for row in rows:
                row.cancel()
            raise


async def run_infer(
    state: ServingState, entry: ModelEntry, parsed: ParsedInfer, request_deadline: float
) -> dict[str, np.ndarray]:
    """The outputs of a checked request's rows, keyed like `OUTPUT_KEYS`, stacked in row order.

    Cancelling the returned awaitable (the client went away) withdraws the rows still queued.
    """
    deadline = _protocol_deadline(parsed, request_deadline)
    rows = await _submit_rows(state.batcher(entry), parsed.pixels, deadline)
    return {key: np.stack([r[key] for r in rows]) for key in OUTPUT_KEYS}
