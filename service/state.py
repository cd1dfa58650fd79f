"""What a running vitserve process serves: repository entries, their runtimes, costs, batchers and router.

Built once at start-up (lifespan), read by the request handlers through FastAPI dependencies.
Start-up order: read the repository, check the routing against it, load and warm every runtime,
calibrate each entry's cost (service/calibration.py), then size each batcher at its best measured
batch and build the router on the calibrated costs. With `VITSERVE_CALIBRATION_MODE=background` the
server is ready before any measurement: entries start on the calibration file's costs or FLOP
estimates (routes say which in `cost_source`) and batch up to config.pbtxt's max_batch_size; a
background task then measures them one at a time and re-plans each batcher and the router.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from export.repository import ModelEntry, read_repository
from export.shapes import Shape, shape_name
from service.batcher import Batcher, BatcherGroup, RunBatch
from service.calibration import MEASURED, EntryCost, ServedCosts, measure, read_calibration, write_calibration
from service.lifecycle import ModelLifecycle
from service.metrics import Metrics
from service.process_memory import release_freed_memory
from service.router import BackboneRoute, Router, RoutingConfig
from service.runtimes import Runtime, RuntimeUnavailable, load_runtime
from service.runtimes.endpoints import EndpointMetrics, EndpointRegistry
from service.settings import Settings
from service.threads import named_executor

log = logging.getLogger("vitserve.state")
GLOBAL_ATTENTION = ("global",)
T = TypeVar("T")


class StartupError(RuntimeError):
    """The configured repository or routing cannot be served; the message says what to fix."""


@dataclass
class ServingState:
    """Entries by name, the runtime and batcher of each, the router (gateway role) and readiness."""

    settings: Settings
    metrics: Metrics
    entries: dict[str, ModelEntry] = field(default_factory=dict)
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    batchers: BatcherGroup | None = None
    router: Router | None = None
    ready: bool = False
    draining: bool = False
    decode_pools: dict[str, ThreadPoolExecutor] = field(default_factory=dict)
    inference_pools: dict[str, ThreadPoolExecutor] = field(default_factory=dict)
    drain_timed_out: bool = False
    _drain_task: asyncio.Task[None] | None = field(default=None, repr=False)
    endpoints: EndpointRegistry | None = None

    backbones: dict[str, dict[Shape, ModelEntry]] = field(default_factory=dict)
    costs: dict[str, EntryCost] = field(default_factory=dict)
    # How much longer than calibrated served batches run; the router and queue waits use the product.
    served: ServedCosts = field(default_factory=ServedCosts, repr=False)
    lifecycle: ModelLifecycle | None = None
    # The task measuring entries after start-up (VITSERVE_CALIBRATION_MODE=background), else None.
    background_calibration: asyncio.Task[None] | None = field(default=None, repr=False)
    # One measurement at a time (start-up, background, newly polled entries): concurrent ones would
    # share the cores and each measure the other.
    _measuring: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def probe_ready(self) -> bool:
        """What readiness probes report: loaded and not shutting down. Requests are still served
        during the shutdown delay, while `ready` holds (service/server.py)."""
        return self.ready and not self.draining

    def entry_for(self, name: str) -> ModelEntry:
        """The served entry the router chose, by name."""
        try:
            return self.entries[name]
        except KeyError:
            raise RuntimeUnavailable(
                f"the route chose {name}, which is unloaded; load it with "
                f"POST /v2/repository/models/{name}/load (entries: POST /v2/repository/index)"
            ) from None

    def serve_entry(self, entry: ModelEntry) -> None:
        """Serve `entry` (new, or a new version of a served one) from the next request on."""
        self.entries[entry.name] = entry
        self._regroup()

    def withdraw_entry(self, name: str) -> None:
        """Stop giving `name` to new requests (they get 404); accepted ones still finish."""
        self.entries.pop(name)
        self._regroup()

    def _regroup(self) -> None:
        """Group the entries again; a derived routing follows the shapes served (a routing file stays)."""
        self.backbones = group_by_backbone(list(self.entries.values()))
        if self.settings.routing is None:
            self._rebuild_router()

    def _rebuild_router(self) -> None:
        """The router again, on the entries served and their current costs (gateway role only)."""
        if self.router is None:
            return
        try:
            self.router = build_router(
                list(self.entries.values()), self.settings, self.served.corrected(self.costs)
            )
        except StartupError as exc:
            log.warning("routing kept", extra={"reason": str(exc)})

    def batcher(self, entry: ModelEntry) -> Batcher:
        return self.batchers.get(entry.name, entry.bucket)

    async def start(self) -> None:
        """Read the repository, load and warm every runtime, build batchers and the router."""
        settings = self.settings
        wanted = {name for name in settings.models.split(",") if name}
        entries = read_repository(settings.repository)
        if wanted:
            missing = wanted - {e.name for e in entries} - {e.backbone for e in entries}
            if missing:
                raise StartupError(f"--models names {sorted(missing)} are not in {settings.repository}")
            entries = [e for e in entries if e.name in wanted or e.backbone in wanted]
        if not entries:
            raise StartupError(f"model repository {settings.repository} has no entries; run `make export`")
        self.entries = {e.name: e for e in entries}
        self.backbones = group_by_backbone(entries)
        if settings.role == "gateway":
            self.router = build_router(entries, settings)
        threads = settings.threads()
        loop = asyncio.get_running_loop()
        self.endpoints = EndpointRegistry(
            settings.endpoint_concurrency,
            settings.endpoint_refresh_s,
            settings.endpoint_eject_s,
            EndpointMetrics(self.metrics.registry),
        )
        for entry in entries:
            self.metrics.model_ready.labels(entry.name).set(0)
            started = time.perf_counter()
            kind = settings.runtime_for(entry.name, entry.backbone)
            self.runtimes[entry.name] = await loop.run_in_executor(
                None, self.load_runtime, kind, entry, threads
            )
            log.info(
                "loaded", extra={"model": entry.name, "seconds": round(time.perf_counter() - started, 3)}
            )
        if settings.calibration is not None:
            self.costs.update(read_calibration(settings.calibration))
        if settings.calibration_mode == "startup":
            for entry in entries:
                await loop.run_in_executor(None, self.calibrate, entry, self.runtimes[entry.name])
            self._write_calibration()
        if self.router is not None:
            self.router = build_router(entries, settings, self.served.corrected(self.costs))
        self.batchers = BatcherGroup(self.metrics, settings.max_queue_bytes)
        self.lifecycle = ModelLifecycle(self)
        for entry in entries:
            runtime = self.runtimes[entry.name]
            self.add_batcher(entry, self.lifecycle.adopt(entry, runtime), runtime)
        self.ready = True
        self.lifecycle.start_polling()
        if settings.calibration_mode == "background":
            self.background_calibration = loop.create_task(self._calibrate_in_background(entries))

    async def _calibrate_in_background(self, entries: list[ModelEntry]) -> None:
        """Measure the start-up entries one by one after the server is ready; after each, its batcher
        takes the best measured batch and the router the measured cost. Entries unloaded or replaced
        meanwhile are skipped (a polled version is calibrated when it loads); one whose measurement
        fails keeps its estimate, and the failure is logged."""
        loop = asyncio.get_running_loop()
        for entry in entries:
            runtime = self.runtimes.get(entry.name)
            if runtime is None or self.entries.get(entry.name) is not entry:
                continue
            try:
                cost = await loop.run_in_executor(None, self.calibrate, entry, runtime)
            except Exception as exc:
                log.warning("calibration failed", extra={"model": entry.name, "reason": repr(exc)})
                continue
            if cost is None or self.entries.get(entry.name) is not entry:
                continue
            self.batcher(entry).set_batch_limit(self.settings.max_batch_size or self.batch_limit(entry))
            self._rebuild_router()
        self._write_calibration()

    def _write_calibration(self) -> None:
        if self.settings.calibration_out is not None:
            write_calibration(self.settings.calibration_out, self.costs)

    def add_batcher(self, entry: ModelEntry, run_batch: RunBatch, runtime: Runtime) -> Batcher:
        """The entry's batcher, with limits from the settings or else from its config.pbtxt.

        A remote `runtime`'s endpoint budget bounds the batches in flight; it is read from whichever
        runtime serves the entry at the time, since a new version may swap it."""
        settings = self.settings
        concurrency = self._concurrency(entry)
        self._decoder(self.pool_of(entry))
        batcher = self.batchers.add(
            run_batch,
            model=entry.name,
            pool=self.pool_of(entry),
            bucket=entry.bucket,
            input_shape=entry.input_shape,
            max_batch_size=settings.max_batch_size or self.batch_limit(entry),
            max_queue_delay_s=(
                settings.max_queue_delay_ms / 1000
                if settings.max_queue_delay_ms is not None
                else entry.max_queue_delay_us / 1e6
            ),
            max_queue_size=settings.max_queue_size,
            tokens_per_item=max(1, entry.tokens),
            max_batch_tokens=settings.max_batch_tokens,
            max_concurrent_batches=concurrency,
            capacity=self._remote_capacity(entry.name, runtime),
            executor=self._executor(self.pool_of(entry), concurrency),
            on_batch=functools.partial(self._served_batch, entry.name),
        )
        self.metrics.model_ready.labels(entry.name).set(1)
        return batcher

    def load_runtime(self, kind: str, entry: ModelEntry, threads: int) -> Runtime:
        """Load `entry`'s runtime with its pool's shared endpoints and the process's request count
        (idle spinning). Blocking: call it from a worker thread."""
        pool = self.pool_of(entry)
        return load_runtime(
            kind, entry, threads, self.settings, pool, self.endpoints, self.metrics.inflight.count
        )

    def _remote_capacity(self, name: str, runtime: Runtime) -> Callable[[], int] | None:
        if getattr(runtime, "endpoints", None) is None:
            return None
        return lambda: self.runtimes.get(name, runtime).endpoints.capacity()

    def calibrate(self, entry: ModelEntry, runtime: Runtime) -> EntryCost | None:
        """The entry's cost: from the calibration file, else measured on its (warm) local runtime.

        Remote entries without a file entry are left to the router's FLOP estimate (None). Blocking:
        call it from a worker thread."""
        settings = self.settings
        if entry.name in self.costs and self.costs[entry.name].source != MEASURED:
            return self.costs[entry.name]
        if settings.runtime_for(entry.name, entry.backbone) == "triton":
            return None
        with self._measuring:
            self.costs[entry.name] = measure(
                runtime.run, entry.input_shape, entry.max_batch_size, settings.calibration_max_run_s
            )
            release_freed_memory()
        log.info("calibrated", extra={"model": entry.name, "seconds": dict(self.costs[entry.name].seconds)})
        return self.costs[entry.name]

    def batch_limit(self, entry: ModelEntry) -> int:
        """The batch size with the best calibrated throughput, within config.pbtxt's max_batch_size."""
        cost = self.costs.get(entry.name)
        return entry.max_batch_size if cost is None else min(entry.max_batch_size, cost.best_batch)

    def _served_batch(self, name: str, rows: int, seconds: float) -> None:
        """One served batch of `name` corrects its cost (ServedCosts); a correction that moved
        enough rebuilds the router. Called by the batcher on the event loop."""
        cost = self.costs.get(name)
        if cost is not None and self.served.observe(name, cost, rows, seconds):
            self._rebuild_router()

    def pool_waits(self) -> dict[str, float]:
        """Expected seconds before a new request of each pool starts: the served time (calibrated,
        corrected by ServedCosts) of the work queued and running there. Local entries of a pool
        share its cores, so their work adds up."""
        waits: dict[str, float] = defaultdict(float)
        if self.batchers is None:
            return waits
        for batcher in self.batchers:
            cost = self.costs.get(batcher.model)
            items = batcher.pending_tokens // batcher.tokens_per_item
            if cost is not None and items:
                waits[batcher.pool] += (
                    cost.work_seconds(items, batcher.rows)
                    * self.served.factor(batcher.model)
                    / self._concurrency(self.entries[batcher.model])
                )
        return waits

    def unavailable_entries(self) -> list[str]:
        """Remote entries whose pool has no ready endpoint now: the router routes around them."""
        return [
            name
            for name, runtime in self.runtimes.items()
            if (endpoints := getattr(runtime, "endpoints", None)) is not None and not endpoints.ready()
        ]

    def _concurrency(self, entry: ModelEntry) -> int:
        """Remote pools overlap batches up to their endpoints' budget (the batcher asks the runtime's
        `endpoints.capacity()`), below this ceiling; local runtimes run one batch at a time."""
        remote = self.settings.runtime_for(entry.name, entry.backbone) == "triton"
        return self.settings.max_remote_batches if remote else 1

    def _executor(self, pool: str, concurrency: int) -> ThreadPoolExecutor:
        """Batch threads shared per (pool, concurrency): local buckets of a pool take turns on the cores
        instead of splitting them, remote ones share the pool's in-flight budget."""
        key = f"{pool}-{concurrency}"
        if key not in self.inference_pools:
            self.inference_pools[key] = named_executor(concurrency, f"infer-{key}")
        return self.inference_pools[key]

    def _decoder(self, pool: str) -> ThreadPoolExecutor:
        """Decode threads of one pool: huge windowed-route images never hold the global route's threads."""
        if pool not in self.decode_pools:
            self.decode_pools[pool] = named_executor(self.settings.decoders(), f"decode-{pool}")
        return self.decode_pools[pool]

    async def decode(self, pool: str, work: Callable[..., T], *args: object) -> T:
        """Run `work(*args)` on `pool`'s decode threads, counted in vitserve_decoding{pool}."""
        gauge = self.metrics.decoding.labels(pool)
        gauge.inc()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._decoder(pool), work, *args)
        finally:
            gauge.dec()

    def pool_of(self, entry: ModelEntry) -> str:
        """`global` for global-attention backbones, `windowed` for every other attention kind."""
        if self.router is not None and entry.backbone in self.router.pools:
            return self.router.pools[entry.backbone]
        return "global" if entry.attention == GLOBAL_ATTENTION else "windowed"

    async def drain(self) -> None:
        """Stop taking work and finish what is queued and running within `drain_timeout_s`.

        When the timeout runs out every request still unanswered is answered 503 at once (running
        batches keep their threads, their results are dropped) and `drain_timed_out` is set, which
        makes the process exit with `service.server.DRAIN_TIMED_OUT`. Safe to call more than once.
        """
        self.ready = False
        self.draining = True
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain_once())
        await self._drain_task

    async def _drain_once(self) -> None:
        if self.background_calibration is not None:
            self.background_calibration.cancel()
            await asyncio.gather(self.background_calibration, return_exceptions=True)
        if self.lifecycle is not None:
            await self.lifecycle.stop_polling()
        if self.batchers is None:
            return
        try:
            await asyncio.wait_for(self.batchers.close(drain=True), self.settings.drain_timeout_s)
        except TimeoutError:
            self.drain_timed_out = True
            log.warning("drain timed out", extra={"seconds": self.settings.drain_timeout_s})
            self.batchers.abort(
                f"the server is shutting down and its {self.settings.drain_timeout_s} s drain ran out "
                "before this request finished; retry on another replica"
            )

    async def stop(self) -> None:
        """Drain, then release the endpoints and the threads."""
        await self.drain()
        if self.endpoints is not None:
            self.endpoints.close()
        for executor in (*self.decode_pools.values(), *self.inference_pools.values()):
            executor.shutdown(wait=False, cancel_futures=True)
        for entry in self.entries.values():
            self.metrics.model_ready.labels(entry.name).set(0)


