"""The FastAPI application: lifespan loads the repository, routers serve v1/v2, /metrics exposes Prometheus.

`create_app(settings)` builds an independent app (own metrics registry and serving state), so
tests and embedding applications can run several in one process.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response

from service import api_explain, api_repository, api_v1, api_v2, page
from service.accounting import Accounting
from service.draining import CloseWhileDraining
from service.errors import install_error_handlers
from service.explainer import Explainers
from service.metrics import Metrics
from service.settings import Settings
from service.state import ServingState

log = logging.getLogger("vitserve.app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServingState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop = asyncio.get_running_loop()
        await state.start()
        log.warning(
            "serving",
            extra={"role": settings.role, "models": sorted(state.entries), "runtime": settings.runtime},
        )
        try:
            yield
        finally:
            await state.stop()
            app.state.explainers.close()
            log.warning("stopped")

    app = FastAPI(
        title="vitserve",
        summary="Resolution-aware inference service for Vision Transformers",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.serving = state
    app.state.explainers = Explainers(settings.threads(), settings.max_explain_queue)
    install_error_handlers(app)
    uncounted = {"/metrics", app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url}
    app.add_middleware(Accounting, metrics=state.metrics, uncounted=frozenset(uncounted - {None}))
    app.add_middleware(CloseWhileDraining, state=state)
    if settings.role == "gateway":
        app.include_router(api_v1.router)
        app.include_router(api_explain.router)
        page.install(app)
    app.include_router(api_v2.router)
    app.include_router(api_repository.router)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    return app
