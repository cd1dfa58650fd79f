"""Limits over HTTP: 413 for too many bytes or pixels (chunked and multipart included), 408 for a body
that has not arrived by the deadline, 429 with Retry-After for a full queue, 504 for a deadline that
passes in the queue, and a client that disconnects mid-upload or while queued is never computed.

Queue states are made deterministic with the batcher's own rule rather than with timing: after a
batch of more than one request, a request waits the whole max_queue_delay for companions. The server
here uses a long delay, so once a two-row v2 request has run as one batch ("priming"), the next
requests provably sit in the queue for seconds, where the test can fill it, let deadlines pass or
hang up. Whether a request was computed is read from the batch_size histogram.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from support.server import (
    PNG,
    SMALL_PNG,
    Background,
    ServerProcess,
    assert_error,
    assert_serves,
    encode_image,
    prime_batch_of_two,
    running_server,
    scrape_metrics,
    v2_infer,
    wait_until,
)

ENTRY = "vit_global_224"  # the square policy routes SMALL_PNG (48x64) here
MAX_QUEUE_SIZE = 2
QUEUE_DELAY_MS = 2500
MAX_BODY_BYTES = 2_000_000
MAX_PIXELS = 4_000_000
# Room for three preprocessed 224 images in the global pool's queue (3 x 3 x 224 x 224 float32).
MAX_QUEUE_BYTES = 3 * 3 * 224 * 224 * 4
HEADER_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def limits_server(
    photo_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with running_server(
        tmp_path_factory.mktemp("limits_server"),
        repository=photo_repository,
        max_queue_size=MAX_QUEUE_SIZE,
        max_queue_delay_ms=QUEUE_DELAY_MS,
        max_body_bytes=MAX_BODY_BYTES,
        max_pixels=MAX_PIXELS,
        max_queue_bytes=MAX_QUEUE_BYTES,
        header_timeout_s=HEADER_TIMEOUT_S,
        # The limits are under test, not routing: the square policy pins small images to one entry.
        routing_policy="square",
        # A fixed batch limit: start-up calibration could pick batch 1, and no request would wait.
        max_batch_size=8,
    ) as server:
        yield server


def _computed(url: str) -> float:
    """Requests computed so far by ENTRY's batcher."""
    return scrape_metrics(url).value("vitserve_batch_size_sum", model=ENTRY)


def _queued(url: str) -> float:
    return scrape_metrics(url).value("vitserve_queue_depth", model=ENTRY)


def test_body_over_the_byte_limit_is_413(limits_server: ServerProcess) -> None:
    response = httpx.post(
        f"{limits_server.url}/v1/classify",
        content=b"\x89PNG" + bytes(MAX_BODY_BYTES),
        headers=PNG,
        timeout=60,
    )

    assert_error(response, 413, "payload_too_large")
    assert str(MAX_BODY_BYTES) in response.json()["error"]["message"]
    assert_serves(limits_server.url)


def test_image_over_the_pixel_limit_is_413_before_decoding(limits_server: ServerProcess) -> None:
    """3000 x 2000 = 6 MP of zeros compresses to a few kB: only the header can reveal the size."""
    data = encode_image(np.zeros((2000, 3000), np.uint8))
    assert len(data) < MAX_BODY_BYTES

    response = httpx.post(f"{limits_server.url}/v1/classify", content=data, headers=PNG, timeout=60)

    assert_error(response, 413, "image_too_large")
    assert "3000x2000" in response.json()["error"]["message"]
    assert_serves(limits_server.url)


def test_full_queue_is_429_with_retry_after_and_the_queued_requests_complete(
    limits_server: ServerProcess,
) -> None:
    url = limits_server.url
    prime_batch_of_two(url, ENTRY)
    computed = _computed(url)
    queued = [Background(url) for _ in range(MAX_QUEUE_SIZE)]
    wait_until(lambda: _queued(url) == MAX_QUEUE_SIZE, "the queue to fill")

    rejected = httpx.post(f"{url}/v1/classify", content=SMALL_PNG, headers=PNG, timeout=60)

    assert_error(rejected, 429, "queue_full")
    assert int(rejected.headers["retry-after"]) >= 1
    assert [q.result().status_code for q in queued] == [200] * MAX_QUEUE_SIZE
    assert _computed(url) == computed + MAX_QUEUE_SIZE  # the rejected request never ran
    assert_serves(url)


def test_the_pools_queue_bytes_bound_admission_across_its_buckets(limits_server: ServerProcess) -> None:
    """Two queued 224 images leave too few of the global pool's bytes for one image of its larger bucket."""
    url = limits_server.url
    models = httpx.get(f"{url}/v1/models").json()["models"]
    larger = min(
        (
            m
            for m in models
            if m["pool"] == "global" and m["bucket"] > 224 and m["name"].endswith(f"_{m['bucket']}")
        ),
        key=lambda m: m["bucket"],
    )
    prime_batch_of_two(url, ENTRY)
    queued = [Background(url) for _ in range(MAX_QUEUE_SIZE)]
    wait_until(lambda: _queued(url) == MAX_QUEUE_SIZE, "the queue to fill")
    assert scrape_metrics(url).value("vitserve_queue_bytes", pool="global") == 2 * 3 * 224 * 224 * 4
    side = larger["bucket"]

    response = v2_infer(url, larger["name"], np.zeros((1, 3, side, side), np.float32))

    assert response.status_code == 429, response.text
    assert "queued bytes" in response.json()["error"]
    assert [q.result().status_code for q in queued] == [200] * MAX_QUEUE_SIZE
    assert scrape_metrics(url).value("vitserve_queue_bytes", pool="global") == 0
    assert v2_infer(url, larger["name"], np.zeros((1, 3, side, side), np.float32)).status_code == 200


