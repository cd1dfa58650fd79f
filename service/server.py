"""Run the app under uvicorn with graceful shutdown.

On SIGTERM/SIGINT readiness turns false at once (so load balancers stop sending), uvicorn stops
accepting connections and waits for in-flight requests, then the lifespan drains the batchers.
"""

from __future__ import annotations

import uvicorn

from service.app import create_app
from service.logs import configure_logging
from service.settings import Settings


class _Server(uvicorn.Server):
    """uvicorn server that flips readiness before the usual graceful exit."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame) -> None:
        self._app.state.serving.ready = False
        self._app.state.serving.draining = True
        super().handle_exit(sig, frame)


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    _Server(config, app).run()
