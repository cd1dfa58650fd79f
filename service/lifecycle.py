"""Model lifecycle: versions swapped in while traffic flows, repository polling, Triton's repository API.

A repository entry holds versions `<entry>/<n>/`; the service serves the highest one it could load and
verify. A new version is loaded beside the serving one, checked with a smoke inference, and only then
swapped in: each entry's batcher calls its `RuntimeSlot`, which points the next batch at the new
runtime at once and releases the old one when the last batch started on it returns, so no request
fails and no session lingers. A version that does not load or verify is refused (HTTP 400, a log line,
`vitserve_model_loads_total{outcome="refused"}`) and the serving version keeps serving.

Loads and unloads come from `POST /v2/repository/models/{name}/load|unload` (as Triton's model-control
API), or from the poller (`VITSERVE_POLL_S`), which loads new versions and entries and unloads entries
whose directory is gone; an entry unloaded through the API stays unloaded until loaded through it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import Counter, Gauge

from export.errors import ExportError
from export.repository import ModelEntry, read_entry
from service.errors import APIError
from service.metrics import PREFIX
from service.runtimes import Runtime, RuntimeUnavailable

if TYPE_CHECKING:
    from service.state import ServingState

log = logging.getLogger("vitserve.lifecycle")
# How often an unload checks whether the entry's queued and running requests have finished.
DRAIN_CHECK_S = 0.01


@dataclass(eq=False)
class _Loaded:
    """One loaded runtime and the batches running on it."""

    runtime: Runtime
    running: int = 0
    retired: bool = False


class RuntimeSlot:
    """The runtime behind one entry's batcher, replaceable while batches run (called from batch threads)."""

    def __init__(self, name: str, runtime: Runtime, on_release: Callable[[str, Runtime], None]) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._current: _Loaded | None = _Loaded(runtime)
        self._on_release = on_release

    def run(self, batch: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
        """Run on the current runtime, counted so that a swap releases it only after this returns."""
        with self._lock:
            loaded = self._current
            if loaded is None:
                raise RuntimeUnavailable(
                    f"model {self.name} is unloaded; load it with POST /v2/repository/models/{self.name}/load"
                )
            loaded.running += 1
        try:
            return loaded.runtime.run(batch, deadline)
        finally:
            with self._lock:
                loaded.running -= 1
                release = loaded.retired and loaded.running == 0
            if release:
                self._on_release(self.name, loaded.runtime)

    def swap(self, runtime: Runtime | None) -> None:
        """Serve `runtime` from the next batch on (None: serve nothing); release the old one once idle."""
        with self._lock:
            old, self._current = self._current, (None if runtime is None else _Loaded(runtime))
            if old is None:
                return
            old.retired = True
            release = old.running == 0
        if release:
            self._on_release(self.name, old.runtime)


@dataclass(frozen=True)
class DiskVersion:
    """The highest version directory of an entry and when its files last changed (a rewrite retries)."""

    version: int | None
    changed_ns: int

    @classmethod
    def of(cls, path: Path) -> DiskVersion:
        versions = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
        if not versions:
            return cls(None, path.stat().st_mtime_ns)
        newest = path / str(versions[-1])
        stamps = [newest.stat().st_mtime_ns, *(p.stat().st_mtime_ns for p in newest.iterdir())]
        return cls(versions[-1], max(stamps))


@dataclass
class ModelLifecycle:
    """Loads, verifies, swaps and unloads the entries of one `ServingState`; one change at a time."""

    state: ServingState
    slots: dict[str, RuntimeSlot] = field(default_factory=dict)
    refused: dict[str, tuple[DiskVersion, str]] = field(default_factory=dict)
    unloaded: set[str] = field(default_factory=set)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _poller: asyncio.Task[None] | None = None
    _missing: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        registry = self.state.metrics.registry
        self._loads = Counter(
            f"{PREFIX}_model_loads_total",
            "Model version loads by outcome: loaded (verified and swapped in) or refused.",
            ("model", "outcome"),
            registry=registry,
        )
        self._releases = Counter(
            f"{PREFIX}_model_releases_total",
            "Runtimes released after their last in-flight batch (replaced or unloaded).",
            ("model",),
            registry=registry,
        )
        self._version = Gauge(
            f"{PREFIX}_model_version", "The version each loaded model serves.", ("model",), registry=registry
        )

    @property
    def repository(self) -> Path:
        return Path(self.state.settings.repository)

    def adopt(self, entry: ModelEntry, runtime: Runtime) -> Callable[..., dict[str, np.ndarray]]:
        """Put a runtime loaded at start-up in its slot; returns the batch function for its batcher."""
        slot = self.slots[entry.name] = RuntimeSlot(entry.name, runtime, self._released)
        self._version.labels(entry.name).set(entry.version)
        return slot.run

    def _released(self, name: str, runtime: Runtime) -> None:
        close = getattr(runtime, "close", None)
        if close is not None:
            close()
        self._releases.labels(name).inc()
        log.info("released", extra={"model": name, "version": runtime.entry.version})

    async def load(self, name: str) -> ModelEntry:
        """Load the entry's highest version, verify it and swap it in; APIError 404/400 when it cannot."""
        async with self._lock:
            entry = await self._load(name)
            self.unloaded.discard(name)
            return entry

    async def _load(self, name: str) -> ModelEntry:
        path = self.repository / name
        if name.startswith(".") or not path.is_dir():
            raise APIError(
                404,
                "model_not_found",
                f"the repository {self.repository} has no entry {name!r}; export it first",
            )
        disk = DiskVersion.of(path)
        served = self.state.entries.get(name)
        if served is not None and served.version == disk.version:
            return served
        try:
            entry = read_entry(path)
            self._check_compatible(served, entry)
            runtime = await asyncio.get_running_loop().run_in_executor(None, self._load_runtime, entry)
        except Exception as exc:
            raise self._refuse(name, disk, exc) from exc
        self.refused.pop(name, None)
        self._swap_in(entry, runtime)
        self._loads.labels(name, "loaded").inc()
        self._version.labels(name).set(entry.version)
        log.warning("loaded version", extra={"model": name, "version": entry.version})
        return entry

    def _check_compatible(self, served: ModelEntry | None, entry: ModelEntry) -> None:
        """A new version keeps what the batcher and router were built for: backbone, bucket, input."""
        if served is None:
            return
        for what in ("backbone", "bucket", "input_name", "input_shape"):
            old, new = getattr(served, what), getattr(entry, what)
            if old != new:
                raise ValueError(
                    f"version {entry.version} changes {what} from {old} to {new}; a new version must keep "
                    f"them, so export a changed model as a new entry"
                )

    def _load_runtime(self, entry: ModelEntry) -> Runtime:
        """Executor side: load the runtime and check one smoke inference's outputs."""
        settings = self.state.settings
        kind = settings.runtime_for(entry.name, entry.backbone)
        runtime = self.state.load_runtime(kind, entry, settings.threads())
        outputs = runtime.run(np.zeros((1, *entry.input_shape), np.float32))
        config = entry.config
        expected = {"logits": config.num_classes or config.num_features, "embedding": config.num_features}
        for role, width in expected.items():
            value = np.asarray(outputs.get(role))
            if value.shape != (1, width) or not np.isfinite(value).all():
                raise ValueError(
                    f"smoke inference gave {role} of shape {value.shape}"
                    f"{'' if np.isfinite(value).all() else ' with non-finite values'}, expected (1, {width})"
                )
        self.state.calibrate(entry, runtime)
        return runtime

    def _refuse(self, name: str, disk: DiskVersion, exc: Exception) -> APIError:
        reason = str(exc) if isinstance(exc, ExportError | ValueError) else f"{type(exc).__name__}: {exc}"
        served = self.state.entries.get(name)
        keeps = f"; version {served.version} keeps serving" if served is not None else ""
        message = f"refused version {disk.version} of {name}: {reason}{keeps}"
        self.refused[name] = (disk, message)
        self._loads.labels(name, "refused").inc()
        log.warning("refused version", extra={"model": name, "version": disk.version, "reason": reason})
        return APIError(400, "model_load_failed", message)

    def _swap_in(self, entry: ModelEntry, runtime: Runtime) -> None:
        state = self.state
        slot = self.slots.get(entry.name)
        if slot is None:
            slot = self.slots[entry.name] = RuntimeSlot(entry.name, runtime, self._released)
            state.add_batcher(entry, slot.run, runtime)
        else:
            slot.swap(runtime)
        state.runtimes[entry.name] = runtime
        state.serve_entry(entry)
        state.metrics.model_ready.labels(entry.name).set(1)

    async def unload(self, name: str) -> None:
        """Stop routing to the entry (404 from now), let its accepted requests finish, release it."""
        async with self._lock:
            await self._unload(name)
            self.unloaded.add(name)

    async def _unload(self, name: str) -> None:
        state = self.state
        entry = state.entries.get(name)
        if entry is None:
            raise APIError(
                404, "model_not_found", f"model {name!r} is not loaded; loaded: {sorted(state.entries)}"
            )
        state.withdraw_entry(name)
        state.runtimes.pop(name, None)
        state.metrics.model_ready.labels(name).set(0)
        self._version.remove(name)
        batcher = state.batcher(entry)
        deadline = time.monotonic() + state.settings.drain_timeout_s
        while batcher.pending_tokens and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_CHECK_S)
        self.slots[name].swap(None)
        log.warning("unloaded", extra={"model": name, "version": entry.version})

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every entry on disk (and served), with its state and reason.

        A refusal is listed while the refused version is still the newest on disk.
        """
        names = {p.name for p in self.repository.iterdir() if p.is_dir() and not p.name.startswith(".")}
        rows = []
        for name in sorted(names | set(self.state.entries)):
            served = self.state.entries.get(name)
            if served is not None:
                rows.append({"name": name, "version": str(served.version), "state": "READY", "reason": ""})
            disk = DiskVersion.of(self.repository / name) if name in names else None
            refused = self.refused.get(name)
            if refused is not None and refused[0] == disk:
                rows.append(_unavailable(name, disk.version, refused[1]))
            elif served is None and disk is not None:
                reason = "unloaded" if name in self.unloaded else "not loaded"
                rows.append(_unavailable(name, disk.version, reason))
        return [row for row in rows if row["state"] == "READY" or not ready_only]

    async def poll_once(self) -> None:
        """Load what changed on disk, unload what disappeared; refusals are logged, not raised.

        An entry is unloaded when two scans in a row miss it: `publish` replaces an entry with two
        renames, and a scan between them must not take a re-exported entry out of service.
        """
        async with self._lock:
            names = {p.name for p in self.repository.iterdir() if p.is_dir() and not p.name.startswith(".")}
            missing = set(self.state.entries) - names
            for name in sorted(missing & self._missing):
                await self._unload(name)
            self._missing = missing
            for name in sorted(names - self.unloaded):
                if not self._wanted(name) or self._unchanged(name):
                    continue
                try:
                    await self._load(name)
                except APIError:
                    continue

    def _wanted(self, name: str) -> bool:
        """Served already, or allowed by VITSERVE_MODELS (entry or backbone names; empty allows all)."""
        wanted = {n for n in self.state.settings.models.split(",") if n}
        if name in self.state.entries or not wanted or name in wanted:
            return True
        try:
            return read_entry(self.repository / name).backbone in wanted
        except ExportError:
            return False

    def _unchanged(self, name: str) -> bool:
        disk = DiskVersion.of(self.repository / name)
        served = self.state.entries.get(name)
        refused = self.refused.get(name)
        return (served is not None and served.version == disk.version) or (
            refused is not None and refused[0] == disk
        )

    def start_polling(self) -> None:
        interval = self.state.settings.poll_s
        if interval > 0 and math.isfinite(interval):
            self._poller = asyncio.get_running_loop().create_task(self._poll(interval))

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll_once()
            except OSError as exc:
                log.warning("repository poll failed", extra={"reason": str(exc)})

    async def stop_polling(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None


def _unavailable(name: str, version: int | None, reason: str) -> dict[str, str]:
    return {
        "name": name,
        "version": "" if version is None else str(version),
        "state": "UNAVAILABLE",
        "reason": reason,
    }
