"""Load sheds detail before requests, on a real gateway with a saturated windowed queue.

A flood of full-detail requests fills the windowed pool's queue; a request whose budget the
windowed backbone can no longer meet is served by the idle global backbone at less detail, says so
in its route, and is counted in vitserve_route_degraded_total. No timing is asserted: the test
waits (bounded in polls) for the router to see the queue, then checks what it decided.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np

from support.server import ServerProcess, encode_image, scrape_metrics

SIDE = 896
FLOOD = 48
MAX_POLLS = 400


def _gradient(side: int) -> bytes:
    y, x = np.mgrid[0:side, 0:side]
    pixels = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], axis=-1).astype(np.uint8)
    return encode_image(pixels)


async def _flood_and_probe(url: str, image: bytes, budget_ms: float) -> tuple[list[int], dict, dict]:
    """Send FLOOD full-detail windowed requests; while they queue, route and classify under `budget_ms`."""
    png = {"content-type": "image/png"}
    limits = httpx.Limits(max_connections=FLOOD + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        flood = [
            asyncio.ensure_future(
                client.post(
                    "/v1/embed", params={"detail": "full", "bucket": SIDE}, content=image, headers=png
                )
            )
            for _ in range(FLOOD)
        ]
        params = {"width": SIDE, "height": SIDE, "budget_ms": budget_ms}
        route: dict = {}
        for _ in range(MAX_POLLS):
            route = (await client.get("/v1/route", params=params)).json()
            if route["degraded"] or all(f.done() for f in flood):
                break
            await asyncio.sleep(0.01)
        classified = await client.post(
            "/v1/classify", params={"budget_ms": budget_ms}, content=image, headers=png
        )
        statuses = [(await f).status_code for f in flood]
    return statuses, route, classified.json()


def test_a_saturated_windowed_queue_degrades_detail_and_says_so(photo_server: ServerProcess) -> None:
    image = _gradient(SIDE)
    idle = httpx.get(f"{photo_server.url}/v1/route", params={"width": SIDE, "height": SIDE}).json()
    assert (idle["pool"], idle["shape"], idle["detail"], idle["degraded"]) == (
        "windowed",
        [SIDE, SIDE],
        1.0,
        False,
    )
    budget_ms = 3 * idle["expected_ms"]
    before = scrape_metrics(photo_server.url)

    statuses, route, classified = asyncio.run(_flood_and_probe(photo_server.url, image, budget_ms))

    assert statuses == [200] * FLOOD  # shedding detail, not requests
    assert route["degraded"], route["reason"]
    assert route["reason"].startswith(f"degraded: {idle['entry']}")
    assert route["detail"] < idle["detail"] and route["expected_ms"] <= budget_ms
    intended = next(c for c in route["candidates"] if c["entry"] == idle["entry"])
    assert intended["wait_ms"] > 0 and intended["expected_ms"] > budget_ms
    served = classified["route"]
    assert served["degraded"] and served["detail"] < 1.0 and served["reason"].startswith("degraded")
    delta = scrape_metrics(photo_server.url) - before
    # Counted once, in the pool that served it; the full-detail flood itself was never degraded.
    assert delta.value("vitserve_route_degraded_total", pool=served["pool"]) == 1
    assert sum(delta.series("vitserve_route_degraded_total").values()) == 1
