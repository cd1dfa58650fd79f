"""Pool endpoints: where a pool's replicas are, and which one takes the next batch.

A ClusterIP Service balances per connection, and a gateway keeps its connections open, so replicas
added behind one get no work. The gateway therefore resolves a pool address to its replicas itself
and balances every batch. Address forms (the values of VITSERVE_TRITON_URLS):

  grpc://HOST:PORT, http://HOST:PORT   one endpoint
  URL|URL|...                          a fixed list of endpoints
  dns+grpc://NAME:PORT, dns+http://…   every address NAME resolves to (a headless Service),
                                       re-resolved every `refresh_s`
  file:///PATH                         one URL per line (blank lines and `#` comments skipped),
                                       re-read every `refresh_s`: the local stand-in for an
                                       EndpointSlice, written by the cluster test's scaler

Balancing: each batch goes to the endpoint with the fewest batches in flight (ties go to the one
picked longest ago, so idle replicas share the load), and an endpoint takes at most `concurrency`
batches at once, so a pool's capacity grows with its replicas. `acquire` waits for a free slot until
the caller's deadline. An endpoint whose call failed as unavailable is ejected (skipped) for
`eject_s`; when every endpoint is ejected the one ejected first is tried anyway, so a lone pool that
restarts is found again at once instead of after the ejection. A refresh that fails (DNS error,
unreadable file) keeps the endpoints last known and logs a warning; a removed endpoint finishes its
batches in flight.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.runtimes import RuntimeUnavailable

log = logging.getLogger("vitserve.endpoints")
PROTOCOLS = ("grpc", "http")
ADDRESS_FORMS = (
    "grpc://HOST:PORT, http://HOST:PORT, URL|URL, dns+grpc://NAME:PORT, dns+http://NAME:PORT or file:///PATH"
)


def check_url(url: str, pool: str) -> str:
    """`url` when it is grpc://HOST:PORT or http://HOST:PORT; ValueError naming the pool otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in PROTOCOLS or not parts.hostname or parts.port is None:
        raise ValueError(
            f"pool {pool}: endpoint {url!r} must look like grpc://HOST:PORT or http://HOST:PORT "
            f"(a pool address is {ADDRESS_FORMS})"
        )
    return url


@dataclass(frozen=True)
class Source:
    """How a pool address turns into endpoint URLs; `dynamic` ones are resolved again every refresh."""

    address: str
    resolve: Callable[[], list[str]]
    dynamic: bool


def parse_address(address: str, pool: str) -> Source:
    """The endpoint source an address names (see the module docstring); ValueError when malformed."""
    parts = urlsplit(address)
    if parts.scheme == "file":
        path = Path(parts.path)
        if not parts.path:
            raise ValueError(f"pool {pool}: {address!r} names no file; write file:///absolute/path")
        return Source(address, lambda: _read_file(path, pool), dynamic=True)
    if parts.scheme in ("dns+grpc", "dns+http"):
        protocol = parts.scheme.removeprefix("dns+")
        if not parts.hostname or parts.port is None:
            raise ValueError(f"pool {pool}: {address!r} must look like {parts.scheme}://NAME:PORT")
        host, port = parts.hostname, parts.port
        return Source(address, lambda: _resolve_dns(protocol, host, port), dynamic=True)
    urls = [check_url(url.strip(), pool) for url in address.split("|") if url.strip()]
    if not urls:
        raise ValueError(f"pool {pool}: empty address; write {ADDRESS_FORMS}")
    return Source(address, lambda: urls, dynamic=False)


