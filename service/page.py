"""The browser page at `/`: static files shipped inside the package (service/static/), no CDN.

The page only calls the public API (/v1/models, /v1/route, /v1/explain), so it shows exactly what a
client would get; it needs no server-side rendering and no template engine.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"


def install(app: FastAPI) -> None:
    """Serve index.html at `/` and the page's assets under /static/."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
