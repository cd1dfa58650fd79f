"""One error shape for every endpoint: {"error": {"code": ..., "message": ...}} with a precise status.

Domain exceptions from decoding, routing, batching and runtimes are mapped here, in one table,
so every route answers the same way and a new failure mode needs one line.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batcher import BatcherError, BatchError, DeadlineExceeded, QueueFull, ShuttingDown
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


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def to_api_error(exc: Exception) -> APIError:
    """Translate a domain exception into its status, code and message."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ImageError):
        return APIError(exc.status, exc.code, str(exc))
    if isinstance(exc, UnknownModelError):
        return APIError(404, "model_not_found", str(exc))
    if isinstance(exc, QueueFull):
        retry = max(1, math.ceil(exc.retry_after_s))
        return APIError(429, "queue_full", str(exc), {"Retry-After": str(retry)})
    if isinstance(exc, DeadlineExceeded):
        return APIError(504, "deadline_exceeded", str(exc))
    if isinstance(exc, ShuttingDown):
        return APIError(503, "shutting_down", str(exc))
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
        return error_response(err.status, err.code, err.message, err.headers)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in ('query', 'body', 'header'))}: {e['msg']}"
            for e in exc.errors()
        )
        return error_response(422, "invalid_parameter", details or "invalid request parameters")

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    # Each expected failure class gets its own handler: a handler for bare Exception would run in
    # Starlette's outermost middleware, which re-raises and drops the connection after answering.
    for cls in (APIError, ValueError, BatcherError, RuntimeUnavailable):
        app.add_exception_handler(cls, on_api_error)