def group_by_backbone(entries: list[ModelEntry]) -> dict[str, dict[Shape, ModelEntry]]:
    """backbone -> shape -> entry, shapes in ascending order of pixels."""
    grouped: dict[str, dict[Shape, ModelEntry]] = defaultdict(dict)
    for entry in sorted(entries, key=lambda e: (e.backbone, e.shape[0] * e.shape[1], e.shape)):
        grouped[entry.backbone][entry.shape] = entry
    return dict(grouped)


def build_router(
    entries: list[ModelEntry], settings: Settings, costs: dict[str, EntryCost] | None = None
) -> Router:
    """The routing file when given, else one derived from the repository's two backbones."""
    configs = {e.backbone: e.config for e in entries}
    if settings.routing is not None:
        routing = RoutingConfig.from_yaml(settings.routing)
    else:
        routing = derive_routing(entries)
    served = group_by_backbone(entries)
    for backbone in routing.backbones().values():
        missing = set(backbone.shapes) - set(served.get(backbone.model, {}))
        if missing:
            raise StartupError(
                f"routing names {backbone.model} buckets {sorted(shape_name(s) for s in missing)} that the "
                f"repository {settings.repository} does not hold; export them or fix the routing file"
            )
    return Router(
        routing,
        model_configs=configs,
        entries={(e.backbone, e.shape): e.name for e in entries},
        costs=costs,
        policy=settings.routing_policy,
        target_latency_ms=settings.target_latency_ms,
    )


def derive_routing(entries: list[ModelEntry]) -> RoutingConfig:
    """Pair the repository's global-attention backbone with its windowed one."""
    by_backbone = {name: list(buckets.values()) for name, buckets in group_by_backbone(entries).items()}
    pools: dict[str, list[str]] = {"global": [], "windowed": []}
    for backbone, items in by_backbone.items():
        pools["global" if items[0].attention == GLOBAL_ATTENTION else "windowed"].append(backbone)
    if len(pools["global"]) != 1 or len(pools["windowed"]) != 1:
        raise StartupError(
            f"cannot derive routing: the repository has global backbones {pools['global']} and windowed "
            f"backbones {pools['windowed']}; the gateway needs one of each or a routing file (VITSERVE_ROUTING)"
        )

    def route(pool: str) -> BackboneRoute:
        items = by_backbone[pools[pool][0]]
        return BackboneRoute(
            model=items[0].backbone, config=items[0].arch, buckets=tuple(e.shape for e in items)
        )

    return RoutingConfig(global_backbone=route("global"), windowed_backbone=route("windowed"))
