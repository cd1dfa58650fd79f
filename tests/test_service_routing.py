"""Load sheds detail before requests, on a real gateway with a saturated windowed queue.

A flood of full-detail requests fills the windowed pool's queue; a request whose budget the
windowed backbone can no longer meet is served by the idle global backbone at less detail, says so
in its route, and is counted in vitserve_route_degraded_total. No timing is asserted: the test
waits (bounded in polls) for the router to see the queue, then checks what it decided.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from export.repository import read_repository
from service.calibration import FILE, EntryCost, write_calibration
from support.server import ServerProcess, encode_image, running_server, scrape_metrics

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


def test_served_batches_correct_costs_calibration_set_too_low(photo_repository: Path, tmp_path: Path) -> None:
    """Calibration says every batch takes 50 us, far less than any real run; served batches take
    longer, and the router learns it: the expected time of the entry that served them grows towards
    what they took (ServedCosts, at most 4x), while an entry that served nothing keeps the file's cost."""
    file_ms = 0.05
    entries = [e.name for e in read_repository(photo_repository)]
    calibration = tmp_path / "calibration.yaml"
    write_calibration(calibration, {name: EntryCost({1: file_ms / 1e3}, FILE) for name in entries})
    image = _gradient(224)
    params = {"width": 224, "height": 224, "route": "global", "bucket": 224}
    with running_server(tmp_path / "server", repository=photo_repository, calibration=calibration) as server:

        def candidates() -> dict[str, dict]:
            route = httpx.get(f"{server.url}/v1/route", params=params).json()
            return {c["entry"]: c for c in route["candidates"]}

        before = candidates()
        served = next(name for name, c in before.items() if c["excluded"] is None)
        for _ in range(12):
            answer = httpx.post(
                f"{server.url}/v1/classify",
                params={"route": "global", "bucket": 224},
                content=image,
                headers={"content-type": "image/png"},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
        after = candidates()
    assert before[served]["cost_ms"] == pytest.approx(file_ms)
    assert after[served]["cost_ms"] > 1.5 * file_ms, after[served]
    assert after[served]["cost_source"] == FILE
    untouched = next(name for name in after if not name.startswith(served.rsplit("_", 1)[0]))
    assert after[untouched]["cost_ms"] == pytest.approx(before[untouched]["cost_ms"])