def _read_file(path: Path, pool: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [check_url(line, pool) for line in lines if line]


def _resolve_dns(protocol: str, host: str, port: int) -> list[str]:
    """Every address of `host` (a headless Service answers one per ready pod), as URLs."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    hosts = sorted({info[4][0] for info in infos})
    return [f"{protocol}://{f'[{h}]' if ':' in h else h}:{port}" for h in hosts]


@dataclass(eq=False)
class Endpoint:
    """One replica of a pool and what this gateway has in flight there."""

    url: str
    inflight: int = 0
    ejected_until: float = 0.0
    last_picked: int = 0
    removed: bool = False

    @property
    def protocol(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return urlsplit(self.url).netloc


class EndpointMetrics:
    """Endpoints per pool, batches in flight per endpoint, outcomes and retries (label `replica`:
    the endpoint URL; `endpoint` is taken by the Prometheus Operator's target label)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry()
        self.endpoints = Gauge(
            "vitserve_pool_endpoints",
            "Known endpoints of a pool, by state.",
            ("pool", "state"),
            registry=registry,
        )
        self.inflight = Gauge(
            "vitserve_pool_endpoint_inflight",
            "Batches in flight per endpoint.",
            ("pool", "replica"),
            registry=registry,
        )
        self.batches = Counter(
            "vitserve_pool_endpoint_batches_total",
            "Batches sent per endpoint, by outcome (ok, unavailable, error).",
            ("pool", "replica", "outcome"),
            registry=registry,
        )
        self.retries = Counter(
            "vitserve_pool_retries_total",
            "Batches retried on another endpoint after a replica gave no answer (refused, dropped, draining).",
            ("pool",),
            registry=registry,
        )


class EndpointSet:
    """The endpoints of one pool address, refreshed in a daemon thread when the source is dynamic."""

    def __init__(
        self,
        address: str,
        pool: str,
        *,
        concurrency: int = 4,
        refresh_s: float = 5.0,
        eject_s: float = 5.0,
        metrics: EndpointMetrics | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"pool {pool}: endpoint concurrency must be at least 1, got {concurrency}")
        self.source = parse_address(address, pool)
        self.pool = pool
        self.concurrency = concurrency
        self.eject_s = eject_s
        self.metrics = metrics or EndpointMetrics()
        self._cond = threading.Condition()
        self._endpoints: dict[str, Endpoint] = {}
        self._picks = itertools.count(1)
        self._closed = threading.Event()
        self.metrics.endpoints.labels(pool, "ready").set_function(self.ready)
        self.metrics.endpoints.labels(pool, "ejected").set_function(lambda: self._count(ejected=True))
        self.refresh()
        if self.source.dynamic:
            threading.Thread(
                target=self._refresh_loop, args=(refresh_s,), name=f"endpoints-{pool}", daemon=True
            ).start()

    def urls(self) -> list[str]:
        with self._cond:
            return sorted(self._endpoints)

    def ready(self) -> int:
        """Endpoints not ejected: with none, the router routes around the pool (service/router.py)."""
        return self._count(ejected=False)

    def capacity(self) -> int:
        """Batches the pool's endpoints take at once (at least 1, so a batch still fails fast with none)."""
        with self._cond:
            return max(1, len(self._endpoints) * self.concurrency)

    def refresh(self) -> None:
        """Resolve the source again; endpoints that vanished finish their batches and are dropped."""
        try:
            urls = set(self.source.resolve())
        except (OSError, ValueError) as exc:
            log.warning(
                "endpoint refresh failed",
                extra={"pool": self.pool, "address": self.source.address, "error": str(exc)},
            )
            return
        with self._cond:
            for url in urls - set(self._endpoints):
                self._endpoints[url] = Endpoint(url)
                self.metrics.inflight.labels(self.pool, url).set(0)
            for url in set(self._endpoints) - urls:
                gone = self._endpoints.pop(url)
                gone.removed = True
                if gone.inflight == 0:
                    self.metrics.inflight.remove(self.pool, url)
            self._cond.notify_all()

    def acquire(self, deadline: float, exclude: frozenset[str] = frozenset()) -> Endpoint:
        """The endpoint for the next batch, holding one of its slots; waits for a slot until `deadline`.

        Raises RuntimeUnavailable when the pool has no endpoint outside `exclude`, or none frees a slot
        in time.
        """
        with self._cond:
            while True:
                candidates = [e for u, e in self._endpoints.items() if u not in exclude]
                if not candidates:
                    raise RuntimeUnavailable(
                        f"pool {self.pool} has no endpoints{' left to try' if exclude else ''} "
                        f"(address {self.source.address}); start a replica or fix VITSERVE_TRITON_URLS"
                    )
                endpoint = self._pick(candidates)
                if endpoint is not None:
                    endpoint.inflight += 1
                    endpoint.last_picked = next(self._picks)
                    self.metrics.inflight.labels(self.pool, endpoint.url).set(endpoint.inflight)
                    return endpoint
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeUnavailable(
                        f"pool {self.pool}: all {len(candidates)} endpoints stayed at their in-flight "
                        f"budget of {self.concurrency} until the batch's deadline; add replicas or raise "
                        "VITSERVE_ENDPOINT_CONCURRENCY"
                    )
                self._cond.wait(left)

    def _pick(self, candidates: list[Endpoint]) -> Endpoint | None:
        now = time.monotonic()
        free = [e for e in candidates if e.inflight < self.concurrency]
        healthy = [e for e in free if e.ejected_until <= now]
        if healthy:
            return min(healthy, key=lambda e: (e.inflight, e.last_picked))
        if free and all(e.ejected_until > now for e in candidates):
            return min(free, key=lambda e: e.ejected_until)
        return None

    def release(self, endpoint: Endpoint, outcome: str) -> None:
        """Return the slot; `outcome` is ok, error (the pool answered) or unavailable (ejects it)."""
        with self._cond:
            endpoint.inflight -= 1
            if outcome == "unavailable":
                endpoint.ejected_until = time.monotonic() + self.eject_s
            elif outcome == "ok":
                endpoint.ejected_until = 0.0
            if endpoint.removed and endpoint.inflight == 0:
                self.metrics.inflight.remove(self.pool, endpoint.url)
            elif not endpoint.removed:
                self.metrics.inflight.labels(self.pool, endpoint.url).set(endpoint.inflight)
            self.metrics.batches.labels(self.pool, endpoint.url, outcome).inc()
            self._cond.notify_all()

    def close(self) -> None:
        self._closed.set()

    def _count(self, ejected: bool) -> int:
        now = time.monotonic()
        with self._cond:
            return sum((e.ejected_until > now) == ejected for e in self._endpoints.values())

    def _refresh_loop(self, refresh_s: float) -> None:
        while not self._closed.wait(refresh_s):
            self.refresh()


@dataclass
class EndpointRegistry:
    """One EndpointSet per (pool, address) in a process, shared by every entry of the pool, so the
    in-flight budget of an endpoint covers all buckets sent to it."""

    concurrency: int = 4
    refresh_s: float = 5.0
    eject_s: float = 5.0
    metrics: EndpointMetrics = field(default_factory=EndpointMetrics)
    _sets: dict[tuple[str, str], EndpointSet] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, address: str, pool: str) -> EndpointSet:
        with self._lock:
            key = (pool, address)
            if key not in self._sets:
                self._sets[key] = EndpointSet(
                    address,
                    pool,
                    concurrency=self.concurrency,
                    refresh_s=self.refresh_s,
                    eject_s=self.eject_s,
                    metrics=self.metrics,
                )
            return self._sets[key]

    def close(self) -> None:
        with self._lock:
            for endpoints in self._sets.values():
                endpoints.close()
