"""Run the app under uvicorn with graceful shutdown.

On SIGTERM/SIGINT readiness turns false at once (`/v2/health/ready` and `/v2/models/M/ready` answer
503), but for `shutdown_delay_s` the listener stays open and requests are still served: load
balancers and Kubernetes endpoints take that long to stop sending here, and what they send
meanwhile must not fail. Every response from then on carries `Connection: close`
(service/draining.py), so keep-alive clients reconnect, and their balancer picks another replica.
After the delay uvicorn stops accepting connections while the batchers drain for at most
`drain_timeout_s`; a request that still arrives on an open connection is answered 503 (draining).

The KServe v2 gRPC service (`service.grpc_server`, on `grpc_port` unless 0) runs on the same event
loop: it listens before the models load (live, not ready, until the HTTP listener opens too),
reads the same readiness (ServerReady is false from the signal on, calls are still served during
the delay), and stops with the HTTP server (GOAWAY to its clients), giving its calls in flight as
long as uvicorn gives connections. A gRPC port that cannot be bound fails start-up like an HTTP
one. Exit status:

- 0 (`DRAINED`): every queued and running request finished; a drain that completes is a clean
  exit, not death by signal (uvicorn would otherwise re-raise the signal).
- 3 (`STARTUP_FAILURE`): the application could not start.
- 4 (`DRAIN_TIMED_OUT`): the drain ran out of time; every request still unanswered was answered
  503 before the connections closed, and the process exits without waiting for hung batch threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

import grpc
import uvicorn

from service.app import create_app
from service.connections import header_deadline_protocol
from service.grpc_server import start_grpc_server
from service.logs import configure_logging
from service.process_memory import set_mmap_threshold
from service.settings import Settings

DRAINED = 0
# uvicorn's exit status when the application fails to start (uvicorn.main.STARTUP_FAILURE).
STARTUP_FAILURE = 3
DRAIN_TIMED_OUT = 4
# After the drain, the time left for handlers to write their answers before uvicorn cancels them.
ANSWER_GRACE_S = 5.0
log = logging.getLogger("vitserve.server")


class _Server(uvicorn.Server):
    """uvicorn server that turns readiness off, keeps serving for the shutdown delay, then exits."""

    def __init__(self, config: uvicorn.Config, app, settings: Settings):
        super().__init__(config)
        self._app = app
        self._settings = settings
        self._shutdown_delay_s = settings.shutdown_delay_s
        self._exit_requested_at: float | None = None
        self._grpc: grpc.aio.Server | None = None

    async def startup(self, sockets=None) -> None:
        """The gRPC service, then uvicorn's start-up (loading, then the HTTP listener).

        gRPC binds first, so a taken port fails at once (exit 3, as a taken HTTP port does) and it
        is listening by the time HTTP readiness answers; while the models load it answers live,
        not ready."""
        if self._settings.grpc_port:
            try:
                self._grpc = await start_grpc_server(
                    self._app.state.serving, self._settings, self._app.version
                )
            except RuntimeError as exc:
                log.error(
                    "grpc port unavailable", extra={"port": self._settings.grpc_port, "reason": str(exc)}
                )
                sys.exit(STARTUP_FAILURE)
        try:
            await super().startup(sockets)
        except BaseException:
            if self._grpc is not None:
                await self._grpc.stop(None)
            raise

    def handle_exit(self, sig: int, frame) -> None:
        self._app.state.serving.draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        if self._exit_requested_at is None:
            self._exit_requested_at = time.monotonic()

    async def shutdown(self, sockets=None) -> None:
        """Drain the batchers beside uvicorn's wait for connections, so an expired drain answers them."""
        drain = asyncio.ensure_future(self._app.state.serving.drain())
        grpc_stopped = None
        if self._grpc is not None:
            grpc_stopped = asyncio.ensure_future(self._grpc.stop(self.config.timeout_graceful_shutdown))
        await super().shutdown(sockets)
        await drain
        if grpc_stopped is not None:
            await grpc_stopped

    async def on_tick(self, counter: int) -> bool:
        should_exit = await super().on_tick(counter)
        if not should_exit or self.force_exit or self._exit_requested_at is None:
            return should_exit
        return time.monotonic() - self._exit_requested_at >= self._shutdown_delay_s


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; exits with status 3 when the application cannot start."""
    configure_logging(settings.log_level)
    threshold = settings.malloc_mmap_threshold_kib
    if threshold is not None:
        if set_mmap_threshold(threshold):
            log.info("allocations from the mmap threshold are unmapped when freed", extra={"kib": threshold})
        else:
            log.warning(
                "VITSERVE_MALLOC_MMAP_THRESHOLD_KIB needs glibc; the C library's own allocation policy stays",
                extra={"kib": threshold},
            )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=header_deadline_protocol(settings.header_timeout_s, app.state.serving.metrics),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.drain_timeout_s + ANSWER_GRACE_S,
    )
    server = _Server(config, app, settings)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
    if app.state.serving.drain_timed_out:
        # Hung batch threads would block the interpreter's exit join forever.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(DRAIN_TIMED_OUT)
