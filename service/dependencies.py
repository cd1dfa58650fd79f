"""FastAPI dependencies and request plumbing shared by the v1 and v2 routes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Query, Request

from service.errors import CLIENT_CLOSED_REQUEST, APIError, client_disconnected, to_api_error
from service.metrics import Metrics
from service.settings import Settings
from service.state import ServingState

T = TypeVar("T")


async def get_state(request: Request) -> ServingState:
    """Async, as every dependency here: FastAPI runs a sync dependency in a threadpool hop per request."""
    return request.app.state.serving


async def ready_state(state: Annotated[ServingState, Depends(get_state)]) -> ServingState:
    """The serving state, or 503 while loading or draining."""
    if state.draining:
        raise APIError(503, "draining", "the server is shutting down; retry on another replica")
    if not state.ready:
        raise APIError(503, "not_ready", "models are still loading; retry shortly (GET /v2/health/ready)")
    return state


async def deadline(
    request: Request,
    timeout_ms: Annotated[float | None, Query(gt=0, description="Per-request deadline in ms.")] = None,
    x_request_timeout_ms: Annotated[float | None, Header(gt=0)] = None,
) -> float:
    """Monotonic instant after which a still-queued request is answered 504 and never computed."""
    settings: Settings = request.app.state.serving.settings
    budget = timeout_ms or x_request_timeout_ms or settings.request_timeout_ms
    return time.monotonic() + budget / 1000


# A rejected body is read and discarded up to this multiple of the limit, so the client (still
# sending) receives the error instead of a connection reset; past it the connection is dropped.
DRAIN_FACTOR = 4


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; 413 once it passes `limit` bytes, without keeping more than `limit` in memory."""
    declared = request.headers.get("content-length")
    too_large = APIError(
        413, "payload_too_large", f"request body exceeds the {limit}-byte limit; send a smaller image"
    )
    if declared is not None and declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_FACTOR * limit:
            raise too_large
    if size > limit:
        raise too_large
    return b"".join(chunks)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first (so queued work is withdrawn).

    A withdrawn request ends as APIError 499 (client closed request): nobody reads the answer, but
    the request is counted with that status and ends like any other failure, without a traceback.
    """
    task = asyncio.ensure_future(work)
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while (await request.receive())["type"] != "http.disconnect":
            pass
        disconnected = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if disconnected:
            raise client_disconnected() from None
        raise
    finally:
        watcher.cancel()


@dataclass
class RequestRecord:
    """Labels of one request's metrics, filled in as the request learns its route."""

    endpoint: str
    route: str = "none"
    model: str = "none"
    status: int = 200
    started: float = field(default_factory=time.perf_counter)


@contextmanager
def observed(metrics: Metrics, endpoint: str):
    """Count and time one request under its final labels, whatever way it ends."""
    record = RequestRecord(endpoint)
    metrics.inflight_requests.inc()
    try:
        yield record
    except BaseException as exc:
        record.status = to_api_error(exc).status if isinstance(exc, Exception) else CLIENT_CLOSED_REQUEST
        raise
    finally:
        metrics.inflight_requests.dec()
        labels = (record.endpoint, record.route, record.model)
        metrics.request_duration.labels(*labels).observe(time.perf_counter() - record.started)
        metrics.requests.labels(*labels, str(record.status)).inc()
