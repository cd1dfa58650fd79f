"""KServe Open Inference Protocol v2 (the protocol Triton speaks), so tritonclient works against vitserve.

Covers health, server and model metadata, model readiness and infer with JSON tensors, the
binary tensor extension (`Inference-Header-Content-Length`) and the classification extension. Infer rows go through the same
per-bucket batchers as /v1, so v2 clients are batched together with image clients. What the
operations do is shared with the gRPC service (`service.v2_core`); this module is their HTTP face.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from service import v2_core
from service.accounting import request_record
from service.bodies import read_body
from service.dependencies import deadline, get_state, ready_state, withdrawn_on_disconnect
from service.schemas import V2ErrorBody, V2ModelMetadata, V2ServerMetadata
from service.state import ServingState
from service.v2_tensors import encode_infer, parse_infer

router = APIRouter(prefix="/v2", tags=["v2"])
HEADER_LENGTH = "inference-header-content-length"
ERRORS = {s: {"model": V2ErrorBody} for s in (400, 404, 408, 413, 422, 429, 503, 504)}


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
        name=v2_core.SERVER_NAME, version=request.app.version, extensions=list(v2_core.EXTENSIONS)
    )


@router.get("/models/{model}", response_model=V2ModelMetadata, responses=ERRORS)
@router.get("/models/{model}/versions/{version}", response_model=V2ModelMetadata, responses=ERRORS)
async def model_metadata(
    model: str, state: Annotated[ServingState, Depends(get_state)], version: str | None = None
) -> V2ModelMetadata:
    return v2_core.model_metadata(v2_core.served_entry(state, model, version))


@router.get("/models/{model}/ready")
@router.get("/models/{model}/versions/{version}/ready")
async def model_ready(
    model: str, state: Annotated[ServingState, Depends(get_state)], version: str | None = None
):
    ok = v2_core.model_ready(state, v2_core.served_entry(state, model, version))
    return Response(
        json.dumps({"name": model, "ready": ok}),
        status_code=200 if ok else 503,
        media_type="application/json",
    )


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
    entry = v2_core.served_entry(state, model, version)
    pool = state.pool_of(entry)
    record = request_record(request)
    record.route, record.model = pool, entry.backbone
    body = await read_body(request, state.settings.max_body_bytes, request_deadline)
    parsed = await state.decode(
        pool,
        parse_infer,
        body,
        request.headers.get(HEADER_LENGTH),
        entry,
        v2_core.max_request_rows(state, entry),
    )
    del body
    async with withdrawn_on_disconnect(request):
        outputs = await v2_core.run_infer(state, entry, parsed, request_deadline)
    content, head_length = encode_infer(entry, parsed, outputs)
    if head_length == len(content):
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(head_length)},
    )
