"""KServe Open Inference Protocol v2 (the protocol Triton speaks), so tritonclient works against vitserve.

Covers health, server and model metadata, model readiness and infer with JSON tensors, the
binary tensor extension (`Inference-Header-Content-Length`) and the classification extension. Infer rows go through the same
per-bucket batchers as /v1, so v2 clients are batched together with image clients.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request, Response

from export.repository import ModelEntry
from service.accounting import request_record
from service.batcher import Batcher
from service.bodies import read_body
from service.dependencies import deadline, get_state, ready_state, unless_disconnected
from service.errors import APIError
from service.schemas import V2ErrorBody, V2ModelMetadata, V2ServerMetadata, V2TensorMetadata
from service.state import ServingState
from service.v2_tensors import OUTPUT_KEYS, ParsedInfer, encode_infer, parse_infer

router = APIRouter(prefix="/v2", tags=["v2"])
HEADER_LENGTH = "inference-header-content-length"
ERRORS = {s: {"model": V2ErrorBody} for s in (400, 404, 408, 413, 422, 429, 503, 504)}


def _entry(state: ServingState, model: str) -> ModelEntry:
    if model not in state.entries:
        known = ", ".join(sorted(state.entries)) or "none"
        raise APIError(404, "model_not_found", f"unknown model {model!r}; served models: {known}")
    return state.entries[model]


def _check_version(entry: ModelEntry, version: str | None) -> None:
    if version not in (None, "", str(entry.version)):
        raise APIError(
            404, "version_not_found", f"model {entry.name} has version {entry.version}, not {version}"
        )


@router.get("/health/live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready")
async def ready(state: Annotated[ServingState, Depends(get_state)]) -> Response:
    ok = state.probe_ready
    return Response(json.dumps({"ready": ok}), status_code=200 if ok else 503, media_type="application/json")


@router.get("", response_model=V2ServerMetadata)
async def server_metadata(request: Request) -> V2ServerMetadata:
    return V2ServerMetadata(
        name="vitserve",
        version=request.app.version,
        extensions=["binary_tensor_data", "classification", "model_repository"],
    )


@router.get("/models/{model}", response_model=V2ModelMetadata, responses=ERRORS)
@router.get("/models/{model}/versions/{version}", response_model=V2ModelMetadata, responses=ERRORS)
async def model_metadata(
    model: str, state: Annotated[ServingState, Depends(get_state)], version: str | None = None
) -> V2ModelMetadata:
    entry = _entry(state, model)
    _check_version(entry, version)
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


@router.get("/models/{model}/ready")
@router.get("/models/{model}/versions/{version}/ready")
async def model_ready(
    model: str, state: Annotated[ServingState, Depends(get_state)], version: str | None = None
):
    entry = _entry(state, model)
    _check_version(entry, version)
    ok = state.probe_ready and model in state.runtimes
    return Response(
        json.dumps({"name": model, "ready": ok}),
        status_code=200 if ok else 503,
        media_type="application/json",
    )


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


@router.post("/models/{model}/infer", name="v2_infer", responses=ERRORS)
@router.post("/models/{model}/versions/{version}/infer", name="v2_infer", responses=ERRORS)
async def infer(
    model: str,
    request: Request,
    state: Annotated[ServingState, Depends(ready_state)],
    request_deadline: Annotated[float, Depends(deadline)],
    version: str | None = None,
) -> Response:
    """Run a batch of preprocessed tensors through the entry's batcher.

    The body is checked whole on the pool's worker threads (see `service.v2_tensors`), then all its
    rows are admitted at once or the request is refused 429, then they are queued.
    """
    entry = _entry(state, model)
    _check_version(entry, version)
    pool = state.pool_of(entry)
    record = request_record(request)
    record.route, record.model = pool, entry.backbone
    body = await read_body(request, state.settings.max_body_bytes, request_deadline)
    max_batch_size = state.settings.max_batch_size or entry.max_batch_size
    parsed = await state.decode(
        pool, parse_infer, body, request.headers.get(HEADER_LENGTH), entry, max_batch_size
    )
    del body
    rows = await unless_disconnected(
        request,
        _submit_rows(state.batcher(entry), parsed.pixels, _protocol_deadline(parsed, request_deadline)),
    )
    outputs = {key: np.stack([r[key] for r in rows]) for key in OUTPUT_KEYS}
    content, head_length = encode_infer(entry, parsed, outputs)
    if head_length == len(content):
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(head_length)},
    )
