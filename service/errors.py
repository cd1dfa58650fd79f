"""One error shape for every endpoint: {"error": {"code": ..., "message": ...}} with a precise status.

The KServe v2 endpoints are the exception the protocol forces: its error response is
{"error": "<message>"} and clients such as tritonclient read `error` as a string, so under /v2 the
message is `error` and the code travels beside it as {"error": "<message>", "code": ...}.

Domain exceptions from decoding, routing, batching and runtimes are mapped here, in one table,
so every route answers the same way and a new failure mode needs one line.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.batcher import (
    BatcherError,
    BatchError,
    DeadlineExceeded,
    InferenceTimeout,
    QueueFull,
    ShuttingDown,
)
from service.imaging import ImageError
from service.router import UnknownModelError
from service.runtimes import RuntimeUnavailable

log = logging.getLogger("vitserve.errors")


class APIError(Exception):
    """An error the API answers directly."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


V2_PREFIX = "/v2/"
# nginx's status for a request whose client hung up before the answer; only metrics and logs see it.
CLIENT_CLOSED_REQUEST = 499


def client_disconnected() -> APIError:
    return APIError(
        CLIENT_CLOSED_REQUEST,
        "client_disconnected",
        "the client closed the connection before the answer; the request was withdrawn",
    )


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error in the shape of the request's API (see the module docstring)."""
    if request.url.path.startswith(V2_PREFIX):
        body = {"error": message, "code": code}
    else:
        body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def to_api_error(exc: Exception) -> APIError:
    """Translate a domain exception into its status, code and message."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ClientDisconnect):
        return client_disconnected()
    if isinstance(exc, ImageError):
        return APIError(exc.status, exc.code, str(exc))
    if isinstance(exc, UnknownModelError):
        return APIError(404, "model_not_found", str(exc))
    if isinstance(exc, QueueFull):
        retry = max(1, math.ceil(exc.retry_after_s))
        return APIError(429, "queue_full", str(exc), {"Retry-After": str(retry)})
    if isinstance(exc, DeadlineExceeded):
        return APIError(504, "deadline_exceeded", str(exc))
    if isinstance(exc, InferenceTimeout):
        return APIError(504, "inference_timeout", str(exc))
    if isinstance(exc, ShuttingDown):
        return APIError(503, "shutting_down", str(exc))
    if isinstance(exc, BatchError) and isinstance(exc.__cause__, RuntimeUnavailable):
        exc = exc.__cause__
    if isinstance(exc, RuntimeUnavailable):
        return APIError(503, "runtime_unavailable", str(exc))
    if isinstance(exc, ValueError):
        return APIError(422, "invalid_parameter", str(exc))
    if isinstance(exc, BatchError):
        return APIError(500, "inference_failed", str(exc))
    log.exception("unhandled error", exc_info=exc)
    return APIError(500, "internal_error", f"internal error ({type(exc).__name__}); see server logs")


def install_error_handlers(app: FastAPI) -> None:
    """Route validation errors, HTTP errors and domain errors through the one JSON shape.

    Anything unexpected still becomes a 500 with the JSON shape through `on_api_error`'s fallback
    when raised as one of these classes; other exceptions get Starlette's plain 500 and a log line.
    """

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        return error_response(request, err.status, err.code, err.message, err.headers)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in ('query', 'body', 'header'))}: {e['msg']}"
            for e in exc.errors()
        )
        return error_response(request, 422, "invalid_parameter", details or "invalid request parameters")

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        routing_failures = {
            404: f"there is no endpoint {request.url.path}; the API is listed at /docs",
            405: f"{request.method} is not allowed on {request.url.path}; the API is listed at /docs",
        }
        message = str(exc.detail)
        if message == HTTPStatus(exc.status_code).phrase:  # Starlette's default detail says nothing more
            message = routing_failures.get(exc.status_code, message)
        return error_response(request, exc.status_code, codes.get(exc.status_code, "http_error"), message)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    # Each expected failure class gets its own handler: a handler for bare Exception would run in
    # Starlette's outermost middleware, which re-raises and drops the connection after answering.
    for cls in (APIError, ValueError, BatcherError, RuntimeUnavailable, ClientDisconnect):
        app.add_exception_handler(cls, on_api_error)
