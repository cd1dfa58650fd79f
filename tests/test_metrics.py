"""The Prometheus surface ARCHITECTURE.md "Metrics" promises: names, labels, buckets, isolation, scrape-time queue gauges."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from service.metrics import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS, Metrics

# ARCHITECTURE.md "Metrics": family name (as the parser reports it), type, labels.
DESIGNED = {
    "vitserve_request_duration_seconds": ("histogram", {"endpoint", "route", "model"}),
    "vitserve_queue_duration_seconds": ("histogram", {"model"}),
    "vitserve_inference_duration_seconds": ("histogram", {"model"}),
    "vitserve_preprocess_duration_seconds": ("histogram", {"route"}),
    "vitserve_batch_size": ("histogram", {"model"}),
    "vitserve_requests": ("counter", {"endpoint", "route", "model", "status"}),
    "vitserve_route_decisions": ("counter", {"route", "bucket"}),
    "vitserve_route_degraded": ("counter", {"pool"}),
    "vitserve_queue_depth": ("gauge", {"pool", "model"}),
    "vitserve_pending_tokens": ("gauge", {"pool"}),
    "vitserve_queue_bytes": ("gauge", {"pool"}),
    "vitserve_decoding": ("gauge", {"pool"}),
    "vitserve_inflight_requests": ("gauge", set()),
    "vitserve_model_ready": ("gauge", {"model"}),
}


@dataclass
class Queue:
    """A plain queue source: the real counterpart of what `Batcher` exposes to the metrics."""

    pool: str
    model: str
    queue_depth: int
    pending_tokens: int


@dataclass
class Budget:
    """A plain byte budget: what `ByteBudget` exposes to the metrics."""

    pool: str
    used: int


def families(metrics: Metrics) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(metrics.render()[0].decode())}


def sample_values(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics.render()[0].decode())
        for s in family.samples
        if s.name == name
    }


def exercise(metrics: Metrics) -> None:
    """Touch one child of every labelled metric so each family renders its samples."""
    metrics.request_duration.labels("classify", "global", "vit").observe(0.004)
    metrics.queue_duration.labels("vit").observe(0.001)
    metrics.inference_duration.labels("vit").observe(0.02)
    metrics.preprocess_duration.labels("global").observe(0.002)
    metrics.batch_size.labels("vit").observe(8)
    metrics.requests.labels("classify", "global", "vit", "200").inc()
    metrics.route_decisions.labels("global", "224").inc()
    metrics.route_degraded.labels("windowed").inc()
    metrics.track_queue(Queue("global", "vit", 3, 588))
    metrics.track_budget(Budget("global", 1806336))
    metrics.decoding.labels("windowed").inc()
    metrics.inflight.inc()
    metrics.model_ready.labels("vit").set(1)


def test_every_designed_metric_is_exposed_with_its_type_and_labels() -> None:
    metrics = Metrics()
    exercise(metrics)
    exposed = families(metrics)
    assert set(exposed) == set(DESIGNED)
    for name, (kind, labels) in DESIGNED.items():
        family = exposed[name]
        assert family.type == kind, name
        sample_labels = {key for s in family.samples for key in s.labels} - {"le"}
        assert sample_labels == labels, name


def test_buckets_suit_millisecond_latencies_and_batch_sizes() -> None:
    metrics = Metrics()
    exercise(metrics)
    latency_edges = {
        float(dict(labels)["le"])
        for labels in sample_values(metrics, "vitserve_queue_duration_seconds_bucket")
    }
    assert latency_edges == {*LATENCY_BUCKETS, float("inf")}
    # From half a millisecond past the default 30 s deadline, so requests that expire are still resolved.
    assert min(LATENCY_BUCKETS) == 0.0005 and max(LATENCY_BUCKETS) >= 30.0
    batch_buckets = sample_values(metrics, "vitserve_batch_size_bucket")
    edges = {float(dict(labels)["le"]): value for labels, value in batch_buckets.items()}
    assert set(edges) == {*map(float, BATCH_SIZE_BUCKETS), float("inf")}
    assert edges[4.0] == 0 and edges[8.0] == 1  # the observed batch of 8 falls in le=8, not le=4


def test_instances_have_independent_registries() -> None:
    first, second = Metrics(), Metrics()
    first.requests.labels("embed", "windowed", "swin", "429").inc(2)
    assert sample_values(first, "vitserve_requests_total") == {
        (("endpoint", "embed"), ("model", "swin"), ("route", "windowed"), ("status", "429")): 2.0
    }
    assert sample_values(second, "vitserve_requests_total") == {}


def test_render_returns_prometheus_text_and_its_content_type() -> None:
    body, content_type = Metrics().render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# TYPE vitserve_inflight_requests gauge" in body


def test_queue_gauges_sum_the_tracked_queues_at_scrape_time() -> None:
    metrics = Metrics()
    small = Queue("windowed", "swin", queue_depth=2, pending_tokens=300)
    large = Queue("windowed", "swin", queue_depth=1, pending_tokens=4096)
    other = Queue("global", "vit", queue_depth=5, pending_tokens=980)
    for queue in (small, large, other):
        metrics.track_queue(queue)
    assert sample_values(metrics, "vitserve_pending_tokens") == {
        (("pool", "windowed"),): 4396.0,
        (("pool", "global"),): 980.0,
    }
    small.queue_depth, small.pending_tokens = 0, 0  # read when scraped, not when set
    assert sample_values(metrics, "vitserve_queue_depth")[("model", "swin"), ("pool", "windowed")] == 1.0
    metrics.untrack_queue(large)
    assert sample_values(metrics, "vitserve_pending_tokens")[(("pool", "windowed"),)] == 0.0
    assert sample_values(metrics, "vitserve_queue_depth")[("model", "vit"), ("pool", "global")] == 5.0
