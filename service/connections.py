"""A deadline for request headers, so clients that send them slowly (slowloris) cannot hold connections.

uvicorn times out idle keep-alive connections and vitserve times out slow bodies (408
`body_timeout`, service/bodies.py), but nothing bounds the time a client takes to send its headers:
a client that opens a connection and sends a byte every few seconds keeps it, and its socket, open
forever. Each such connection costs only a file descriptor (the event loop serves everyone else),
but enough of them exhaust the process's descriptors, which no one else can then use.

`header_deadline_protocol` builds uvicorn's httptools protocol with one more timer: armed when a
connection opens and when a new request's first byte arrives, cancelled when that request's headers
are complete. When it fires, a connection that sent part of a request gets a 408 with vitserve's JSON
error body and is closed; one that sent nothing is closed (there is no request to answer). Each
timeout is counted in requests_total with endpoint "none" and status 408.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.accounting import RequestRecord, record_response
from service.metrics import Metrics

HEADER_TIMEOUT = 408


def _timeout_response(timeout_s: float) -> bytes:
    body = json.dumps(
        {
            "error": {
                "code": "header_timeout",
                "message": f"request headers not received within {timeout_s:g} s; send them at once "
                "(VITSERVE_HEADER_TIMEOUT_S sets the limit)",
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 {HEADER_TIMEOUT} Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def header_deadline_protocol(timeout_s: float, metrics: Metrics) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol that answers 408 to headers not complete within `timeout_s`."""
    response = _timeout_response(timeout_s)

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _request_started = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._request_started = True
            if self._header_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            self._request_started = False
            super().on_headers_complete()

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            if self._request_started:
                self.transport.write(response)
                record_response(metrics, "none", RequestRecord(), HEADER_TIMEOUT)
            self.transport.close()

    return HeaderDeadlineProtocol
