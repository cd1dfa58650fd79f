"""The page at `/` in headless Chromium: pick a real photo, see the route, top-k and a heat map.

The photo (scikit-image's astronaut) is chosen in the page's file input through the DevTools
protocol, exactly as a user picking a file; the page posts it to /v1/explain and renders the
answer. The DOM must show the route and top-k the API gives for the same file, the candidates the
router weighed, and a heat map actually painted on its canvas. A screenshot lands in the test's
temporary directory.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
from skimage import data

from support.browser import Page, chromium_page
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
  method: document.getElementById("heatmap-method").textContent,
})"""


PASTE = """(() => {
  const bytes = Uint8Array.from(atob("%s"), (c) => c.charCodeAt(0));
  const clipboard = new DataTransfer();
  clipboard.items.add(new File([bytes], "pasted.png", {type: "image/png"}));
  document.getElementById("route-override").value = "windowed";
  document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: clipboard}));
  return true;
})()"""


def _served(route: dict) -> str:
    """How the page writes the shape served: the router's `shape` when it reports one, else the bucket."""
    shape = route.get("shape")
    if shape is not None:
        return " × ".join(map(str, shape)) if isinstance(shape, list) else str(shape)
    return f"{route['bucket']} × {route['bucket']}"


def _open(page: Page, url: str) -> None:
    page.call("Page.navigate", url=f"{url}/")
    page.wait_for("document.readyState === 'complete' && !!document.getElementById('file')", "the page")
    page.wait_for("document.getElementById('models').textContent.startsWith('ready')", "the model list")


def _rendered(page: Page) -> dict:
    """The DOM summary once the explanation is done and its heat map drawn (the page's error if not)."""
    state = page.wait_for(f"['done', 'error'].includes({PAGE_STATE}) && {PAGE_STATE}", "the explanation")
    status = page.evaluate("document.getElementById('status').textContent")
    assert state == "done", status
    page.wait_for("document.getElementById('heatmap').dataset.rendered === 'true'", "the heat map")
    return json.loads(page.evaluate(DOM_SUMMARY))


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
        _open(page, photo_server.url)
        page.set_files("#file", photo)
        dom = _rendered(page)
        shot = page.screenshot(tmp_path / "page.png")

    assert (dom["pool"], dom["model"]) == (api["route"]["pool"], api["route"]["model"])
    assert _served(api["route"]) in dom["routeText"]
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


def test_pasted_image_takes_the_requested_windowed_route(photo_server: ServerProcess, tmp_path: Path) -> None:
    """A wide PNG pasted with the route override set to windowed: Swin serves it, and its heat map
    (the similarity-seeded window rollout) is drawn over the image."""
    pixels = data.astronaut()[96:416]
    body = encode_image(pixels, "PNG")

    with chromium_page(tmp_path / "chromium") as page:
        _open(page, photo_server.url)
        page.evaluate(PASTE % base64.b64encode(body).decode())
        dom = _rendered(page)
        page.screenshot(tmp_path / "pasted.png")

    assert dom["pool"] == "windowed"
    assert int(dom["heatmap"]["painted"]) > 0.9 * dom["canvas"][0] * dom["canvas"][1]
    assert "window rollout" in dom["method"]
