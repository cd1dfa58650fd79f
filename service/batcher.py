"""Dynamic batching: one asyncio queue per (model, bucket) feeding a blocking batch function in threads.

Throughput over HTTP has to stay within 10% of raw ONNX Runtime at its best batch size, so the
batcher is built to cost almost nothing per request:

- Zero extra copies. Each batcher reuses up to `max_concurrent_batches + 1` batch buffers of shape
  (rows, 3, H, W). A request's preprocessed float32 image is copied exactly once, into its row, and
  `run_batch` receives the first n rows as one contiguous array. Only arrays are accepted, not fill
  callbacks: preprocessing runs per request, concurrently, in the caller's thread pool before
  submission; deferring it into batch formation would serialize every image of a batch in one thread.
- Double buffering. While a batch runs, the next full batch is copied into the spare buffer in
  `fill_executor`, so the copies overlap inference. When a run slot is free the copy happens in the
  same executor job as `run_batch`, one thread hop per batch.
- The event loop only moves references. No copy, compute or per-pixel work runs on it; gauges are
  read at scrape time (see `service.metrics`), histograms are observed once per request or batch.

A batch takes up to `rows = min(max_batch_size, max_batch_tokens // tokens_per_item)` requests (at
least one), and waits at most `max_queue_delay_s` after its oldest request arrived; while every run
slot is busy it keeps growing instead, since it could not start earlier anyway. One exception keeps
concurrency 1 at raw-inference latency: a request that finds the batcher idle right after a batch of
one starts at once, as nobody is likely to join it and waiting would add the whole delay to every
request. Requests whose deadline passes or whose caller is cancelled before their batch starts are
never computed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.metrics import Metrics

log = logging.getLogger(__name__)

# run_batch(batch, deadline): `deadline` is the latest time.monotonic() deadline among the batch's
# requests (None when one has none): remote runtimes pass it on as the protocol's timeout, and a short
# budget never fails co-batched long ones (rows already expired were dropped before the batch formed).
RunBatch = Callable[[np.ndarray, float | None], Mapping[str, np.ndarray]]
Result = dict[str, np.ndarray]
# Weight of the newest batch in the moving average behind Retry-After estimates.
LATENCY_SMOOTHING = 0.2
# Retry-After before any batch has finished, when there is no latency to estimate from.
UNMEASURED_RETRY_AFTER_S = 1.0


class BatcherError(Exception):
    """Base of the errors a submission can raise; the HTTP layer maps each to a status code."""


class QueueFull(BatcherError):
    """The queue is at max_queue_size (HTTP 429); retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(BatcherError):
    """The request's deadline passed before its batch started; it was not computed (HTTP 504)."""


class ShuttingDown(BatcherError):
    """The batcher is closing and accepts no new work (HTTP 503)."""


class BatchError(BatcherError):
    """`run_batch` failed for the request's batch; the cause is chained as `__cause__` (HTTP 500)."""


class _Phase(enum.Enum):
    QUEUED = enum.auto()  # waiting in the deque, counted in _queued
    STAGED = enum.auto()  # taken into the spare buffer, waiting for a run slot
    RUNNING = enum.auto()  # handed to run_batch; deadlines no longer apply
    DROPPED = enum.auto()  # cancelled or expired while queued, skipped when the deque is read


@dataclass(slots=True, eq=False)
class _Request:
    pixels: np.ndarray
    future: asyncio.Future[Result]
    enqueued_at: float
    deadline: float | None
    alone: bool  # arrived to an idle batcher: nothing queued, staged or running
    phase: _Phase = _Phase.QUEUED
    timer: asyncio.TimerHandle | None = None


def _fill_rows(buffer: np.ndarray, pixels: list[np.ndarray]) -> None:
    """The one copy of each request's image, into its row of the batch buffer."""
    for row, image in enumerate(pixels):
        np.copyto(buffer[row], image)


