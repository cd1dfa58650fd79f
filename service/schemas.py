"""Typed request and response bodies, so the OpenAPI schema says exactly what the API returns."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictStr

from service.router import Candidate


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code.")
    message: str = Field(description="What was wrong and what to do.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class V2ErrorBody(BaseModel):
    """KServe v2 error: the protocol makes `error` the message string; `code` is vitserve's stable code."""

    error: str = Field(description="What was wrong and what to do.")
    code: str = Field(description="Stable machine-readable error code.")


class RouteInfo(BaseModel):
    """The routing decision for one image size, with every candidate the router weighed."""

    model: str = Field(description="Backbone serving the request.")
    entry: str = Field(description="Repository entry (backbone and shape) that runs it.")
    pool: Literal["global", "windowed"]
    shape: tuple[int, int] = Field(description="[height, width] served.")
    bucket: int = Field(description="Long side of the served shape.")
    tokens: int = Field(description="Tokens of the backbone at the shape.")
    image_tokens: int = Field(description="Tokens of the image at the global backbone's patch size.")
    scale: float
    resized: tuple[int, int] = Field(
        description="[height, width] of the content after resizing, before pad/crop."
    )
    resize_mode: Literal["pad", "crop", "squash"]
    padding: float = Field(description="Fraction of the served pixels that are padding.")
    detail: float = Field(description="Served content pixels / image pixels, capped at 1.")
    expected_ms: float = Field(description="Expected queue wait plus compute, from calibrated costs.")
    budget_ms: float = Field(description="The request's latency budget.")
    degraded: bool = Field(description="Load made the router serve less detail than the budget allowed.")
    policy: Literal["cost", "square"]
    cost_source: str = Field(description="measured at start-up, calibration file, or estimated from FLOPs.")
    reason: str
    candidates: list[Candidate]


class RouteResponse(RouteInfo):
    width: int
    height: int


class Timings(BaseModel):
    """Server-side milliseconds spent in each stage of this request."""

    decode_ms: float
    preprocess_ms: float
    queue_and_inference_ms: float
    total_ms: float


class Prediction(BaseModel):
    index: int
    label: str
    score: float = Field(description="Softmax probability.")


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]
    route: RouteInfo
    image: dict[str, Any] = Field(description="Format and (width, height) of the decoded input.")
    timings: Timings


class EmbedResponse(BaseModel):
    embedding: list[float]
    dim: int
    route: RouteInfo
    image: dict[str, Any]
    timings: Timings


class ModelInfo(BaseModel):
    name: str
    backbone: str
    arch: str
    pool: Literal["global", "windowed"]
    bucket: int
    shape: tuple[int, int]
    tokens: int
    attention: list[str]
    precision: str
    platform: str
    runtime: str
    max_batch_size: int = Field(
        description="Batch limit: the best measured throughput within config.pbtxt's."
    )
    cost_source: str
    batch_seconds: dict[str, float] = Field(description="Calibrated seconds per batch, by batch size.")
    ready: bool


class ModelsResponse(BaseModel):
    ready: bool
    models: list[ModelInfo]
    backbones: dict[str, list[str]] = Field(description="Backbone -> shapes it serves (224 or HxW).")


# Strict on purpose: `true`, `"1.5"`, `null` or `{}` are not tensor values, and NaN/Infinity would
# come back as invalid JSON; JSON integers still count as numbers.
V2Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
V2Dim = Annotated[int, Field(strict=True, ge=0)]


class V2Tensor(BaseModel):
    """A KServe v2 tensor; `data` (flat, row-major) is absent when it travels in the binary extension."""

    name: StrictStr
    shape: list[V2Dim]
    datatype: StrictStr
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[V2Number] | None = None


class V2RequestedOutput(BaseModel):
    name: StrictStr
    parameters: dict[str, Any] = Field(default_factory=dict)


class V2InferRequest(BaseModel):
    id: StrictStr | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: list[V2RequestedOutput] | None = None


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]
