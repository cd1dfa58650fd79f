"""Promises under load and faults, over real HTTP: decode capacity per pool, every response counted, and a
drain that runs out of time still answering every request.

Nothing here asserts a duration: starvation is shown by completion order (small requests all finish
while huge decodes are still unanswered), a hung runtime is a real peer that accepts connections and
never answers, and the drain's outcome is read from the answers and the exit status.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.server import DRAIN_TIMED_OUT
from support.server import (
    PNG,
    SMALL_PNG,
    Background,
    ServerProcess,
    encode_image,
    free_port,
    scrape_metrics,
    start_server,
    wait_until,
)

HUGE = 4  # two rounds for the default two decode threads of the windowed pool on this machine


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """A 64 MP PNG (the default pixel limit): under a megabyte on the wire, seconds to decode."""
    return encode_image(np.full((8000, 8000, 3), (120, 30, 200), np.uint8), compress_level=1)


def test_small_images_complete_while_huge_pngs_decode_in_the_other_pool(
    photo_server: ServerProcess, huge_png: bytes
) -> None:
    url = photo_server.url
    with ThreadPoolExecutor(HUGE) as senders:
        huge = [
            senders.submit(httpx.post, f"{url}/v1/classify", content=huge_png, headers=PNG, timeout=120)
            for _ in range(HUGE)
        ]
        wait_until(
            lambda: scrape_metrics(url).value("vitserve_decoding", pool="windowed") >= 1,
            "the huge images to be decoding",
        )
        small = [
            httpx.post(f"{url}/v1/classify", content=SMALL_PNG, headers=PNG, timeout=60) for _ in range(5)
        ]
        unanswered = sum(not h.done() for h in huge)
        routes = {r.json()["route"]["pool"] for r in small}
        assert [r.status_code for r in small] == [200] * 5
        assert routes == {"global"}
        assert unanswered == HUGE  # every small request finished before any huge one was answered
        answers = [h.result() for h in huge]
    assert [a.status_code for a in answers] == [200] * HUGE
    assert {a.json()["route"]["pool"] for a in answers} == {"windowed"}


def test_responses_raised_before_the_handler_are_counted(photo_server: ServerProcess) -> None:
    url = photo_server.url
    before = scrape_metrics(url)
    with httpx.Client(base_url=url, timeout=60) as client:
        invalid = client.post("/v1/classify", params={"top_k": 0}, content=SMALL_PNG, headers=PNG)
        unknown = client.get("/v1/nowhere")
        health = client.get("/v2/health/ready")
    assert (invalid.status_code, unknown.status_code, health.status_code) == (422, 404, 200)
    delta = scrape_metrics(url) - before
    assert delta.value("vitserve_requests_total", endpoint="classify", status="422") == 1
    assert delta.value("vitserve_requests_total", endpoint="none", status="404") == 1
    assert delta.value("vitserve_requests_total", endpoint="ready", status="200") == 1
    assert delta.value("vitserve_request_duration_seconds_count") == 3
    assert scrape_metrics(url).value("vitserve_inflight_requests") == 0


class SilentPeer:
    """A TCP server that accepts connections, reads whatever comes and never answers: a hung pool."""

    def __init__(self) -> None:
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._connections: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close()
                return
            self._connections.append(connection)

    def close(self) -> None:
        self._stop.set()
        for connection in self._connections:
            connection.close()
        self._listener.close()


@pytest.fixture
def silent_peer() -> Iterator[SilentPeer]:
    peer = SilentPeer()
    yield peer
    peer.close()


def test_expired_drain_answers_every_request_503_and_exits_with_the_documented_status(
    photo_repository: Path, tmp_path: Path, silent_peer: SilentPeer
) -> None:
    """The global pool is remote and hangs; SIGTERM with its requests in flight and a 2 s drain."""
    server = start_server(
        tmp_path,
        repository=photo_repository,
        runtimes="vit_global=triton",
        triton_urls=f"global=http://127.0.0.1:{silent_peer.port}",
        drain_timeout_s=2,
    )
    try:
        stuck = [Background(server.url) for _ in range(3)]
        wait_until(
            lambda: (
                scrape_metrics(server.url).value("vitserve_pending_tokens", pool="global") > 0
                and scrape_metrics(server.url).value("vitserve_inflight_requests") == 3
            ),
            "the requests to reach the hung pool",
        )
        server.process.send_signal(signal.SIGTERM)
        answers = [s.result() for s in stuck]
        assert [a.status_code for a in answers] == [503] * 3
        assert {a.json()["error"]["code"] for a in answers} == {"shutting_down"}
        assert server.process.wait(60) == DRAIN_TIMED_OUT
    finally:
        server.stop()
    assert "drain timed out" in server.log()
