"""vitserve's own API: /v1/classify, /v1/embed, /v1/route, /v1/models."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request

from export.repository import ModelEntry
from service.dependencies import deadline, get_state, observed, read_body, ready_state, unless_disconnected
from service.errors import APIError
from service.imaging import DecodedImage, check_content_type, decode_image, probe_image
from service.preprocess import preprocess
from service.router import Route
from service.schemas import (
    ClassifyResponse,
    EmbedResponse,
    ErrorBody,
    ModelInfo,
    ModelsResponse,
    Prediction,
    RouteInfo,
    RouteResponse,
    Timings,
)
from service.state import ServingState

router = APIRouter(prefix="/v1", tags=["v1"])
ERRORS = {s: {"model": ErrorBody} for s in (400, 404, 413, 415, 422, 429, 503, 504)}
Pool = Literal["global", "windowed"]


@dataclass(frozen=True)
class RouteOverrides:
    """What a request forces instead of the automatic routing decision."""

    model: str | None = None
    pool: Pool | None = None
    bucket: int | None = None

    def route(self, state: ServingState, height: int, width: int) -> Route:
        model = self.model
        if self.pool is not None and model is None:
            model = {pool: backbone for backbone, pool in state.router.pools.items()}[self.pool]
        return state.router.route(height, width, override_model=model, override_bucket=self.bucket)


async def route_overrides(
    model: Annotated[str | None, Query(description="Force this backbone (see /v1/models).")] = None,
    pool: Annotated[
        Pool | None, Query(alias="route", description="Force the global or windowed pool.")
    ] = None,
    bucket: Annotated[int | None, Query(gt=0, description="Force this resolution bucket.")] = None,
) -> RouteOverrides:
    return RouteOverrides(model, pool, bucket)


Overrides = Annotated[RouteOverrides, Depends(route_overrides)]


class RoutedImage:
    """One decoded, routed and preprocessed request image."""

    def __init__(
        self, route: Route, entry: ModelEntry, decoded: DecodedImage, pixels: np.ndarray, timings: dict
    ):
        self.route, self.entry, self.decoded, self.pixels, self.timings = (
            route,
            entry,
            decoded,
            pixels,
            timings,
        )


def _route_info(route: Route, entry: ModelEntry) -> RouteInfo:
    return RouteInfo(
        model=route.model,
        entry=entry.name,
        pool=route.pool,
        bucket=route.bucket,
        tokens=route.tokens,
        image_tokens=route.image_tokens,
        scale=route.scale,
        resized=route.resized,
        resize_mode=route.resize_mode,
        reason=route.reason,
    )


def _prepare(state: ServingState, data: bytes, overrides: RouteOverrides) -> RoutedImage:
    """Probe, route, decode and preprocess in one worker-thread hop."""
    settings = state.settings
    started = time.perf_counter()
    header = probe_image(data, max_bytes=settings.max_body_bytes, max_pixels=settings.max_pixels)
    route = overrides.route(state, header.height, header.width)
    entry = state.entry_for(route.model, route.bucket)
    decoded = decode_image(
        header,
        max_bytes=settings.max_body_bytes,
        max_pixels=settings.max_pixels,
        target_side=route.bucket,
        mode=route.resize_mode,
    )
    decoded_at = time.perf_counter()
    pixels = preprocess(
        decoded.pixels,
        route.bucket,
        entry.mean,
        entry.std,
        route.resize_mode,
        original_size=decoded.original_size,
    )
    done = time.perf_counter()
    timings = {"decode_ms": (decoded_at - started) * 1e3, "preprocess_ms": (done - decoded_at) * 1e3}
    return RoutedImage(route, entry, decoded, pixels, timings)


async def _image_bytes(request: Request, state: ServingState) -> bytes:
    """Raw image body (Content-Type image/*) or the multipart field `image`."""
    content_type = request.headers.get("content-type", "")
    limit = state.settings.max_body_bytes
    if content_type.startswith("multipart/form-data"):
        body_limit_check = request.headers.get("content-length")
        if body_limit_check and body_limit_check.isdigit() and int(body_limit_check) > limit + 64 * 1024:
            raise APIError(413, "payload_too_large", f"request body exceeds the {limit}-byte limit")
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "missing_image", "multipart body needs a file field named 'image'")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise APIError(413, "payload_too_large", f"image exceeds the {limit}-byte limit")
        check_content_type(upload.content_type if upload.content_type != "application/octet-stream" else None)
        return data
    data = await read_body(request, limit)
    check_content_type(content_type or None)
    return data


async def _run(
    request: Request, state: ServingState, endpoint: str, overrides: RouteOverrides, request_deadline: float
) -> tuple[RoutedImage, dict[str, np.ndarray]]:
    """Shared path of classify and embed: read, prepare off the loop, batch, return outputs and timings."""
    metrics = state.metrics
    with observed(metrics, endpoint) as record:
        started = time.perf_counter()
        data = await _image_bytes(request, state)
        loop = request.app.state.loop
        routed = await loop.run_in_executor(state.cpu_pool, _prepare, state, data, overrides)
        record.route, record.model = routed.route.pool, routed.route.model
        metrics.route_decisions.labels(routed.route.pool, str(routed.route.bucket)).inc()
        metrics.preprocess_duration.labels(routed.route.pool).observe(
            (routed.timings["decode_ms"] + routed.timings["preprocess_ms"]) / 1e3
        )
        submitted = time.perf_counter()
        outputs = await unless_disconnected(
            request, state.batcher(routed.entry).submit(routed.pixels, request_deadline)
        )
        finished = time.perf_counter()
        routed.timings["queue_and_inference_ms"] = (finished - submitted) * 1e3
        routed.timings["total_ms"] = (finished - started) * 1e3
        return routed, outputs


def _image_info(decoded: DecodedImage) -> dict:
    return {"format": decoded.format, "width": decoded.original_size[0], "height": decoded.original_size[1]}


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS)
async def classify(
    request: Request,
    state: Annotated[ServingState, Depends(ready_state)],
    request_deadline: Annotated[float, Depends(deadline)],
    overrides: Overrides,
    top_k: Annotated[int | None, Query(ge=1, le=1000, description="Labels to return.")] = None,
) -> ClassifyResponse:
    """Classify an image: raw bytes with Content-Type image/*, or multipart field `image`."""
    routed, outputs = await _run(request, state, "classify", overrides, request_deadline)
    logits = outputs["logits"].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    k = min(top_k or state.settings.top_k, probs.size)
    order = np.argpartition(-probs, k - 1)[:k]
    order = order[np.argsort(-probs[order])]
    labels = routed.entry.labels
    return ClassifyResponse(
        predictions=[
            Prediction(index=int(i), label=labels[i] if i < len(labels) else str(i), score=float(probs[i]))
            for i in order
        ],
        route=_route_info(routed.route, routed.entry),
        image=_image_info(routed.decoded),
        timings=Timings(**routed.timings),
    )


@router.post("/embed", response_model=EmbedResponse, responses=ERRORS)
async def embed(
    request: Request,
    state: Annotated[ServingState, Depends(ready_state)],
    request_deadline: Annotated[float, Depends(deadline)],
    overrides: Overrides,
) -> EmbedResponse:
    """The pooled embedding of an image (same input as /v1/classify)."""
    routed, outputs = await _run(request, state, "embed", overrides, request_deadline)
    vector = outputs["embedding"].astype(np.float32)
    return EmbedResponse(
        embedding=vector.tolist(),
        dim=int(vector.size),
        route=_route_info(routed.route, routed.entry),
        image=_image_info(routed.decoded),
        timings=Timings(**routed.timings),
    )


@router.get("/route", response_model=RouteResponse, responses=ERRORS)
async def explain_route(
    state: Annotated[ServingState, Depends(ready_state)],
    width: Annotated[int, Query(gt=0, le=1_000_000)],
    height: Annotated[int, Query(gt=0, le=1_000_000)],
    overrides: Overrides,
) -> RouteResponse:
    """The routing decision for an image size and the cost estimates behind it; runs no model."""
    with observed(state.metrics, "route") as record:
        route = overrides.route(state, height, width)
        record.route, record.model = route.pool, route.model
        info = _route_info(route, state.entry_for(route.model, route.bucket))
        return RouteResponse(
            **info.model_dump(),
            width=width,
            height=height,
            candidates=list(route.candidates),
        )


@router.get("/models", response_model=ModelsResponse)
async def list_served_models(state: Annotated[ServingState, Depends(get_state)]) -> ModelsResponse:
    """Served entries with their bucket, runtime and readiness."""
    models = [
        ModelInfo(
            name=e.name,
            backbone=e.backbone,
            arch=e.arch,
            pool=state.pool_of(e),
            bucket=e.bucket,
            tokens=e.tokens,
            attention=list(e.attention),
            precision=e.precision,
            platform=e.platform,
            runtime=state.runtimes[e.name].describe() if e.name in state.runtimes else "loading",
            max_batch_size=e.max_batch_size,
            ready=state.ready and e.name in state.runtimes,
        )
        for e in state.entries.values()
    ]
    backbones = {b: sorted(buckets) for b, buckets in state.backbones.items()}
    return ModelsResponse(ready=state.ready, models=models, backbones=backbones)
