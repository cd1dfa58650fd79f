"""The service's Prometheus metrics, with the names and labels ARCHITECTURE.md "Metrics" promises (prefix `vitserve_`).

Each `Metrics` owns its own `CollectorRegistry`, so several app instances (and the tests) can live in
one process without colliding in the global registry. The queue gauges are not pushed on every
request: queues register themselves as `QueueSource`s and the gauges sum them when Prometheus
scrapes, which keeps the request path free of gauge updates and makes the values exact at scrape time.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

# The `_created` timestamp series would double every counter and histogram in the text format; nothing
# here reads them, so the service process exports without them.
disable_created_metrics()

PREFIX = "vitserve"
# Millisecond-scale latencies (0.5 ms) up to the deadline range: the default deadline is 30 s, so
# requests that wait or run until it (and a little past, for the answer) land in a finite bucket.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class QueueSource(Protocol):
    """Anything that queues work for a model in a pool (a `service.batcher.Batcher`)."""

    @property
    def pool(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def pending_tokens(self) -> int: ...


class BudgetSource(Protocol):
    """A pool's byte budget (a `service.batcher.ByteBudget`)."""

    pool: str
    used: int


class Inflight:
    """Requests (HTTP and gRPC) being served now. Moved on the event loop; read by the
    inflight_requests gauge and by ONNX Runtime's idle spinning policy from batch threads."""

    def __init__(self) -> None:
        self._count = 0

    def inc(self) -> None:
        self._count += 1

    def dec(self) -> None:
        self._count -= 1

    def count(self) -> int:
        return self._count


class Metrics:
    """All vitserve metrics in one registry; `render()` serves them on /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._sources: tuple[QueueSource, ...] = ()

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets=LATENCY_BUCKETS) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, buckets=buckets, registry=self.registry)

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=self.registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=self.registry)

        self.request_duration = histogram(
            "request_duration_seconds",
            "End-to-end request time in the service.",
            ("endpoint", "route", "model"),
        )
        self.queue_duration = histogram(
            "queue_duration_seconds", "Time from submission to the start of the request's batch.", ("model",)
        )
        self.inference_duration = histogram(
            "inference_duration_seconds", "Runtime time of one successful batch.", ("model",)
        )
        self.preprocess_duration = histogram(
            "preprocess_duration_seconds", "Decode, resize and normalize time per image.", ("route",)
        )
        self.batch_size = histogram(
            "batch_size", "Requests per executed batch.", ("model",), buckets=BATCH_SIZE_BUCKETS
        )
        self.requests = counter(
            "requests_total",
            "Requests answered, by outcome status.",
            ("endpoint", "route", "model", "status"),
        )
        self.route_decisions = counter(
            "route_decisions_total", "Routing decisions taken by the router.", ("route", "bucket")
        )
        self.route_degraded = counter(
            "route_degraded_total",
            "Requests served at less detail than their budget allowed on idle queues, because of load.",
            ("pool",),
        )
        self.queue_depth = gauge(
            "queue_depth", "Requests waiting for their batch to start.", ("pool", "model")
        )
        self.pending_tokens = gauge(
            "pending_tokens",
            "Tokens of queued and running requests: the pool's autoscaling signal.",
            ("pool",),
        )
        self.queue_bytes = gauge(
            "queue_bytes", "Bytes of preprocessed images held by admitted, unanswered requests.", ("pool",)
        )
        self.decoding = gauge("decoding", "Images being decoded right now.", ("pool",))
        self.inflight = Inflight()
        self.inflight_requests = gauge("inflight_requests", "HTTP and gRPC requests being served right now.")
        self.inflight_requests.set_function(self.inflight.count)
        self.model_ready = gauge("model_ready", "1 when the model is loaded and can serve.", ("model",))

    def track_queue(self, source: QueueSource) -> None:
        """Count `source` in queue_depth{pool,model} and pending_tokens{pool} from now on."""
        self._sources = (*self._sources, source)
        self.queue_depth.labels(source.pool, source.model).set_function(
            partial(self._sum_depth, source.pool, source.model)
        )
        self.pending_tokens.labels(source.pool).set_function(partial(self._sum_tokens, source.pool))

    def track_budget(self, budget: BudgetSource) -> None:
        """Read queue_bytes{pool} from `budget` at scrape time."""
        self.queue_bytes.labels(budget.pool).set_function(lambda: budget.used)

    def untrack_queue(self, source: QueueSource) -> None:
        """Stop counting `source` (a closed queue); its labels stay and read what the others hold."""
        self._sources = tuple(s for s in self._sources if s is not source)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric and its content type.

        Declared as text format 0.0.4, which every Prometheus and promtool version parses; the body is
        the same in 1.0.0 because all names here are plain legacy names.
        """
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def _sum_depth(self, pool: str, model: str) -> int:
        return sum(s.queue_depth for s in self._sources if s.pool == pool and s.model == model)

    def _sum_tokens(self, pool: str) -> int:
        return sum(s.pending_tokens for s in self._sources if s.pool == pool)
