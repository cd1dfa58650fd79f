"""The page at `/` in headless Chromium: pick a real photo, see the route, top-k and a heat map.

The photo (scikit-image's astronaut) is chosen in the page's file input through the DevTools
protocol, exactly as a user picking a file; the page posts it to /v1/explain and renders the
answer. The DOM must show the route and top-k the API gives for the same file, the candidates the
router weighed, and a heat map actually painted on its canvas. A screenshot lands in the test's
temporary directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from skimage import data

from support.browser import chromium_page
from support.server import ServerProcess, encode_image

PAGE_STATE = "document.body.dataset.state"
DOM_SUMMARY = """JSON.stringify({
  pool: document.getElementById("route").dataset.pool,
  model: document.getElementById("route").dataset.model,
  routeText: document.getElementById("route").innerText,
  labels: [...document.querySelectorAll("#topk li")].map((li) => li.dataset.label),
  bars: [...document.querySelectorAll("#topk .bar span")].map((s) => parseFloat(s.style.width)),
  candidates: document.querySelectorAll("#candidates svg g").length,
  chosen: document.querySelectorAll('#candidates svg g[data-chosen="true"]').length,
  heatmap: {...document.getElementById("heatmap").dataset},
  canvas: [document.getElementById("heatmap").width, document.getElementById("heatmap").height],
  timings: document.getElementById("timings").innerText,
})"""


def test_page_is_served_from_the_package(photo_server: ServerProcess) -> None:
    page = httpx.get(f"{photo_server.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        assert httpx.get(f"{photo_server.url}{asset}", timeout=10).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text, "the page must not load from a CDN"


def test_browser_shows_route_top_k_and_heat_map(photo_server: ServerProcess, tmp_path: Path) -> None:
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(encode_image(data.astronaut(), "JPEG", quality=90))
    api = httpx.post(
        f"{photo_server.url}/v1/explain",
        files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
        timeout=60,
    ).json()
    route = httpx.get(f"{photo_server.url}/v1/route", params={"width": 512, "height": 512}, timeout=10).json()

    with chromium_page(tmp_path / "chromium") as page:
        page.call("Page.navigate", url=f"{photo_server.url}/")
        page.wait_for("document.readyState === 'complete' && !!document.getElementById('file')", "the page")
        page.wait_for("document.getElementById('models').textContent.startsWith('ready')", "the model list")
        page.set_files("#file", photo)
        state = page.wait_for(f"['done', 'error'].includes({PAGE_STATE}) && {PAGE_STATE}", "the explanation")
        page.wait_for("document.getElementById('heatmap').dataset.rendered === 'true'", "the heat map")
        shot = page.screenshot(tmp_path / "page.png")
        dom = json.loads(page.evaluate(DOM_SUMMARY))
        status = page.evaluate("document.getElementById('status').textContent")

    assert state == "done", status
    assert (dom["pool"], dom["model"]) == (api["route"]["pool"], api["route"]["model"])
    assert f"{api['route']['bucket']} × {api['route']['bucket']}" in dom["routeText"]
    assert dom["labels"] == [p["label"] for p in api["predictions"]]
    assert dom["bars"] == sorted(dom["bars"], reverse=True) and dom["bars"][0] > 0
    assert (dom["candidates"], dom["chosen"]) == (len(route["candidates"]), 1)
    rows, cols = api["heatmap"]["grid"]
    assert dom["heatmap"]["grid"] == f"{rows}x{cols}"
    width, height = dom["canvas"]
    assert width > 100 and height > 100
    assert int(dom["heatmap"]["painted"]) > 0.9 * width * height, "the heat map covers the whole photo"
    assert "queue + inference" in dom["timings"]
    assert shot.stat().st_size > 10_000
