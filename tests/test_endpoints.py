"""Pool endpoints (service/runtimes/endpoints.py): address forms, least-outstanding balancing within a
per-endpoint budget, ejection, and re-resolution of file:// and dns+ addresses.

These run on the EndpointSet alone; tests/test_scaleout.py sends real batches to real pools.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.runtimes import RuntimeUnavailable
from service.runtimes.endpoints import EndpointMetrics, EndpointSet, parse_address
from service.settings import Settings
from support.server import wait_until

A, B, C = (f"http://127.0.0.{i}:8000" for i in (1, 2, 3))


def later(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_address_forms() -> None:
    assert parse_address(A, "global").resolve() == [A]
    assert parse_address(f"{A} | grpc://127.0.0.2:8001", "global").resolve() == [A, "grpc://127.0.0.2:8001"]
    assert parse_address("dns+grpc://localhost:8001", "global").resolve() == ["grpc://127.0.0.1:8001"]
    assert parse_address("file:///etc/hostname", "global").dynamic
    assert not parse_address(A, "global").dynamic


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:8000", "must look like grpc://HOST:PORT or http://HOST:PORT"),
        (f"{A}|ftp://x:1", "'ftp://x:1' must look like"),
        ("dns+grpc://pool", "must look like dns\\+grpc://NAME:PORT"),
        ("file://", "names no file"),
        (" | ", "empty address"),
    ],
)
def test_malformed_addresses_say_what_to_write(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_address(address, "global")


def test_settings_reject_a_malformed_pool_address_by_name() -> None:
    with pytest.raises(ValueError, match="global=http://127.0.0.1:8001"):
        Settings(triton_urls="global")


def test_batches_go_to_the_least_busy_endpoint_and_idle_ones_share() -> None:
    endpoints = EndpointSet(f"{A}|{B}|{C}", "global", concurrency=4)
    first = {e.url: e for e in (endpoints.acquire(later()) for _ in range(3))}
    assert sorted(first) == [A, B, C], "three batches spread over three idle endpoints"
    endpoints.release(first[B], "ok")
    assert endpoints.acquire(later()).url == B, "the endpoint that finished has the least work"
    assert sorted(endpoints.acquire(later()).url for _ in range(3)) == [A, B, C]


def test_budget_per_endpoint_bounds_in_flight_batches_and_capacity_grows_with_endpoints(
    tmp_path: Path,
) -> None:
    listing = tmp_path / "endpoints"
    listing.write_text(f"{A}\n")
    endpoints = EndpointSet(f"file://{listing}", "global", concurrency=2, refresh_s=60)
    assert endpoints.capacity() == 2
    held = [endpoints.acquire(later()), endpoints.acquire(later())]
    with pytest.raises(RuntimeUnavailable, match="in-flight budget of 2"):
        endpoints.acquire(later(0.05))

    waiter: list[str] = []
    thread = threading.Thread(target=lambda: waiter.append(endpoints.acquire(later(10)).url))
    thread.start()
    listing.write_text(f"# replicas\n{A}\n\n{B}\n")
    endpoints.refresh()
    thread.join(10)
    assert waiter == [B], "a waiting batch takes the slot of a replica that appears"
    assert endpoints.capacity() == 4
    for endpoint in held:
        endpoints.release(endpoint, "ok")


def test_failing_endpoint_is_ejected_until_its_time_is_up_unless_all_are() -> None:
    endpoints = EndpointSet(f"{A}|{B}", "global", concurrency=4, eject_s=0.3)
    failing = endpoints.acquire(later())
    endpoints.release(failing, "unavailable")
    healthy = next(u for u in (A, B) if u != failing.url)
    assert [endpoints.acquire(later()).url for _ in range(3)] == [healthy] * 3
    wait_until(lambda: endpoints.acquire(later()).url == failing.url, "the ejection to end", timeout=5)

    lone = EndpointSet(A, "global", eject_s=60)
    endpoint = lone.acquire(later())
    lone.release(endpoint, "unavailable")
    assert lone.acquire(later()).url == A, "a lone ejected endpoint is still tried"


def test_error_answers_keep_the_endpoint_and_retry_excludes_the_failed_one() -> None:
    endpoints = EndpointSet(f"{A}|{B}", "global")
    first = endpoints.acquire(later())
    endpoints.release(first, "error")
    assert endpoints.acquire(later(), exclude=frozenset({first.url})).url != first.url
    with pytest.raises(RuntimeUnavailable, match="no endpoints left to try"):
        endpoints.acquire(later(), exclude=frozenset({A, B}))


def test_file_source_is_reread_every_refresh_and_a_broken_file_keeps_the_last_endpoints(
    tmp_path: Path,
) -> None:
    listing = tmp_path / "endpoints"
    listing.write_text(f"{A}\n")
    registry = CollectorRegistry()
    metrics = EndpointMetrics(registry)
    endpoints = EndpointSet(f"file://{listing}", "windowed", refresh_s=0.05, metrics=metrics)
    try:
        assert endpoints.urls() == [A]
        listing.write_text(f"{B}\n{C}\n")
        wait_until(lambda: endpoints.urls() == [B, C], "the new listing to be read", timeout=10)
        listing.write_text("not a url\n")
        time.sleep(0.2)
        assert endpoints.urls() == [B, C]
        listing.unlink()
        time.sleep(0.2)
        assert endpoints.urls() == [B, C]
    finally:
        endpoints.close()

    assert registry.get_sample_value("vitserve_pool_endpoints", {"pool": "windowed", "state": "ready"}) == 2
    assert (
        registry.get_sample_value("vitserve_pool_endpoint_inflight", {"pool": "windowed", "replica": B}) == 0
    )
    assert (
        registry.get_sample_value("vitserve_pool_endpoint_inflight", {"pool": "windowed", "replica": A})
        is None
    )


def test_no_endpoints_is_unavailable_at_once(tmp_path: Path) -> None:
    listing = tmp_path / "endpoints"
    listing.write_text("")
    endpoints = EndpointSet(f"file://{listing}", "global", refresh_s=60)
    assert endpoints.capacity() == 1
    with pytest.raises(RuntimeUnavailable, match="pool global has no endpoints"):
        endpoints.acquire(later())
