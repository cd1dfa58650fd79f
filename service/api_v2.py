"""KServe Open Inference Protocol v2 (the protocol Triton speaks), so tritonclient works against vitserve.

Covers health, server and model metadata, model readiness and infer with JSON tensors and with
the binary tensor extension (`Inference-Header-Content-Length`). Infer rows go through the same
per-bucket batchers as /v1, so v2 clients are batched together with image clients.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import ValidationError

from export.repository import ModelEntry
from service.batcher import Batcher
from service.dependencies import deadline, get_state, observed, read_body, ready_state, unless_disconnected
from service.errors import APIError
from service.schemas import (
    V2ErrorBody,
    V2InferRequest,
    V2ModelMetadata,
    V2RequestedOutput,
    V2ServerMetadata,
    V2TensorMetadata,
)
from service.state import ServingState

router = APIRouter(prefix="/v2", tags=["v2"])
HEADER_LENGTH = "inference-header-content-length"
ERRORS = {s: {"model": V2ErrorBody} for s in (400, 404, 413, 422, 429, 503, 504)}
DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64}


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
    ok = state.ready and not state.draining
    return Response(json.dumps({"ready": ok}), status_code=200 if ok else 503, media_type="application/json")


@router.get("", response_model=V2ServerMetadata)
async def server_metadata(request: Request) -> V2ServerMetadata:
    return V2ServerMetadata(
        name="vitserve", version=request.app.version, extensions=["binary_tensor_data", "model_repository"]
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
    ok = state.ready and not state.draining and model in state.runtimes
    return Response(
        json.dumps({"name": model, "ready": ok}),
        status_code=200 if ok else 503,
        media_type="application/json",
    )


def _parse_infer(body: bytes, header_length: str | None) -> tuple[V2InferRequest, bytes]:
    """Split the JSON header from the binary tensor section and validate it."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise APIError(
                400, "invalid_request", f"Inference-Header-Content-Length {header_length} is invalid"
            )
        head, binary = body[: int(header_length)], body[int(header_length) :]
    else:
        head, binary = body, b""
    try:
        return V2InferRequest.model_validate_json(head), binary
    except ValidationError as exc:
        raise APIError(400, "invalid_request", f"invalid v2 infer request: {exc.errors()[0]['msg']}") from exc


def _input_array(request: V2InferRequest, binary: bytes, entry: ModelEntry) -> np.ndarray:
    """The request's pixel tensor as a float32 (B, 3, H, W) array, from JSON data or binary data."""
    tensors = {t.name: t for t in request.inputs}
    if entry.input_name not in tensors:
        raise APIError(400, "invalid_request", f"model {entry.name} needs input {entry.input_name!r}")
    tensor = tensors[entry.input_name]
    if tensor.datatype not in DTYPES:
        raise APIError(400, "invalid_request", f"input datatype {tensor.datatype} unsupported; send FP32")
    expected = list(entry.input_shape)
    if len(tensor.shape) != 4 or tensor.shape[1:] != expected or tensor.shape[0] < 1:
        raise APIError(
            400,
            "invalid_request",
            f"input shape {tensor.shape} does not match [-1, {', '.join(map(str, expected))}]",
        )
    dtype = DTYPES[tensor.datatype]
    count = int(np.prod(tensor.shape))
    if tensor.data is not None:
        array = np.asarray(tensor.data, dtype=dtype)
    else:
        offset = 0
        for other in request.inputs:
            if other.name == tensor.name:
                break
            offset += int(other.parameters.get("binary_data_size", 0))
        size = int(tensor.parameters.get("binary_data_size", 0))
        array = np.frombuffer(binary, dtype=dtype, count=size // np.dtype(dtype).itemsize, offset=offset)
    if array.size != count:
        raise APIError(
            400, "invalid_request", f"input has {array.size} values, shape {tensor.shape} needs {count}"
        )
    return np.ascontiguousarray(array.reshape(tensor.shape), dtype=np.float32)


def _encode_response(entry: ModelEntry, request: V2InferRequest, outputs: dict[str, np.ndarray]) -> Response:
    """JSON tensors, or the binary extension for outputs that ask for it."""
    by_name = {entry.logits_name: outputs["logits"], entry.embedding_name: outputs["embedding"]}
    wanted = request.outputs or [V2RequestedOutput(name=n) for n in by_name]
    default_binary = bool(request.parameters.get("binary_data_output", False))
    described, blobs = [], []
    for output in wanted:
        if output.name not in by_name:
            raise APIError(
                400,
                "invalid_request",
                f"model {entry.name} has no output {output.name!r}; outputs: {list(by_name)}",
            )
        array = np.ascontiguousarray(by_name[output.name], dtype=np.float32)
        item = {"name": output.name, "datatype": "FP32", "shape": list(array.shape)}
        if output.parameters.get("binary_data", default_binary):
            blob = array.tobytes()
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = array.ravel().tolist()
        described.append(item)
    head = json.dumps(
        {
            "model_name": entry.name,
            "model_version": str(entry.version),
            "id": request.id or "",
            "outputs": described,
        }
    ).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


def _protocol_deadline(request: V2InferRequest, deadline: float) -> float:
    """The v2 `timeout` parameter (microseconds, as tritonclient and Triton use it) tightens the deadline."""
    timeout_us = request.parameters.get("timeout")
    if isinstance(timeout_us, int | float) and not isinstance(timeout_us, bool) and timeout_us > 0:
        return min(deadline, time.monotonic() + timeout_us / 1e6)
    return deadline


async def _submit_rows(batcher: Batcher, pixels: np.ndarray, request_deadline: float) -> list[dict]:
    """Submit every row; when one fails (queue full, deadline), withdraw the rows still queued.

    Rows that a batch has already taken still run: the batcher admits rows one at a time.
    """
    rows = [asyncio.ensure_future(batcher.submit(row, request_deadline)) for row in pixels]
    try:
        return await asyncio.gather(*rows)
    except BaseException:
        for row in rows:
            row.cancel()
        raise


@router.post("/models/{model}/infer", responses=ERRORS)
@router.post("/models/{model}/versions/{version}/infer", responses=ERRORS)
async def infer(
    model: str,
    request: Request,
    state: Annotated[ServingState, Depends(ready_state)],
    request_deadline: Annotated[float, Depends(deadline)],
    version: str | None = None,
) -> Response:
    """Run a batch of preprocessed tensors through the entry's batcher."""
    with observed(state.metrics, "v2_infer") as record:
        entry = _entry(state, model)
        _check_version(entry, version)
        record.route, record.model = state.pool_of(entry), entry.backbone
        body = await read_body(request, state.settings.max_body_bytes)
        parsed, binary = _parse_infer(body, request.headers.get(HEADER_LENGTH))
        pixels = _input_array(parsed, binary, entry)
        rows = await unless_disconnected(
            request, _submit_rows(state.batcher(entry), pixels, _protocol_deadline(parsed, request_deadline))
        )
        outputs = {key: np.stack([r[key] for r in rows]) for key in ("logits", "embedding")}
        return _encode_response(entry, parsed, outputs)
