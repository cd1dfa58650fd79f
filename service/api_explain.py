"""POST /v1/explain: the route, top-k and a heat map of where the model looked (service/explain.py)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from service.api_v1 import (
    ERRORS,
    Overrides,
    _image_info,
    _route_info,
    decode_routed,
    read_and_route,
    top_predictions,
)
from service.dependencies import deadline, ready_state, withdrawn_on_disconnect
from service.errors import APIError
from service.explain import HeatMap, NotExplainable
from service.explainer import Explainers
from service.preprocess import ResizeGeometry, resize_geometry, served_mode
from service.schemas import ErrorBody, Prediction, RouteInfo, Timings
from service.state import ServingState

router = APIRouter(prefix="/v1", tags=["v1"])


class HeatMapInfo(BaseModel):
    """Relevance per token cell of the model input, and where that grid lies on the image."""

    method: str = Field(description="attention_rollout (global) or window_rollout_from_token_similarity.")
    grid: tuple[int, int] = Field(description="(rows, cols) of `values`.")
    values: list[list[float]] = Field(description="Row-major relevance per cell; sums to 1.")
    cell_pixels: int = Field(description="Model-input pixels per cell side (the patch size).")
    box: tuple[float, float, float, float] = Field(
        description="(left, top, right, bottom) the grid covers, as fractions of the image's width and "
        "height; beyond 1 is padding, below 0 or above 1 in crop mode is outside the crop."
    )


class ExplainResponse(BaseModel):
    predictions: list[Prediction]
    route: RouteInfo
    image: dict = Field(description="Format and (width, height) of the decoded input.")
    heatmap: HeatMapInfo
    timings: Timings


def _heat_map_info(heat: HeatMap, geometry: ResizeGeometry, width: int, height: int) -> HeatMapInfo:
    """The heat map with its grid mapped back onto the original image through the resize geometry:
    per axis, source pixels per input pixel are the source box over the content it became."""
    left, top, right, bottom = geometry.source_box
    content_width, content_height = geometry.content_size
    rows, cols = heat.values.shape
    span_x = cols * heat.cell_pixels * (right - left) / content_width
    span_y = rows * heat.cell_pixels * (bottom - top) / content_height
    return HeatMapInfo(
        method=heat.method,
        grid=(rows, cols),
        values=heat.values.round(6).tolist(),
        cell_pixels=heat.cell_pixels,
        box=(left / width, top / height, (left + span_x) / width, (top + span_y) / height),
    )


@router.post(
    "/explain",
    name="explain",
    response_model=ExplainResponse,
    responses={**ERRORS, 501: {"model": ErrorBody, "description": "The entry cannot be explained."}},
)
async def explain(
    request: Request,
    state: Annotated[ServingState, Depends(ready_state)],
    request_deadline: Annotated[float, Depends(deadline)],
    overrides: Overrides,
    top_k: Annotated[int | None, Query(ge=1, le=1000, description="Labels to return.")] = None,
) -> ExplainResponse:
    """Route and classify an image like /v1/classify, and return a heat map of where the model looked."""
    explainers: Explainers = request.app.state.explainers
    started = time.perf_counter()
    header, route, entry = await read_and_route(request, state, overrides, request_deadline)
    async with withdrawn_on_disconnect(request):
        decoded, pixels, timings = await decode_routed(state, header, route, entry)
    width, height = decoded.original_size
    recipe = entry.config
    mode = served_mode(route.resize_mode, recipe.resize)
    geometry = resize_geometry(width, height, route.shape, mode, recipe.crop_pct)
    content_width, content_height = geometry.content_size
    submitted = time.perf_counter()
    try:
        result = await explainers.explain(entry, pixels, (content_height, content_width), request_deadline)
    except NotExplainable as exc:
        raise APIError(501, "not_explainable", f"{exc}; /v1/classify still serves it") from exc
    finished = time.perf_counter()
    timings["queue_and_inference_ms"] = (finished - submitted) * 1e3
    timings["total_ms"] = (finished - started) * 1e3
    return ExplainResponse(
        predictions=top_predictions(result.logits, entry.labels, top_k or state.settings.top_k),
        route=_route_info(route, entry),
        image=_image_info(decoded),
        heatmap=_heat_map_info(result.heat_map, geometry, width, height),
        timings=Timings(**timings),
    )
