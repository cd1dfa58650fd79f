"""Lifecycle of a real `vitserve serve` process: SIGTERM drains, a broken repository fails start-up.

On SIGTERM readiness turns 503, but for VITSERVE_SHUTDOWN_DELAY_S the listener stays open and new
requests are still served, each answer carrying `Connection: close` so keep-alive clients reconnect
elsewhere; requests already queued complete 200, and the process exits 0 (service/server.py).
The queued requests are held in the queue deterministically by the batcher's delay rule (see
test_service_limits.py): after a batch of two, requests wait the whole max_queue_delay.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from support.server import (
    PNG,
    SMALL_PNG,
    Background,
    prime_batch_of_two,
    scrape_metrics,
    start_server,
    wait_until,
)

ENTRY = "vit_global_224"  # the square policy routes SMALL_PNG here
QUEUED = 3


def test_sigterm_turns_readiness_off_keeps_serving_with_connection_close_and_exits_zero(
    photo_repository: Path, tmp_path: Path
) -> None:
    server = start_server(
        tmp_path,
        repository=photo_repository,
        max_queue_delay_ms=2500,
        max_batch_size=8,
        routing_policy="square",
        shutdown_delay_s=4,
        drain_timeout_s=30,
    )
    try:
        prime_batch_of_two(server.url, ENTRY)
        queued = [Background(server.url) for _ in range(QUEUED)]
        wait_until(
            lambda: scrape_metrics(server.url).value("vitserve_queue_depth", model=ENTRY) == QUEUED,
            "the requests to be queued",
        )

        server.process.send_signal(signal.SIGTERM)

        wait_until(
            lambda: httpx.get(f"{server.url}/v2/health/ready").status_code == 503, "readiness to turn 503"
        )
        assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": False}
        assert httpx.get(f"{server.url}/v2/models/{ENTRY}/ready").status_code == 503
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        # Answered at once, well within the delay: uvicorn itself closes connections only after it.
        models = httpx.get(f"{server.url}/v1/models")
        assert models.status_code == 200 and models.json()["ready"] is False
        assert models.headers["connection"] == "close"
        # Served, not refused: it joins the queued requests' batch.
        late = httpx.post(f"{server.url}/v1/classify", content=SMALL_PNG, headers=PNG, timeout=60)
        assert late.status_code == 200, late.text
        assert late.headers["connection"] == "close"
        assert [q.result().status_code for q in queued] == [200] * QUEUED
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    assert '"level": "error"' not in server.log()


def test_serve_exits_nonzero_with_the_reason_when_the_repository_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "no_repository"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "0"],
        env={**os.environ, "VITSERVE_REPOSITORY": str(missing)},
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 3
    assert f"model repository {missing} does not exist" in result.stderr
