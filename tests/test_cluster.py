"""The scaling loop of deploy/, run locally with real processes on 127.0.0.0/8.

A real Prometheus scrapes a gateway (127.0.0.2) and windowed pool processes (127.0.0.3, .4, ...) as
the Operator would through deploy/'s ServiceMonitors (same target labels, same relabelings). A test
controller (tests/support/scaler.py) evaluates the rendered cpu overlay's ScaledObject query for
pool-windowed against that Prometheus and applies KEDA's rule, starting and stopping pool
processes and writing the gateway's `file://` endpoint list. Under a bounded load step the replicas
rise, each new pool serves batches within 10 s of becoming ready (its own /metrics counters say so),
the pending tokens fall once the load stops, and the replicas fall back to the minimum.

What differs from a cluster, on purpose: maxReplicaCount is capped at LOCAL_MAX_REPLICAS (the
machine has two cores), and the HPA's scale-down stabilization window (600 s) is SCALE_DOWN_AFTER_S.
The query, the threshold and minReplicaCount are the manifest's.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from export import read_repository
from service.state import GLOBAL_ATTENTION
from support.manifests import Build, build, pod_labels
from support.prometheus import Prometheus, Target, scrape_job, write_targets
from support.scaler import PoolScaler, ScaleRule
from support.server import ServerProcess, scrape_metrics, start_server, v2_infer, wait_until

POOL = "pool-windowed"
LOCAL_MAX_REPLICAS = 3
SCALE_DOWN_AFTER_S = 3.0
REFRESH_S = 1.0
SCRAPE_S = 1.0
# One batch in flight to the pool at a time, whatever the replicas: the load then keeps one of this
# machine's two cores busy and leaves the other for starting replicas. The signal is unchanged
# (pending tokens count queued and running work alike), and each new replica still takes its turn.
MAX_REMOTE_BATCHES = 1
# Small batches, so a new replica waits at most one short batch for its turn.
GATEWAY_MAX_BATCH = 2
# Concurrent clients of the load step, each sending LOAD_ROWS images at a time (a v2 request may not
# exceed the batch limit): enough pending tokens for LOCAL_MAX_REPLICAS replicas at the manifest's
# threshold (checked below).
LOAD_CLIENTS = 12
LOAD_ROWS = GATEWAY_MAX_BATCH
LOAD_BOUND_S = 90.0
FIRST_BATCH_WITHIN_S = 10.0
POOL_SETTINGS = {"role": "pool", "intra_op_threads": 1, "log_level": "warning"}


@dataclass(frozen=True)
class Cluster:
    """The running processes and where the scaler publishes endpoints."""

    prometheus: Prometheus
    gateway: ServerProcess
    scaler: PoolScaler
    entry: str
    bucket: int
    tokens: int


def windowed_entry(repository: Path) -> tuple[str, int, int]:
    """(name, bucket, tokens per image) of the windowed backbone's smallest square bucket: the lightest
    requests that still count in the windowed pool's signal."""
    entries = [
        e
        for e in read_repository(repository)
        if e.attention != GLOBAL_ATTENTION and e.input_shape[1] == e.input_shape[2]
    ]
    smallest = min(entries, key=lambda e: e.bucket)
    return smallest.name, smallest.bucket, smallest.tokens


def monitor_endpoint(b: Build, monitor: str) -> dict:
    (endpoint,) = b.get("ServiceMonitor", monitor)["spec"]["endpoints"]
    return endpoint


def operator_target(b: Build, deployment: str, monitor: str, server: ServerProcess, pod: str) -> Target:
    """The target the Operator derives from `monitor` for one pod of `deployment` behind its Service."""
    d = b.get("Deployment", deployment)
    return Target(
        address=server.url.removeprefix("http://"),
        namespace=d["metadata"]["namespace"],
        service=deployment,
        pod=pod,
        container=d["spec"]["template"]["spec"]["containers"][0]["name"],
        port_name=monitor_endpoint(b, monitor)["port"],
        pod_labels=pod_labels(d),
    )