def test_v2_request_with_more_rows_than_the_queue_holds_is_429_in_the_kserve_shape(
    limits_server: ServerProcess,
) -> None:
    url = limits_server.url

    response = v2_infer(url, ENTRY, np.zeros((MAX_QUEUE_SIZE + 1, 3, 224, 224), np.float32))

    assert response.status_code == 429
    assert response.json() == {"error": response.json()["error"], "code": "queue_full"}
    assert int(response.headers["retry-after"]) >= 1
    assert_serves(url)


def test_deadline_passing_in_the_queue_is_504_and_never_computed(limits_server: ServerProcess) -> None:
    url = limits_server.url
    prime_batch_of_two(url, ENTRY)
    computed = _computed(url)
    before = scrape_metrics(url)

    by_query = Background(url, timeout_ms=300)
    by_header = httpx.post(
        f"{url}/v1/classify", content=SMALL_PNG, headers={**PNG, "x-request-timeout-ms": "300"}, timeout=60
    )

    assert_error(by_header, 504, "deadline_exceeded")
    assert_error(by_query.result(), 504, "deadline_exceeded")
    delta = scrape_metrics(url) - before
    assert delta.value("vitserve_requests_total", endpoint="classify", status="504") == 2
    assert _computed(url) == computed
    assert_serves(url)


def test_client_that_disconnects_while_queued_is_never_computed(limits_server: ServerProcess) -> None:
    url = limits_server.url
    prime_batch_of_two(url, ENTRY)
    computed = _computed(url)
    before = scrape_metrics(url)
    request = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {limits_server.port}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(SMALL_PNG)}\r\n\r\n"
    ).encode() + SMALL_PNG

    with socket.create_connection(("127.0.0.1", limits_server.port)) as client:
        client.sendall(request)
        wait_until(lambda: _queued(url) == 1, "the request to be queued")
    wait_until(lambda: _queued(url) == 0, "the withdrawn request to leave the queue")

    assert_serves(url)  # waits past the queue delay the withdrawn request would have waited
    delta = scrape_metrics(url) - before
    assert delta.value("vitserve_requests_total", endpoint="classify", status="499") == 1
    assert _computed(url) == computed + 1  # only assert_serves' request
    assert '"level": "error"' not in limits_server.log()  # a hang-up is routine, not a server error


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """`total` bytes as a generator, so httpx sends them chunked with no Content-Length."""
    for start in range(0, total, size):
        yield b"\0" * min(size, total - start)


def test_chunked_body_over_the_byte_limit_is_413(limits_server: ServerProcess) -> None:
    response = httpx.post(
        f"{limits_server.url}/v1/classify", content=_chunks(MAX_BODY_BYTES + 500_000), headers=PNG, timeout=60
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")
    assert_serves(limits_server.url)


def test_chunked_multipart_upload_over_the_byte_limit_is_413_without_spooling(
    limits_server: ServerProcess,
) -> None:
    boundary = "vitserve-test-boundary"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        yield from _chunks(MAX_BODY_BYTES + 500_000)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(
        f"{limits_server.url}/v1/classify",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )
    assert_error(response, 413, "payload_too_large")
    assert_serves(limits_server.url)


def _partial_upload(port: int, sent: bytes, declared: int, timeout_ms: int | None = None) -> socket.socket:
    """A connection that declared `declared` body bytes and sent only `sent`."""
    extra = f"X-Request-Timeout-Ms: {timeout_ms}\r\n" if timeout_ms else ""
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(
        (
            f"POST /v1/classify HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n{extra}"
            f"Content-Length: {declared}\r\n\r\n"
        ).encode()
        + sent
    )
    return client


def test_slow_upload_times_out_408_at_its_deadline_while_others_are_served(
    limits_server: ServerProcess,
) -> None:
    url = limits_server.url
    with _partial_upload(limits_server.port, SMALL_PNG[:20], len(SMALL_PNG), timeout_ms=500) as slow:
        assert_serves(url)  # served while the slow upload holds its connection
        slow.settimeout(60)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += slow.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def _read_until_closed(client: socket.socket) -> bytes:
    client.settimeout(60)
    received = b""
    while chunk := client.recv(4096):
        received += chunk
    return received


def test_slow_headers_get_408_and_their_connection_closed_while_others_are_served(
    limits_server: ServerProcess,
) -> None:
    """A slowloris client that keeps sending header lines, and one that sends nothing, both lose their
    connection at the header deadline; requests from everyone else are served meanwhile."""
    url = limits_server.url
    before = scrape_metrics(url)
    address = ("127.0.0.1", limits_server.port)
    with socket.create_connection(address) as slow, socket.create_connection(address) as silent:
        slow.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: localhost\r\n")
        assert_serves(url)
        slow.sendall(b"Content-Type: image/png\r\n")  # more header bytes do not extend the deadline
        answer = _read_until_closed(slow)
        assert _read_until_closed(silent) == b""  # nothing was asked, so nothing is answered
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(body)["error"]["code"] == "header_timeout"
    counted = scrape_metrics(url) - before
    assert counted.value("vitserve_requests_total", endpoint="none", status="408") == 1
    assert_serves(url)


def test_client_that_disconnects_mid_upload_is_dropped_and_counted(limits_server: ServerProcess) -> None:
    url = limits_server.url
    before = scrape_metrics(url)
    with _partial_upload(limits_server.port, SMALL_PNG[:20], len(SMALL_PNG)):
        pass
    wait_until(
        lambda: (
            (scrape_metrics(url) - before).value("vitserve_requests_total", endpoint="classify", status="499")
            == 1
        ),
        "the hang-up to be counted",
    )
    assert (scrape_metrics(url) - before).value("vitserve_preprocess_duration_seconds_count") == 0
    assert_serves(url)
