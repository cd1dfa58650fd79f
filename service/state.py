"""What a running vitserve process serves: repository entries, their runtimes, batchers and router.

Built once at start-up (lifespan), read by the request handlers through FastAPI dependencies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from export.repository import ModelEntry, read_repository
from service.batcher import Batcher, BatcherGroup, RunBatch
from service.lifecycle import ModelLifecycle
from service.metrics import Metrics
from service.router import BackboneRoute, Router, RoutingConfig
from service.runtimes import Runtime, RuntimeUnavailable, load_runtime
from service.runtimes.endpoints import EndpointMetrics, EndpointRegistry
from service.settings import Settings

log = logging.getLogger("vitserve.state")
GLOBAL_ATTENTION = ("global",)


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
    cpu_pool: ThreadPoolExecutor | None = None
    inference_pools: dict[str, ThreadPoolExecutor] = field(default_factory=dict)
    endpoints: EndpointRegistry | None = None

    backbones: dict[str, dict[int, ModelEntry]] = field(default_factory=dict)
    lifecycle: ModelLifecycle | None = None

    def entry_for(self, backbone: str, bucket: int) -> ModelEntry:
        try:
            return self.backbones[backbone][bucket]
        except KeyError:
            raise RuntimeUnavailable(
                f"the route chose {backbone} at {bucket} px, whose entry is unloaded; load it with "
                f"POST /v2/repository/models/{{entry}}/load (entries: POST /v2/repository/index)"
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
        """Group the entries again; a derived routing follows the buckets served (a routing file stays)."""
        self.backbones = group_by_backbone(list(self.entries.values()))
        if self.router is None or self.settings.routing is not None:
            return
        try:
            self.router = build_router(list(self.entries.values()), self.settings)
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
        self.cpu_pool = ThreadPoolExecutor(settings.threads(), thread_name_prefix="preprocess")
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
                None, load_runtime, kind, entry, threads, settings, self.pool_of(entry), self.endpoints
            )
            log.info(
                "loaded", extra={"model": entry.name, "seconds": round(time.perf_counter() - started, 3)}
            )
        self.batchers = BatcherGroup(self.metrics)
        self.lifecycle = ModelLifecycle(self)
        for entry in entries:
            runtime = self.runtimes[entry.name]
            self.add_batcher(entry, self.lifecycle.adopt(entry, runtime), runtime)
        self.ready = True
        self.lifecycle.start_polling()

    def add_batcher(self, entry: ModelEntry, run_batch: RunBatch, runtime: Runtime) -> Batcher:
        """The entry's batcher, with limits from the settings or else from its config.pbtxt.

        A remote `runtime`'s endpoint budget bounds the batches in flight; it is read from whichever
        runtime serves the entry at the time, since a new version may swap it."""
        settings = self.settings
        concurrency = self._concurrency(entry)
        batcher = self.batchers.add(
            run_batch,
            model=entry.name,
            pool=self.pool_of(entry),
            bucket=entry.bucket,
            input_shape=entry.input_shape,
            max_batch_size=settings.max_batch_size or entry.max_batch_size,
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
        )
        self.metrics.model_ready.labels(entry.name).set(1)
        return batcher

    def _remote_capacity(self, name: str, runtime: Runtime) -> Callable[[], int] | None:
        if getattr(runtime, "endpoints", None) is None:
            return None
        return lambda: self.runtimes.get(name, runtime).endpoints.capacity()

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
            self.inference_pools[key] = ThreadPoolExecutor(concurrency, thread_name_prefix=f"infer-{key}")
        return self.inference_pools[key]

    def pool_of(self, entry: ModelEntry) -> str:
        """`global` for global-attention backbones, `windowed` for every other attention kind."""
        if self.router is not None and entry.backbone in self.router.pools:
            return self.router.pools[entry.backbone]
        return "global" if entry.attention == GLOBAL_ATTENTION else "windowed"

    async def stop(self) -> None:
        """Stop taking work, finish what is queued and running, release the threads."""
        self.ready = False
        self.draining = True
        if self.lifecycle is not None:
            await self.lifecycle.stop_polling()
        if self.batchers is not None:
            try:
                await asyncio.wait_for(self.batchers.close(drain=True), self.settings.drain_timeout_s)
            except TimeoutError:
                log.warning("drain timed out", extra={"seconds": self.settings.drain_timeout_s})
        if self.endpoints is not None:
            self.endpoints.close()
        for executor in (self.cpu_pool, *self.inference_pools.values()):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        for entry in self.entries.values():
            self.metrics.model_ready.labels(entry.name).set(0)


def group_by_backbone(entries: list[ModelEntry]) -> dict[str, dict[int, ModelEntry]]:
    """backbone -> bucket -> entry, buckets in ascending order."""
    grouped: dict[str, dict[int, ModelEntry]] = defaultdict(dict)
    for entry in sorted(entries, key=lambda e: (e.backbone, e.bucket)):
        grouped[entry.backbone][entry.bucket] = entry
    return dict(grouped)


def build_router(entries: list[ModelEntry], settings: Settings) -> Router:
    """The routing file when given, else one derived from the repository's two backbones."""
    configs = {e.backbone: e.config for e in entries}
    if settings.routing is not None:
        routing = RoutingConfig.from_yaml(settings.routing)
    else:
        routing = derive_routing(entries)
    served = group_by_backbone(entries)
    for backbone in routing.backbones().values():
        missing = set(backbone.buckets) - set(served.get(backbone.model, {}))
        if missing:
            raise StartupError(
                f"routing names {backbone.model} buckets {sorted(missing)} that the repository "
                f"{settings.repository} does not hold; export them or fix the routing file"
            )
    return Router(routing, model_configs=configs)


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
            model=items[0].backbone, config=items[0].arch, buckets=tuple(e.bucket for e in items)
        )

    return RoutingConfig(global_backbone=route("global"), windowed_backbone=route("windowed"))