@pytest.fixture
def cluster(photo_repository: Path, tmp_path: Path) -> Iterator[Cluster]:
    b = build("cpu")
    rule = ScaleRule.from_scaled_object(b.get("ScaledObject", POOL))
    rule = replace(rule, max_replicas=min(rule.max_replicas, LOCAL_MAX_REPLICAS))
    entry, bucket, tokens = windowed_entry(photo_repository)
    endpoints, pool_targets, gateway_targets = (
        tmp_path / n for n in ("windowed.txt", "pools.json", "gw.json")
    )
    for path in (pool_targets, gateway_targets):
        write_targets(path, [])
    endpoints.write_text("")
    prometheus = Prometheus(
        tmp_path / "prometheus",
        [
            scrape_job("gateway", monitor_endpoint(b, "gateway"), gateway_targets, SCRAPE_S),
            scrape_job(POOL, monitor_endpoint(b, "pools"), pool_targets, SCRAPE_S),
        ],
        SCRAPE_S,
    )

    def start_pool(host: str, index: int) -> ServerProcess:
        return start_server(
            tmp_path / f"pool-{index}",
            repository=photo_repository,
            models=entry,
            host=host,
            **POOL_SETTINGS,
        )

    scaler = PoolScaler(
        rule=rule,
        prometheus=prometheus,
        start_replica=start_pool,
        target_for=lambda server, index: operator_target(b, POOL, "pools", server, f"{POOL}-{index}"),
        endpoints_file=endpoints,
        targets_file=pool_targets,
        gateway_refresh_s=REFRESH_S,
        scale_down_after_s=SCALE_DOWN_AFTER_S,
    )
    gateway = None
    try:
        # The gateway and the first replicas start together; the gateway finds them in its list.
        with ThreadPoolExecutor(1) as background:
            starting = background.submit(
                start_server,
                tmp_path / "gateway",
                repository=photo_repository,
                host="127.0.0.2",
                runtimes=f"{entry}=triton",
                triton_urls=f"windowed=file://{endpoints}",
                endpoint_refresh_s=REFRESH_S,
                max_remote_batches=MAX_REMOTE_BATCHES,
                max_batch_size=GATEWAY_MAX_BATCH,
                request_timeout_ms=LOAD_BOUND_S * 1000,
                intra_op_threads=1,
                log_level="warning",
            )
            scaler.scale_to(rule.min_replicas)
            gateway = starting.result()
        write_targets(gateway_targets, [operator_target(b, "gateway", "gateway", gateway, "gateway-0")])
        yield Cluster(prometheus, gateway, scaler, entry, bucket, tokens)
    finally:
        scaler.close()
        if gateway is not None:
            gateway.stop()
        prometheus.stop()


def batches(server: ServerProcess, entry: str) -> float:
    return scrape_metrics(server.url).value("vitserve_batch_size_count", model=entry)


