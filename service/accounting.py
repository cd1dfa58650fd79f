"""Every response counted and timed, including those raised before a handler runs.

A 503 from the readiness dependency, a 422 from parameter validation, a 404 for an unknown path or
a 499 for a client that hung up never reach the handler's own code, so counting there misses them.
This ASGI middleware wraps the whole app instead: it reads the status the response starts with and
the labels the handler filled in (`request_record`), and observes requests_total and
request_duration_seconds once per request, whatever way it ended.

The endpoint label is the matched route's name; unmatched paths count as "none". The `uncounted`
paths (/metrics, the docs) are left out, so scrapes neither count themselves nor show as in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import CLIENT_CLOSED_REQUEST
from service.metrics import Metrics

SCOPE_KEY = "vitserve.record"


@dataclass
class RequestRecord:
    """Labels of one request's metrics, filled in as the request learns its route."""

    route: str = "none"
    model: str = "none"
    started: float = field(default_factory=time.perf_counter)


def record_response(metrics: Metrics, endpoint: str, record: RequestRecord, status: int) -> None:
    """Count and time one answered request (HTTP here; other transports such as gRPC call it too)."""
    labels = (endpoint, record.route, record.model)
    metrics.request_duration.labels(*labels).observe(time.perf_counter() - record.started)
    metrics.requests.labels(*labels, str(status)).inc()


def request_record(request: Request) -> RequestRecord:
    """The record the middleware opened for this request (a fresh one outside the middleware)."""
    return request.scope.setdefault(SCOPE_KEY, RequestRecord())


class Accounting:
    """ASGI middleware counting and timing every HTTP response under its final labels."""

    def __init__(self, app: ASGIApp, metrics: Metrics, uncounted: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.metrics = metrics
        self.uncounted = uncounted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.uncounted:
            await self.app(scope, receive, send)
            return
        record = scope[SCOPE_KEY] = RequestRecord()
        status = CLIENT_CLOSED_REQUEST  # a request that never starts a response ended with its client

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        inflight = self.metrics.inflight
        inflight.inc()
        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status = 500
            raise
        finally:
            inflight.dec()
            endpoint = getattr(scope.get("route"), "name", None) or "none"
            record_response(self.metrics, endpoint, record, status)
