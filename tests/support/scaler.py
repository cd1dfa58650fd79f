"""A test stand-in for KEDA plus the endpoints controller: it scales a pool of local processes.

Every `poll_s` it evaluates a ScaledObject's own Prometheus query against a real Prometheus and
applies KEDA's rule for a Prometheus trigger (an AverageValue target): desired replicas =
ceil(value / threshold), within minReplicaCount and maxReplicaCount. A result with no sample is an
error, as with `ignoreNullValues: "false"`, and leaves the replicas as they are.

Scaling up starts pool processes on fresh loopback addresses (127.0.0.N, one per "pod") and, once
each answers ready, publishes it where the gateway and Prometheus find pods in a cluster: the
gateway's `file://` endpoint list (one URL per line) and Prometheus' file_sd target list. Scaling
down is delayed by `scale_down_after_s` (the HPA's stabilization window, shortened to fit a test),
unpublishes the newest replicas first, waits for the gateway to re-read its list, then stops them
with SIGTERM. Every wait is bounded.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from support.prometheus import Prometheus, Target, write_targets
from support.server import ServerProcess, write_endpoints


@dataclass(frozen=True)
class ScaleRule:
    """What a KEDA ScaledObject with one Prometheus trigger scales on."""

    name: str
    query: str
    threshold: float
    min_replicas: int
    max_replicas: int

    @classmethod
    def from_scaled_object(cls, scaled_object: dict) -> ScaleRule:
        spec = scaled_object["spec"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus", trigger
        return cls(
            name=spec["scaleTargetRef"]["name"],
            query=trigger["metadata"]["query"],
            threshold=float(trigger["metadata"]["threshold"]),
            min_replicas=int(spec["minReplicaCount"]),
            max_replicas=int(spec["maxReplicaCount"]),
        )

    def replicas(self, value: float) -> int:
        return min(self.max_replicas, max(self.min_replicas, math.ceil(value / self.threshold)))


@dataclass
class Replica:
    """One pool process standing for a pod: its address, and when it became ready and was published."""

    index: int
    server: ServerProcess
    ready_at: float
    target: Target


@dataclass(frozen=True)
class Observation:
    """One controller evaluation."""

    at: float
    value: float | None
    desired: int
    replicas: int


@dataclass
class PoolScaler:
    """Scales `rule.name`'s replicas; `start_replica(host)` starts one pool process bound to `host`."""

    rule: ScaleRule
    prometheus: Prometheus
    start_replica: Callable[[str, int], ServerProcess]
    target_for: Callable[[ServerProcess, int], Target]
    endpoints_file: Path
    targets_file: Path
    gateway_refresh_s: float
    poll_s: float = 1.0
    scale_down_after_s: float = 3.0
    replicas: list[Replica] = field(default_factory=list)
    retired: list[Replica] = field(default_factory=list)
    history: list[Observation] = field(default_factory=list)
    _next_index: int = 0
    _below_since: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def scale_to(self, count: int) -> None:
        """Start or stop replicas until `count` run, published once ready."""
        if count > len(self.replicas):
            self._add(count - len(self.replicas))
        elif count < len(self.replicas):
            self._remove(len(self.replicas) - count)

    def evaluate(self) -> float | None:
        """The query's value now, or None when it has no sample (KEDA's error with ignoreNullValues false)."""
        result = self.prometheus.query(self.rule.query)
        return float(result[0]["value"][1]) if result else None

    def step(self) -> None:
        value = self.evaluate()
        current = len(self.replicas)
        desired = current if value is None else self.rule.replicas(value)
        self.history.append(Observation(time.monotonic(), value, desired, current))
        if desired > current:
            self._below_since = None
            self.scale_to(desired)
        elif desired < current:
            self._below_since = self._below_since or time.monotonic()
            if time.monotonic() - self._below_since >= self.scale_down_after_s:
                self._below_since = None
                self.scale_to(desired)
        else:
            self._below_since = None

    def start(self, timeout_s: float) -> None:
        """Run `step` every `poll_s` in a thread until `stop` or `timeout_s`."""
        deadline = time.monotonic() + timeout_s

        def loop() -> None:
            while not self._stop.is_set() and time.monotonic() < deadline:
                self.step()
                self._stop.wait(self.poll_s)

        self._thread = threading.Thread(target=loop, name=f"scaler-{self.rule.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(120)
            assert not self._thread.is_alive(), "the scaler loop did not stop"

    def close(self) -> None:
        """Stop the loop and every replica."""
        self.stop()
        for replica in self.replicas:
            replica.server.stop()
        self.retired.extend(self.replicas)
        self.replicas = []

    def _add(self, count: int) -> None:
        """Start `count` replicas at once; each is published as soon as it is ready."""
        indexes = range(self._next_index, self._next_index + count)
        self._next_index += count
        with ThreadPoolExecutor(count) as pool:
            futures = {pool.submit(self.start_replica, f"127.0.0.{3 + i}", i): i for i in indexes}
            for future in as_completed(futures):
                server, index = future.result(), futures[future]
                self.replicas.append(Replica(index, server, time.monotonic(), self.target_for(server, index)))
                self._publish()

    def _remove(self, count: int) -> None:
        leaving, self.replicas = self.replicas[-count:], self.replicas[:-count]
        self._publish()
        # The gateway re-reads its list every refresh; batches already sent there still finish.
        time.sleep(self.gateway_refresh_s * 2)
        for replica in leaving:
            replica.server.stop()
        self.retired.extend(leaving)

    def _publish(self) -> None:
        write_endpoints(self.endpoints_file, [r.server for r in self.replicas])
        write_targets(self.targets_file, [r.target for r in self.replicas])