class Load:
    """LOAD_CLIENTS threads each sending LOAD_ROWS images at a time to the gateway until `stop` or LOAD_BOUND_S."""

    def __init__(self, cluster: Cluster) -> None:
        self.statuses: Counter[int] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        side = cluster.bucket
        pixels = np.random.default_rng(0).random((LOAD_ROWS, 3, side, side), dtype=np.float32)
        deadline = time.monotonic() + LOAD_BOUND_S
        self._threads = [
            threading.Thread(target=self._client, args=(cluster, pixels, deadline), daemon=True)
            for _ in range(LOAD_CLIENTS)
        ]
        for thread in self._threads:
            thread.start()

    def _client(self, cluster: Cluster, pixels: np.ndarray, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            status = v2_infer(cluster.gateway.url, cluster.entry, pixels).status_code
            with self._lock:
                self.statuses[status] += 1

    def stop(self) -> Counter[int]:
        self._stop.set()
        for thread in self._threads:
            thread.join(LOAD_BOUND_S)
            assert not thread.is_alive(), "a load client did not finish"
        return self.statuses


def assert_stored_as_the_operator_would(cluster: Cluster) -> None:
    """The ServiceMonitors' relabelings, run by Prometheus itself: `component` from the pod, and
    vitserve's `endpoint` label kept where the Operator's target label would have renamed it."""
    pixels = np.zeros((1, 3, cluster.bucket, cluster.bucket), np.float32)
    response = v2_infer(cluster.gateway.url, cluster.entry, pixels)
    assert response.status_code == 200, response.text
    # Readiness probes are counted too (endpoint="ready"): select the request just sent. Were the
    # Operator's target label to win, no series would carry endpoint="v2_infer" and this would time out.
    query = 'vitserve_requests_total{job="gateway", component="gateway", endpoint="v2_infer", status="200"}'
    wait_until(lambda: bool(cluster.prometheus.query(query)), "Prometheus to store the request", timeout=15)
    (sample,) = cluster.prometheus.query(query)
    labels = sample["metric"]
    assert labels["endpoint"] == "v2_infer" and "exported_endpoint" not in labels, labels
    assert {"namespace", "service", "pod", "container", "instance"} <= labels.keys(), labels
    assert not cluster.prometheus.query('{exported_endpoint!=""}')
    up = cluster.prometheus.query(f'up{{component="pool", service="{POOL}"}} == 1')
    assert len(up) == cluster.scaler.rule.min_replicas, up


def test_pool_replicas_follow_pending_tokens_and_new_replicas_serve(cluster: Cluster) -> None:
    scaler, rule = cluster.scaler, cluster.scaler.rule
    assert (LOAD_CLIENTS - 1) * LOAD_ROWS * cluster.tokens > rule.threshold * (rule.max_replicas - 1), (
        "the load step is too small to ask for the local maximum"
    )
    wait_until(lambda: scaler.evaluate() is not None, "the scaling query to return a sample", timeout=20)
    assert_stored_as_the_operator_would(cluster)
    wait_until(lambda: scaler.evaluate() == 0, "the warm-up request to leave the signal", timeout=10)
    initial = {r.index for r in scaler.replicas}
    assert len(initial) == rule.min_replicas

    started = time.monotonic()
    scaler.start(timeout_s=LOAD_BOUND_S + 40)
    load = Load(cluster)
    first_batch: dict[int, float] = {}
    deadline = time.monotonic() + LOAD_BOUND_S
    while time.monotonic() < deadline:
        for replica in list(scaler.replicas):
            if replica.index not in initial and replica.index not in first_batch:
                if batches(replica.server, cluster.entry) > 0:
                    first_batch[replica.index] = time.monotonic() - replica.ready_at
        # The scaler records a step's replica count before it scales, so the count it reached shows
        # only at its next step, which may come after the new replicas' first batches.
        scaled = any(o.replicas == rule.max_replicas for o in scaler.history)
        if len(first_batch) >= rule.max_replicas - rule.min_replicas and scaled:
            break
        time.sleep(0.2)
    peak = max((o.value or 0) for o in scaler.history)
    statuses = load.stop()

    assert max(o.replicas for o in scaler.history) == rule.max_replicas, scaler.history[-5:]
    assert peak >= rule.threshold * (rule.max_replicas - 1), f"peak pending tokens {peak}"
    new = {r.index: r for r in (*scaler.replicas, *scaler.retired) if r.index not in initial}
    assert len(new) == rule.max_replicas - rule.min_replicas
    timeline = [(round(o.at - started, 1), o.value, o.desired, o.replicas) for o in scaler.history]
    ready = {i: round(r.ready_at - started, 1) for i, r in new.items()}
    for index in new:
        assert index in first_batch, (
            f"new replica {index} served no batch during the load step; ready at {ready} s, "
            f"(s, pending tokens, desired, replicas): {timeline}"
        )
        assert first_batch[index] <= FIRST_BATCH_WITHIN_S, (
            f"replica {index} served its first batch {first_batch[index]:.1f} s after becoming ready"
        )

    # The load has stopped: the gateway's pending tokens drain and the scaler returns to the minimum.
    wait_until(lambda: scaler.evaluate() == 0, "pending tokens to fall to zero", timeout=30, interval=0.5)
    wait_until(
        lambda: len(scaler.replicas) == rule.min_replicas,
        "replicas to fall to the minimum",
        timeout=SCALE_DOWN_AFTER_S + 30,
        interval=0.5,
    )
    scaler.stop()
    # Scaling up and down lost nothing: every load request answered 200, and the gateway counted
    # exactly those and the warm-up request.
    assert set(statuses) == {200}, statuses
    answered = scrape_metrics(cluster.gateway.url).value(
        "vitserve_requests_total", endpoint="v2_infer", status="200"
    )
    assert answered == statuses[200] + 1