class Batcher:
    """Batches requests for one (model, bucket) and runs them with a blocking `run_batch` in threads.

    `run_batch(batch)` gets a float32 (n, *input_shape) view of a reused buffer and returns outputs
    whose first dimension is n; it must not keep the view or return arrays aliasing it. Each
    submission receives its own row of every output.

    Settings: `input_shape` defaults to (3, bucket, bucket). `max_queue_size` bounds the requests
    waiting in the queue (a staged or running batch is not counted). `tokens_per_item` is the token
    count of one image of this bucket; it weighs pending_tokens and, with `max_batch_tokens`, caps
    the rows of a batch. `max_concurrent_batches` batches may run at once (default 1, so ONNX
    Runtime's intra-op threads own the cores), or fewer when `capacity()` says so (a remote pool's
    endpoint budget, which grows and shrinks with its replicas). `executor` runs `run_batch` (default: a private pool
    of `max_concurrent_batches` threads, shut down by `close`); share one across batchers to bound
    the batches running in a pool. `fill_executor` copies staged batches (default: the loop's).
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        model: str,
        pool: str,
        bucket: int,
        input_shape: tuple[int, int, int] | None = None,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.002,
        max_queue_size: int = 256,
        tokens_per_item: int = 1,
        max_batch_tokens: int | None = None,
        max_concurrent_batches: int = 1,
        capacity: Callable[[], int] | None = None,
        metrics: Metrics | None = None,
        executor: Executor | None = None,
        fill_executor: Executor | None = None,
    ) -> None:
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("max_queue_size", max_queue_size),
            ("tokens_per_item", tokens_per_item),
            ("max_concurrent_batches", max_concurrent_batches),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1 for batcher {model!r}/{bucket}, got {value}")
        if max_queue_delay_s < 0:
            raise ValueError(
                f"max_queue_delay_s must be >= 0 for batcher {model!r}/{bucket}, got {max_queue_delay_s}"
            )
        self._run_batch = run_batch
        self._model, self._pool, self.bucket = model, pool, bucket
        self.input_shape = tuple(input_shape or (3, bucket, bucket))
        self.tokens_per_item = tokens_per_item
        # The token budget is a row cap: every request of a bucket has the same token count. A single
        # request over budget still runs alone, or it could never be served.
        token_rows = (
            max_batch_size if max_batch_tokens is None else max(1, max_batch_tokens // tokens_per_item)
        )
        self.rows = min(max_batch_size, token_rows)
        self._max_delay = max_queue_delay_s
        self._max_queue_size = max_queue_size
        self._max_concurrent = max_concurrent_batches
        self._capacity = capacity
        self._metrics = metrics
        self._own_executor = None
        if executor is None:
            executor = self._own_executor = ThreadPoolExecutor(
                max_concurrent_batches, thread_name_prefix=f"batch-{model}-{bucket}"
            )
        self._executor = executor
        self._fill_executor = fill_executor
        # Buffers are made on first use and reused, so a high remote ceiling costs nothing until used.
        self._buffers: list[np.ndarray] = []
        self._queue: deque[_Request] = deque()
        self._queued = 0
        self._staged = 0
        self._running_items = 0
        self._running_batches = 0
        self._batch_seconds: float | None = None
        self._last_batch_size = 1
        self._closing = False
        self._aborting = False
        self._wake: asyncio.Future[None] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        if metrics is not None:
            self._observe_queue = metrics.queue_duration.labels(model).observe
            self._observe_inference = metrics.inference_duration.labels(model).observe
            self._observe_batch = metrics.batch_size.labels(model).observe
            metrics.track_queue(self)

    @property
    def model(self) -> str:
        return self._model

    @property
    def pool(self) -> str:
        return self._pool

    @property
    def queue_depth(self) -> int:
        """Requests accepted but not yet running (queued or staged in the spare buffer)."""
        return self._queued + self._staged

    @property
    def pending_tokens(self) -> int:
        """Tokens of every accepted request not yet answered: the autoscaling signal."""
        return (self._queued + self._staged + self._running_items) * self.tokens_per_item

    async def submit(self, pixels: np.ndarray, deadline: float | None = None) -> Result:
        """Run one preprocessed float32 image of `input_shape` in a batch; its row of each output.

        `deadline` is a `time.monotonic()` instant. Raises QueueFull, DeadlineExceeded, ShuttingDown
        or BatchError. Cancelling the awaiting task withdraws the request if its batch has not started.
        `pixels` must stay unmodified until this returns.
        """
        if self._closing:
            raise ShuttingDown(
                f"batcher {self._model!r}/{self.bucket} is shutting down; send the request elsewhere"
            )
        if pixels.shape != self.input_shape or pixels.dtype != np.float32:
            raise ValueError(
                f"batcher {self._model!r}/{self.bucket} takes float32 images of shape {self.input_shape}, "
                f"got {pixels.dtype} {pixels.shape}; preprocess to the bucket first"
            )
        if self._queued >= self._max_queue_size:
            retry = self._retry_after()
            raise QueueFull(
                f"queue of {self._model!r}/{self.bucket} is full ({self._max_queue_size} requests); "
                f"retry in {retry:.3f} s",
                retry,
            )
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"deadline passed {now - deadline:.3f} s before the request was queued")
        loop = self._ensure_started()
        alone = not (self._queued or self._staged or self._running_batches)
        request = _Request(pixels, loop.create_future(), now, deadline, alone)
        if deadline is not None:
            request.timer = loop.call_later(deadline - now, self._expire, request)
        self._queue.append(request)
        self._queued += 1
        if self._queued == 1 or self._queued == self.rows:
            self._notify()
        try:
            return await request.future
        except asyncio.CancelledError:
            if request.phase is _Phase.QUEUED:
                request.phase = _Phase.DROPPED
                self._queued -= 1
            raise
        finally:
            if request.timer is not None:
                request.timer.cancel()

    async def close(self, drain: bool = True) -> None:
        """Stop accepting work; with `drain` finish queued and running requests, else fail the queued ones.

        Returns when no batch is running. Safe to call more than once.
        """
        if not self._closing:
            self._closing = True
            if not drain:
                self._aborting = True
                self._fail_queued(lambda: ShuttingDown(f"batcher {self._model!r}/{self.bucket} closed"))
            self._notify()
        if self._collector is not None:
            await asyncio.wait({self._collector})
        while self._batches:
            await asyncio.gather(*self._batches)
        if self._metrics is not None:
            self._metrics.untrack_queue(self)
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False)

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._collector = self._loop.create_task(
                self._collect(), name=f"batcher-{self._model}-{self.bucket}"
            )
            self._collector.add_done_callback(self._collector_done)
        return self._loop

    def _retry_after(self) -> float:
        """Seconds until the work ahead has likely run: batches queued and running times batch latency."""
        if self._batch_seconds is None:
            return UNMEASURED_RETRY_AFTER_S
        batches_ahead = math.ceil(self.queue_depth / self.rows) + self._running_batches
        return max(self._max_delay, batches_ahead * self._batch_seconds / self._slots())

    def _slots(self) -> int:
        """Batches that may run now: `capacity()` (a remote pool's endpoint budget) within the ceiling."""
        if self._capacity is None:
            return self._max_concurrent
        return max(1, min(self._max_concurrent, self._capacity()))

    def _buffer(self) -> np.ndarray:
        return self._buffers.pop() if self._buffers else np.empty((self.rows, *self.input_shape), np.float32)

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _sleep(self, timeout: float | None) -> None:
        """Wait for `_notify` (arrival, full queue, free slot, close) or `timeout` seconds."""
        assert self._loop is not None
        self._wake = self._loop.create_future()
        timer = None if timeout is None else self._loop.call_later(timeout, self._notify)
        try:
            await self._wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()

    def _expire(self, request: _Request) -> None:
        if request.future.done() or request.phase is _Phase.RUNNING:
            return
        if request.phase is _Phase.QUEUED:
            request.phase = _Phase.DROPPED
            self._queued -= 1
        request.future.set_exception(
            DeadlineExceeded("deadline passed while the request waited for its batch")
        )

    def _oldest(self) -> _Request | None:
        """The oldest live queued request, discarding withdrawn ones from the head."""
        while self._queue and self._queue[0].phase is not _Phase.QUEUED:
            self._queue.popleft()
        return self._queue[0] if self._queue else None

    async def _collect(self) -> None:
        """Form batches until closed and empty; dispatch each or stage it while all run slots are busy."""
        assert self._loop is not None
        while True:
            await self._batch_ready()
            if self._queued == 0:
                return
            requests = self._take()
            if not requests:
                continue
            buffer = self._buffer()
            if self._running_batches < self._slots():
                self._dispatch(buffer, requests, fill=True)
                continue
            self._staged = len(requests)
            try:
                pixels = [r.pixels for r in requests]
                await self._loop.run_in_executor(self._fill_executor, _fill_rows, buffer, pixels)
                while self._running_batches >= self._slots():
                    await self._sleep(None)
            finally:
                self._staged = 0
            requests = self._drop_settled(buffer, requests)
            if self._aborting:
                self._fail(requests, lambda: ShuttingDown(f"batcher {self._model!r}/{self.bucket} closed"))
                requests = []
            if requests:
                self._dispatch(buffer, requests, fill=False)
            else:
                self._buffers.append(buffer)

    async def _batch_ready(self) -> None:
        """Return when a batch should be taken now, or when closing with nothing left to take."""
        while True:
            oldest = self._oldest()
            if oldest is None:
                if self._closing:
                    return
                await self._sleep(None)
                continue
            if self._queued >= self.rows:
                return
            now = time.monotonic()
            hurry = self._closing or (oldest.alone and self._last_batch_size == 1)
            ready_at = now if hurry else oldest.enqueued_at + self._max_delay
            if now >= ready_at and self._running_batches < self._slots():
                return
            await self._sleep(ready_at - now if now < ready_at else None)

    def _take(self) -> list[_Request]:
        """Pop up to `rows` live requests; ones whose deadline has passed are answered, not taken."""
        now = time.monotonic()
        taken: list[_Request] = []
        while self._queue and len(taken) < self.rows:
            request = self._queue.popleft()
            if request.phase is not _Phase.QUEUED:
                continue
            if request.deadline is not None and request.deadline <= now:
                self._expire(request)
                continue
            self._queued -= 1
            request.phase = _Phase.STAGED
            taken.append(request)
        return taken

    @staticmethod
    def _drop_settled(buffer: np.ndarray, requests: list[_Request]) -> list[_Request]:
        """Remove staged rows whose request was cancelled or expired, moving later rows up."""
        keep = [i for i, r in enumerate(requests) if not r.future.done()]
        for row, source in enumerate(keep):
            if row != source:
                buffer[row] = buffer[source]
        return [requests[i] for i in keep]

    def _dispatch(self, buffer: np.ndarray, requests: list[_Request], *, fill: bool) -> None:
        assert self._loop is not None
        self._running_batches += 1
        self._running_items += len(requests)
        self._last_batch_size = len(requests)
        for request in requests:
            request.phase = _Phase.RUNNING
        pixels = [r.pixels for r in requests] if fill else None
        task = self._loop.create_task(self._run(buffer, requests, pixels))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    def _compute(
        self, buffer: np.ndarray, n: int, pixels: list[np.ndarray] | None, deadline: float | None
    ) -> tuple[Mapping[str, Any], float]:
        """Executor side: fill the rows if not staged, run the batch, check its outputs."""
        if pixels is not None:
            _fill_rows(buffer, pixels)
        start = time.perf_counter()
        outputs = self._run_batch(buffer[:n], deadline)
        seconds = time.perf_counter() - start
        for name, value in outputs.items():
            if np.shape(value)[:1] != (n,):
                raise ValueError(
                    f"run_batch output {name!r} has shape {np.shape(value)}, expected first dimension {n}"
                )
        return outputs, seconds

    async def _run(
        self, buffer: np.ndarray, requests: list[_Request], pixels: list[np.ndarray] | None
    ) -> None:
        assert self._loop is not None
        n = len(requests)
        if self._metrics is not None:
            started = time.monotonic()
            for request in requests:
                self._observe_queue(started - request.enqueued_at)
            self._observe_batch(n)
        deadlines = [r.deadline for r in requests]
        deadline = None if None in deadlines else max(deadlines)
        try:
            outputs, seconds = await self._loop.run_in_executor(
                self._executor, self._compute, buffer, n, pixels, deadline
            )
        except Exception as exc:
            message = (
                f"inference failed for a batch of {n} on {self._model!r}/{self.bucket}: "
                f"{type(exc).__name__}: {exc}"
            )
            self._fail(requests, lambda: BatchError(message), cause=exc)
        else:
            if self._metrics is not None:
                self._observe_inference(seconds)
            previous = self._batch_seconds
            self._batch_seconds = (
                seconds if previous is None else previous + LATENCY_SMOOTHING * (seconds - previous)
            )
            for row, request in enumerate(requests):
                if not request.future.done():
                    request.future.set_result({name: value[row] for name, value in outputs.items()})
        finally:
            self._running_batches -= 1
            self._running_items -= n
            self._buffers.append(buffer)
            self._notify()

    @staticmethod
    def _fail(
        requests: list[_Request], error: Callable[[], BaseException], cause: BaseException | None = None
    ) -> None:
        for request in requests:
            if not request.future.done():
                exc = error()
                exc.__cause__ = cause
                request.future.set_exception(exc)

    def _fail_queued(self, error: Callable[[], BaseException]) -> None:
        while (request := self._oldest()) is not None:
            self._queue.popleft()
            request.phase = _Phase.DROPPED
            self._queued -= 1
            self._fail([request], error)

    def _collector_done(self, task: asyncio.Task[None]) -> None:
        """A crashed collector would leave callers waiting forever: fail what is queued, loudly."""
        if task.cancelled() or task.exception() is None:
            return
        log.error(
            "batcher %r/%s stopped forming batches", self._model, self.bucket, exc_info=task.exception()
        )
        self._closing = True
        self._fail_queued(
            lambda: BatchError(f"batcher {self._model!r}/{self.bucket} stopped; see the server log")
        )


class BatcherGroup:
    """The process's batchers keyed by (model, bucket); a batch never mixes buckets.

    Per-pool figures sum over the group's batchers; the Prometheus gauges queue_depth{pool,model} and
    pending_tokens{pool} aggregate the same way because every batcher registers with the shared `metrics`.
    """

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self._batchers: dict[tuple[str, int], Batcher] = {}

    def add(self, run_batch: RunBatch, *, model: str, pool: str, bucket: int, **settings: Any) -> Batcher:
        """Create the batcher of (model, bucket); `settings` are `Batcher`'s keyword arguments."""
        if (model, bucket) in self._batchers:
            raise ValueError(f"a batcher for model {model!r} bucket {bucket} already exists; use get()")
        batcher = Batcher(run_batch, model=model, pool=pool, bucket=bucket, metrics=self._metrics, **settings)
        self._batchers[model, bucket] = batcher
        return batcher

    def get(self, model: str, bucket: int) -> Batcher:
        try:
            return self._batchers[model, bucket]
        except KeyError:
            known = ", ".join(f"{m}/{b}" for m, b in sorted(self._batchers)) or "none"
            raise KeyError(f"no batcher for model {model!r} bucket {bucket}; known: {known}") from None

    def __iter__(self) -> Iterator[Batcher]:
        return iter(self._batchers.values())

    def __len__(self) -> int:
        return len(self._batchers)

    def queue_depth(self, pool: str, model: str | None = None) -> int:
        """Requests waiting in `pool`, optionally only for `model`."""
        return sum(b.queue_depth for b in self if b.pool == pool and model in (None, b.model))

    def pending_tokens(self, pool: str) -> int:
        """Tokens accepted and not yet answered in `pool`."""
        return sum(b.pending_tokens for b in self if b.pool == pool)

    async def close(self, drain: bool = True) -> None:
        """Close every batcher concurrently (see `Batcher.close`)."""
        await asyncio.gather(*(b.close(drain) for b in self))
