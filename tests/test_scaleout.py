"""Rolling restarts and a killed pool under load, with real processes on 127.0.0.0/8 (issue 10).

The tier: pool processes (role=pool, each on its own loopback address, as pods have their own IPs)
serve the seeded digits repository; gateways on the triton runtime find them in a `file://`
endpoint list, the local stand-in for an EndpointSlice, re-read every REFRESH_S; clients reach the
gateways through a per-connection TCP balancer (tests/support/balancer.py), the stand-in for the
gateway's Service. The test plays the endpoints controller: it publishes a replica once it answers
ready, and unpublishes it as it sends SIGTERM, as Kubernetes does for a terminating pod.

1. Rolling restart of every pool, then of every gateway, under steady load: each old replica keeps
   serving through its shutdown delay (readiness false, `Connection: close` on every response)
   while the traffic moves to the others, and exits 0. Every client request answers 200, and the
   counts add up: the client's answers equal the gateways' counted requests and rows, which equal
   the rows the pools computed; the pools' answered calls equal the gateways' successful batches.
2. SIGKILL of a pool while a batch waits in its queue: the gateway retries the batch once on the
   other pool (ARCHITECTURE.md "Runtimes": a dropped connection gave no answer, and inference is
   idempotent), the client gets 200, and later requests keep answering 200.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from export import read_repository
from support.balancer import Backend, Balancer
from support.repos import build_seeded_digits_repository
from support.server import (
    PNG,
    MetricSamples,
    ServerProcess,
    encode_image,
    prime_batch_of_two,
    scrape_metrics,
    start_server,
    v2_infer,
    wait_until,
    write_endpoints,
)

REFRESH_S = 0.25
# Long enough for the gateways (and the balancer) to stop sending here, and for the test to read
# the counters of the replica before it closes its listener.
POOL_DELAY_S = 4.0
GATEWAY_DELAY_S = 5.0
DRAIN_TIMEOUT_S = 10.0
EXIT_WAIT_S = POOL_DELAY_S + GATEWAY_DELAY_S + DRAIN_TIMEOUT_S + 20
LOAD_CLIENTS = 4
LOAD_BOUND_S = 300.0
TRANSPORT_FAILURE = 0
FAILURE_PAUSE_S = 0.1
REQUEST_TIMEOUT_S = 30.0
# Requests answered before the first restart and after the last one, so the load spans them.
ANSWERED_AROUND_RESTARTS = 20
POOLS = 2
GATEWAYS = 2
# The gateway's pools, both served by every pool replica through one endpoint list.
GATEWAY_POOLS = ("global", "windowed")
# The killed pool holds a lone batch this long in its queue (after a batch of two, see
# support.server.prime_batch_of_two): far longer than the test needs to kill it.
SLOW_QUEUE_MS = 20_000
LATER_REQUESTS = 5
SETTINGS = {"intra_op_threads": 1, "log_level": "warning", "drain_timeout_s": DRAIN_TIMEOUT_S}
DIGIT = encode_image(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_seeded_digits_repository(tmp_path_factory.mktemp("scaleout-repository"))


class Tier:
    """Starts pools and gateways on fresh loopback addresses; every process it started is stopped by `close`."""

    def __init__(self, repository: Path, log_dir: Path) -> None:
        self.repository = repository
        self.log_dir = log_dir
        self.endpoints = log_dir / "endpoints.txt"
        self.endpoints.write_text("")
        self._hosts = (f"127.0.0.{n}" for n in itertools.count(2))
        self._started: list[ServerProcess] = []

    def _start(self, name: str, **settings: object) -> ServerProcess:
        host = next(self._hosts)
        server = start_server(self.log_dir / f"{name}-{host}", host=host, **SETTINGS, **settings)
        self._started.append(server)
        return server

    def pool(self, **settings: object) -> ServerProcess:
        return self._start("pool", repository=self.repository, role="pool", **settings)

    def gateway(self, **settings: object) -> ServerProcess:
        address = f"file://{self.endpoints}"
        return self._start(
            "gateway",
            repository=self.repository,
            runtime="triton",
            triton_urls=",".join(f"{pool}={address}" for pool in GATEWAY_POOLS),
            endpoint_refresh_s=REFRESH_S,
            request_timeout_ms=REQUEST_TIMEOUT_S * 1000,
            **settings,
        )

    def publish(self, pools: list[ServerProcess]) -> None:
        write_endpoints(self.endpoints, pools)

    def close(self) -> None:
        """SIGTERM every process still running at once (their shutdown delays overlap), then wait."""
        for server in self._started:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        for server in self._started:
            server.stop()


@pytest.fixture
def tier(repository: Path, tmp_path: Path) -> Iterator[Tier]:
    started = Tier(repository, tmp_path)
    yield started
    started.close()


def in_parallel(*starts: Callable[[], ServerProcess]) -> list[ServerProcess]:
    """Start processes together, so their start-ups (mostly imports) share the cores instead of queueing."""
    with ThreadPoolExecutor(len(starts)) as starting:
        return [f.result() for f in [starting.submit(start) for start in starts]]


def backend(server: ServerProcess) -> Backend:
    return str(urlsplit(server.url).hostname), server.port


def listing(gateway: ServerProcess, pool: ServerProcess) -> set[str]:
    """The gateway's pools (GATEWAY_POOLS) that still have `pool` among their endpoints (a removed one
    keeps its series until its last batch in flight returns). Each pool re-reads the endpoint list on
    its own schedule, so one may list a replica while the other does not yet, or no longer."""
    samples = scrape_metrics(gateway.url).samples
    return {
        dict(labels)["pool"]
        for name, labels in samples
        if name == "vitserve_pool_endpoint_inflight" and ("replica", pool.url) in labels
    }


def knows(gateway: ServerProcess, pool: ServerProcess) -> bool:
    """Whether every pool of the gateway lists `pool`, so requests of either backbone can reach it."""
    return listing(gateway, pool) == set(GATEWAY_POOLS)


class Load:
    """LOAD_CLIENTS threads, each with its own keep-alive client, posting a digit to /v1/classify until
    `stop` or LOAD_BOUND_S. `statuses` counts answers by status, TRANSPORT_FAILURE for none."""

    def __init__(self, url: str) -> None:
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        deadline = time.monotonic() + LOAD_BOUND_S
        self._threads = [
            threading.Thread(target=self._client, args=(url, deadline), daemon=True)
            for _ in range(LOAD_CLIENTS)
        ]
        for thread in self._threads:
            thread.start()

    def _client(self, url: str, deadline: float) -> None:
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S + 10) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    response = client.post("/v1/classify", content=DIGIT, headers=PNG)
                    status, failure = response.status_code, response.text
                except httpx.TransportError as exc:
                    status, failure = TRANSPORT_FAILURE, repr(exc)
                with self._lock:
                    self.statuses[status] += 1
                    if status != 200:
                        self.failures.append(failure)
                if status == TRANSPORT_FAILURE:
                    self._stop.wait(FAILURE_PAUSE_S)

    def answered(self) -> int:
        with self._lock:
            return sum(self.statuses.values())

    def wait_for(self, more: int) -> None:
        target = self.answered() + more
        wait_until(lambda: self.answered() >= target, f"{more} more answers", timeout=60, interval=0.1)

    def stop(self) -> Counter[int]:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_S + 20)
            assert not thread.is_alive(), "a load client did not finish"
        return self.statuses


def retire(server: ServerProcess, gone: Callable[[], bool]) -> MetricSamples:
    """The replica's final counters: SIGTERM, wait until `gone()` says nobody sends to it any more
    (it keeps serving meanwhile), read them during its shutdown delay, then wait for exit 0."""
    server.process.send_signal(signal.SIGTERM)
    wait_until(
        lambda: httpx.get(f"{server.url}/v2/health/ready").status_code == 503, "readiness to turn false"
    )
    wait_until(gone, f"traffic to leave {server.url}", timeout=min(POOL_DELAY_S, GATEWAY_DELAY_S) - 1)
    final = scrape_metrics(server.url)
    assert server.process.wait(EXIT_WAIT_S) == 0, server.log()
    return final


class Rollout:
    """The tier under load: pools and gateways in service, their replacements, and the final counters
    of every replica.

    The replacements start with the tier, before the load, as a rollout with a full surge would:
    starting a process is most of this test's time on a two-core machine. Each joins the tier only
    at its turn (published, or put behind the balancer), and the replica it replaces retires then.
    """

    def __init__(self, tier: Tier) -> None:
        self.tier = tier
        starts = [self.start_pool] * (2 * POOLS) + [self.start_gateway] * (2 * GATEWAYS)
        started = in_parallel(*starts)
        self.pools, self.spare_pools = started[:POOLS], started[POOLS : 2 * POOLS]
        self.gateways, self.spare_gateways = started[2 * POOLS : -GATEWAYS], started[-GATEWAYS:]
        tier.publish(self.pools)
        wait_until(lambda: all(self.listed(p) for p in self.pools), "the gateways to list the pools")
        self.balancer = Balancer([backend(g) for g in self.gateways])
        self.pool_urls = {p.url for p in started[: 2 * POOLS]}
        self.gateway_urls = {g.url for g in started[2 * POOLS :]}
        self.first_gateways = frozenset(g.url for g in self.gateways)
        self.finals: dict[str, MetricSamples] = {}

    def start_pool(self) -> ServerProcess:
        return self.tier.pool(shutdown_delay_s=POOL_DELAY_S)

    def start_gateway(self) -> ServerProcess:
        return self.tier.gateway(shutdown_delay_s=GATEWAY_DELAY_S)

    def listed(self, pool: ServerProcess) -> bool:
        return all(knows(g, pool) for g in self.gateways)

    def unlisted(self, pool: ServerProcess) -> bool:
        return not any(listing(g, pool) for g in self.gateways)

    def replace_pool(self, old: ServerProcess, new: ServerProcess) -> None:
        """Publish `new`; once every gateway lists it, unpublish and retire `old`."""
        self.tier.publish([*self.pools, new])
        wait_until(lambda: self.listed(new), "the gateways to list the new pool")
        self.pools = [p for p in self.pools if p is not old] + [new]
        self.tier.publish(self.pools)
        self.finals[old.url] = retire(old, lambda: self.unlisted(old))

    def replace_gateway(self, old: ServerProcess, new: ServerProcess) -> None:
        """Put `new` behind the balancer, take `old` out of it, and retire `old`."""
        wait_until(lambda: all(knows(new, p) for p in self.pools), "the new gateway to list the pools")
        self.gateways = [g for g in self.gateways if g is not old] + [new]
        self.balancer.set_backends([backend(g) for g in self.gateways])
        self.finals[old.url] = retire(old, lambda: self.balancer.connections(backend(old)) == 0)

    def total(self, urls: set[str], name: str, **labels: str) -> float:
        return sum(self.finals[url].value(name, **labels) for url in urls)


def test_rolling_restart_of_every_pool_and_gateway_under_load_answers_every_request(tier: Tier) -> None:
    rollout = Rollout(tier)
    load = Load(rollout.balancer.url)
    try:
        load.wait_for(ANSWERED_AROUND_RESTARTS)
        for old, new in zip(list(rollout.pools), rollout.spare_pools, strict=True):
            rollout.replace_pool(old, new)
        for old, new in zip(list(rollout.gateways), rollout.spare_gateways, strict=True):
            rollout.replace_gateway(old, new)
        load.wait_for(ANSWERED_AROUND_RESTARTS)
    finally:
        statuses = load.stop()
        rollout.balancer.close()
    rollout.finals.update({s.url: scrape_metrics(s.url) for s in (*rollout.pools, *rollout.gateways)})

    assert set(statuses) == {200}, (statuses, load.failures[:5])
    answered = statuses[200]
    gateways, pools, total = rollout.gateway_urls, rollout.pool_urls, rollout.total
    assert len(gateways) == 2 * GATEWAYS and len(pools) == 2 * POOLS
    assert total(gateways, "vitserve_requests_total", endpoint="classify") == answered
    assert total(gateways, "vitserve_requests_total", endpoint="classify", status="200") == answered
    assert total(gateways, "vitserve_batch_size_sum") == answered, "rows the gateways batched"
    assert total(pools, "vitserve_batch_size_sum") == answered, "every row computed once, on a pool"
    sent = total(gateways, "vitserve_pool_endpoint_batches_total", outcome="ok")
    assert total(pools, "vitserve_requests_total", endpoint="v2_infer", status="200") == sent
    # Every pool took part, and the traffic moved: every old gateway and the new ones served.
    for url in pools:
        assert rollout.finals[url].value("vitserve_batch_size_count") > 0, url
    served = {
        url: rollout.finals[url].value("vitserve_requests_total", endpoint="classify") for url in gateways
    }
    assert all(served[url] > 0 for url in rollout.first_gateways), served
    assert sum(served[url] for url in gateways - rollout.first_gateways) > 0, served


def entry_name(repository: Path, backbone: str) -> str:
    (entry,) = [e.name for e in read_repository(repository) if e.backbone == backbone]
    return entry


def test_pool_killed_mid_batch_is_retried_on_another_and_the_others_keep_serving(tier: Tier) -> None:
    entry = entry_name(tier.repository, "vit_digits")
    doomed, other, gateway = in_parallel(
        lambda: tier.pool(max_queue_delay_ms=SLOW_QUEUE_MS, max_batch_size=8), tier.pool, tier.gateway
    )
    tier.publish([doomed])
    wait_until(lambda: knows(gateway, doomed), "the gateway to list the doomed pool")
    prime_batch_of_two(doomed.url, entry)
    pixels = np.zeros((1, 3, 32, 32), np.float32)

    with ThreadPoolExecutor(1) as client:
        answer = client.submit(v2_infer, gateway.url, entry, pixels)
        wait_until(
            lambda: scrape_metrics(doomed.url).value("vitserve_queue_depth", model=entry) == 1,
            "the gateway's batch to wait in the doomed pool",
        )
        tier.publish([doomed, other])
        wait_until(lambda: knows(gateway, other), "the gateway to list the other pool")
        doomed.process.send_signal(signal.SIGKILL)
        response = answer.result(REQUEST_TIMEOUT_S + 10)

    assert response.status_code == 200, response.text
    metrics = scrape_metrics(gateway.url)
    assert metrics.value("vitserve_pool_retries_total", pool="global") == 1
    assert (
        metrics.value("vitserve_pool_endpoint_batches_total", replica=doomed.url, outcome="unavailable") == 1
    )
    assert scrape_metrics(other.url).value("vitserve_batch_size_sum", model=entry) == 1
    later = [v2_infer(gateway.url, entry, pixels).status_code for _ in range(LATER_REQUESTS)]
    assert later == [200] * LATER_REQUESTS
    assert doomed.process.wait(10) == -signal.SIGKILL
