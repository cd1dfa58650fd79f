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
  same executor job as `run_batch`, one thread hop per batch. A finished batch's requests are
  answered before the staged batch is dispatched, on purpose: dispatching it first kept ONNX
  Runtime busy 0.99 of the wall time instead of 0.95 at c16 on 2 cores, but the answers then took
  the cores from the run, and served img/s fell by about 2% (ViT-S 224, limits 2 and 4, AMD EPYC,
  2026-12-04).
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
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.metrics import Metrics
from service.threads import named_executor

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


class InferenceTimeout(BatcherError):
    """The request's batch started but had not finished by the request's deadline (HTTP 504).

    The batch thread cannot be interrupted: a hung runtime keeps one of its pool's fixed batch threads,
    and the requests behind it expire in the queue, so threads never grow past the pool's bound.
    """


class _Phase(enum.Enum):
    QUEUED = enum.auto()  # waiting in the queue, counted in _queued
    STAGED = enum.auto()  # taken into a batch the executor has not started yet, counted in _staged
    RUNNING = enum.auto()  # claimed by the executor thread that runs its batch
    DROPPED = enum.auto()  # cancelled or expired before its batch started: never computed


@dataclass(slots=True, eq=False)
class _Request:
    key: int
    pixels: np.ndarray | None  # released as soon as the request is dropped
    future: asyncio.Future[Result]
    enqueued_at: float
    deadline: float | None
    alone: bool  # arrived to an idle batcher: nothing queued, staged or running
    phase: _Phase = _Phase.QUEUED
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True, eq=False)
class _Batch:
    """Requests taken together; `claimed` and `expired` are filled by the executor thread when it starts."""

    buffer: np.ndarray
    requests: list[_Request]
    filled: bool  # rows already copied into `buffer` (staged while every run slot was busy)
    claimed: list[_Request] = field(default_factory=list)
    expired: list[_Request] = field(default_factory=list)


def _fill_rows(buffer: np.ndarray, pixels: list[np.ndarray]) -> None:
    """The one copy of each request's image, into its row of the batch buffer."""
    for row, image in enumerate(pixels):
        np.copyto(buffer[row], image)


class ByteBudget:
    """Bytes of preprocessed images that one pool's admitted, unanswered requests hold.

    Shared by the batchers of a pool (`VITSERVE_MAX_QUEUE_BYTES`), so a pool's memory is bounded in
    bytes as well as in count whatever the mix of buckets. Used from the event loop only.
    """

    def __init__(self, pool: str, limit: int | None = None) -> None:
        self.pool, self.limit, self.used = pool, limit, 0

    def fits(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit; a request alone in an empty pool always fits, or it could never run."""
        return self.limit is None or self.used == 0 or self.used + nbytes <= self.limit


class Reservation:
    """Places in a batcher's queue and bytes of its pool's budget, taken before the request is decoded.

    `Batcher.submit(..., reservation=r)` turns one place into a queued request; `release()` (also on
    leaving a `with` block) returns the unused places and the bytes once the request is answered.
    """

    __slots__ = ("_batcher", "places", "nbytes")

    def __init__(self, batcher: Batcher, places: int, nbytes: int) -> None:
        self._batcher, self.places, self.nbytes = batcher, places, nbytes

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        self._batcher._release(self)


class Batcher:
    """Batches requests for one (model, bucket) and runs them with a blocking `run_batch` in threads.

    `run_batch(batch)` gets a float32 (n, *input_shape) view of a reused buffer and returns outputs
    whose first dimension is n; it must not keep the view or return arrays aliasing it. Each
    submission receives its own row of every output.

    A request is running only once the executor thread that runs its batch has started and claimed
    it: until then (queued, or in a batch waiting for a thread that another bucket of the same pool
    holds) its deadline and cancellation apply and it is never computed after either.

    Settings: `input_shape` defaults to (3, bucket, bucket). `max_queue_size` bounds the requests
    admitted and waiting in the queue (reserved or queued; a staged or running batch is not counted).
    `byte_budget` bounds the bytes of admitted requests across the pool. `tokens_per_item` is the
    token count of one image of this bucket; it weighs pending_tokens and, with `max_batch_tokens`,
    caps the rows of a batch. `max_concurrent_batches` batches may run at once (default 1, so ONNX
    Runtime's intra-op threads own the cores), or fewer when `capacity()` says so (a remote pool's
    endpoint budget, which grows and shrinks with its replicas). `executor` runs `run_batch` (default: a private pool
    of `max_concurrent_batches` threads, shut down by `close`); share one across batchers to bound
    the batches running in a pool. `fill_executor` copies staged batches (default: the loop's).
    `on_batch(rows, seconds)` is told, on the event loop, how long each successful batch ran.
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
        byte_budget: ByteBudget | None = None,
        metrics: Metrics | None = None,
        executor: Executor | None = None,
        fill_executor: Executor | None = None,
        on_batch: Callable[[int, float], None] | None = None,
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
        self.item_bytes = int(np.prod(self.input_shape)) * np.dtype(np.float32).itemsize
        self.tokens_per_item = tokens_per_item
        # The token budget is a row cap: every request of a bucket has the same token count. A single
        # request over budget still runs alone, or it could never be served.
        self._token_rows = None if max_batch_tokens is None else max(1, max_batch_tokens // tokens_per_item)
        self.set_batch_limit(max_batch_size)
        self._max_delay = max_queue_delay_s
        self._max_queue_size = max_queue_size
        self._max_concurrent = max_concurrent_batches
        self._capacity = capacity
        self._budget = byte_budget or ByteBudget(pool)
        self._metrics = metrics
        self._on_batch = on_batch
        self._own_executor = None
        if executor is None:
            executor = self._own_executor = named_executor(max_concurrent_batches, f"batch-{model}-{bucket}")
        self._executor = executor
        self._fill_executor = fill_executor
        # Buffers are made on first use and reused, so a high remote ceiling costs nothing until used.
        self._buffers: list[np.ndarray] = []
        # Live queued requests in arrival order; a dropped request leaves at once, pixels included.
        self._queue: OrderedDict[int, _Request] = OrderedDict()
        self._keys = itertools.count()
        # Guards the STAGED -> RUNNING/DROPPED race between executor threads and the loop, and the
        # counters those transitions move.
        self._lock = threading.Lock()
        self._reserved = 0
        self._queued = 0
        self._staged = 0
        self._running_items = 0
        self._running_batches = 0
        self._batch_seconds: float | None = None
        self._last_batch_size = 1
        self._closing = False
        self._aborting = False
        self._abort_reason = f"batcher {model!r}/{bucket} closed"
        self._wake: asyncio.Future[None] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._batches: dict[asyncio.Task[None], _Batch] = {}
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
        """Requests accepted but not yet running (queued, or in a batch no thread has started)."""
        return self._queued + self._staged

    @property
    def pending_tokens(self) -> int:
        """Tokens of every accepted request not yet answered: the autoscaling signal."""
        return (self._queued + self._staged + self._running_items) * self.tokens_per_item

    @property
    def queue_bytes(self) -> int:
        """Bytes of admitted, unanswered requests in this batcher's pool (shared budget)."""
        return self._budget.used

    def reserve(self, places: int = 1, nbytes: int | None = None) -> Reservation:
        """Admit a request of `places` rows before decoding it, or raise QueueFull / ShuttingDown.

        `nbytes` defaults to `places` preprocessed images of this bucket. The whole request is
        admitted or none of it, so a multi-row request never half-runs because the queue filled.
        """
        if self._closing:
            raise ShuttingDown(
                f"batcher {self._model!r}/{self.bucket} is shutting down; send the request elsewhere"
            )
        nbytes = places * self.item_bytes if nbytes is None else nbytes
        if self._queued + self._reserved + places > self._max_queue_size:
            retry = self._retry_after()
            raise QueueFull(
                f"queue of {self._model!r}/{self.bucket} is full ({self._max_queue_size} requests"
                f"{f', this one has {places} rows' if places > 1 else ''}); retry in {retry:.3f} s",
                retry,
            )
        if not self._budget.fits(nbytes):
            retry = self._retry_after()
            raise QueueFull(
                f"pool {self._pool!r} holds {self._budget.used} of its {self._budget.limit} queued bytes; "
                f"this request needs {nbytes}; retry in {retry:.3f} s",
                retry,
            )
        self._reserved += places
        self._budget.used += nbytes
        return Reservation(self, places, nbytes)

    def _release(self, reservation: Reservation) -> None:
        self._reserved -= reservation.places
        self._budget.used -= reservation.nbytes
        reservation.places = reservation.nbytes = 0

    async def submit(
        self, pixels: np.ndarray, deadline: float | None = None, reservation: Reservation | None = None
    ) -> Result:
        """Run one preprocessed float32 image of `input_shape` in a batch; its row of each output.

        `deadline` is a `time.monotonic()` instant. `reservation` is a place taken by `reserve`
        (without one, the request reserves its own place now). Raises QueueFull, DeadlineExceeded,
        InferenceTimeout, ShuttingDown or BatchError. Cancelling the awaiting task withdraws the
        request if its batch has not started. `pixels` must stay unmodified until this returns.
        """
        own = self.reserve() if reservation is None else None
        try:
            request = self._enqueue(pixels, deadline, reservation or own)
            # Only the request holds the pixels from here, so dropping it frees them even while a
            # traceback through this frame lives on.
            del pixels
            try:
                return await request.future
            except asyncio.CancelledError:
                self._drop(request)
                raise
            finally:
                if request.timer is not None:
                    request.timer.cancel()
        finally:
            if own is not None:
                own.release()

    def _enqueue(self, pixels: np.ndarray, deadline: float | None, reservation: Reservation) -> _Request:
        """Check the request and queue it on one of `reservation`'s places."""
        if self._closing:
            raise ShuttingDown(
                f"batcher {self._model!r}/{self.bucket} is shutting down; send the request elsewhere"
            )
        if pixels.shape != self.input_shape or pixels.dtype != np.float32:
            raise ValueError(
                f"batcher {self._model!r}/{self.bucket} takes float32 images of shape {self.input_shape}, "
                f"got {pixels.dtype} {pixels.shape}; preprocess to the bucket first"
            )
        if reservation.places < 1:
            raise ValueError("the reservation has no place left; reserve one place per submitted row")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"deadline passed {now - deadline:.3f} s before the request was queued")
        loop = self._ensure_started()
        reservation.places -= 1
        self._reserved -= 1
        alone = not (self._queued or self._staged or self._running_batches)
        request = _Request(next(self._keys), pixels, loop.create_future(), now, deadline, alone)
        if deadline is not None:
            request.timer = loop.call_later(deadline - now, self._expire, request)
        self._queue[request.key] = request
        self._queued += 1
        if self._queued == 1 or self._queued == self.rows:
            self._notify()
        return request

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
            await asyncio.wait(set(self._batches))
        if self._metrics is not None:
            self._metrics.untrack_queue(self)
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False)

    def abort(self, message: str) -> None:
        """Answer every unanswered request now with ShuttingDown(`message`): queued, staged and running.

        For a drain that ran out of time: running batches keep their threads, their results are dropped.
        """
        self._closing = self._aborting = True
        self._abort_reason = message

        def error() -> ShuttingDown:
            return ShuttingDown(message)

        self._fail_queued(error)
        for batch in self._batches.values():
            for request in batch.requests:
                self._drop(request)
            self._fail(batch.requests, error)
        self._notify()

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

    def set_batch_limit(self, max_batch_size: int) -> None:
        """Batches of at most `max_batch_size` from the next one taken on (within the token budget): a
        cost calibrated after the batcher started changes the batch with the best throughput."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1 for batcher {self._model!r}/{self.bucket}")
        self.rows = max_batch_size if self._token_rows is None else min(max_batch_size, self._token_rows)

    def _buffer(self) -> np.ndarray:
        """A reused buffer of `rows` rows; those of an earlier batch limit are dropped."""
        while self._buffers:
            buffer = self._buffers.pop()
            if len(buffer) == self.rows:
                return buffer
        return np.empty((self.rows, *self.input_shape), np.float32)

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

    def _observe_wait(self, requests: list[_Request], now: float) -> None:
        """Queue time of requests leaving the queue, whether they start, expire or are withdrawn."""
        if self._metrics is not None:
            for request in requests:
                self._observe_queue(now - request.enqueued_at)

    def _drop(self, request: _Request) -> bool:
        """Withdraw a request whose batch has not started (cancelled, expired, aborted); False if it has."""
        with self._lock:
            if request.phase is _Phase.QUEUED:
                del self._queue[request.key]
                self._queued -= 1
            elif request.phase is _Phase.STAGED:
                self._staged -= 1
            else:
                return False
            request.phase = _Phase.DROPPED
            request.pixels = None
        self._observe_wait([request], time.monotonic())
        return True

    def _expire(self, request: _Request) -> None:
        """The deadline passed: 504 without computing if the batch has not started, else stop waiting."""
        if request.future.done():
            return
        if self._drop(request) or request.phase is _Phase.DROPPED:
            request.future.set_exception(
                DeadlineExceeded(
                    "deadline passed while the request waited for its batch; it was not computed"
                )
            )
        else:
            request.future.set_exception(
                InferenceTimeout(
                    f"deadline passed while the batch of {self._model!r}/{self.bucket} was running; "
                    "the runtime is slow or hung, retry with a longer timeout or elsewhere"
                )
            )

    def _oldest(self) -> _Request | None:
        """The oldest live queued request."""
        return next(iter(self._queue.values()), None)

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
                self._dispatch(_Batch(buffer, requests, filled=False))
                continue
            pixels = [r.pixels for r in requests]
            await self._loop.run_in_executor(self._fill_executor, _fill_rows, buffer, pixels)
            del pixels
            while self._running_batches >= self._slots() and not self._aborting:
                await self._sleep(None)
            if self._aborting:
                for request in requests:
                    self._drop(request)
                self._fail(requests, lambda: ShuttingDown(self._abort_reason))
            if any(r.phase is _Phase.STAGED for r in requests):
                self._dispatch(_Batch(buffer, requests, filled=True))
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
        """Take up to `rows` queued requests into a batch; ones whose deadline has passed are answered."""
        now = time.monotonic()
        taken: list[_Request] = []
        while self._queue and len(taken) < self.rows:
            request = next(iter(self._queue.values()))
            if request.deadline is not None and request.deadline <= now:
                self._expire(request)
                continue
            with self._lock:
                self._queue.popitem(last=False)
                self._queued -= 1
                self._staged += 1
                request.phase = _Phase.STAGED
            taken.append(request)
        return taken

    def _dispatch(self, batch: _Batch) -> None:
        assert self._loop is not None
        self._running_batches += 1
        self._last_batch_size = len(batch.requests)
        task = self._loop.create_task(self._run(batch))
        self._batches[task] = batch
        task.add_done_callback(self._batches.pop)

    def _claim(self, batch: _Batch) -> None:
        """Executor side, first thing: the batch's live requests become running, late ones expire."""
        now = time.monotonic()
        with self._lock:
            for request in batch.requests:
                if request.phase is not _Phase.STAGED:
                    continue
                self._staged -= 1
                if request.deadline is not None and request.deadline <= now:
                    request.phase = _Phase.DROPPED
                    request.pixels = None
                    batch.expired.append(request)
                else:
                    request.phase = _Phase.RUNNING
                    batch.claimed.append(request)
            self._running_items += len(batch.claimed)
        self._observe_wait(batch.claimed + batch.expired, now)

    def _compute(self, batch: _Batch) -> tuple[Mapping[str, Any], float] | None:
        """Executor side: claim, fill or compact the claimed rows, run them, check the outputs."""
        self._claim(batch)
        n = len(batch.claimed)
        if n == 0:
            return None
        buffer = batch.buffer
        if batch.filled:
            rows = {id(r): i for i, r in enumerate(batch.requests)}
            for row, request in enumerate(batch.claimed):
                source = rows[id(request)]
                if source != row:
                    buffer[row] = buffer[source]
        else:
            _fill_rows(buffer, [r.pixels for r in batch.claimed])
        # The latest deadline among the claimed rows (None when one has none): remote runtimes pass it
        # on as the protocol's timeout, and a short budget never fails co-batched long ones.
        deadlines = [r.deadline for r in batch.claimed]
        deadline = None if None in deadlines else max(deadlines)
        start = time.perf_counter()
        outputs = self._run_batch(buffer[:n], deadline)
        seconds = time.perf_counter() - start
        for name, value in outputs.items():
            if np.shape(value)[:1] != (n,):
                raise ValueError(
                    f"run_batch output {name!r} has shape {np.shape(value)}, expected first dimension {n}"
                )
        return outputs, seconds

    async def _run(self, batch: _Batch) -> None:
        assert self._loop is not None
        try:
            done = await self._loop.run_in_executor(self._executor, self._compute, batch)
        except asyncio.CancelledError:
            # The executor was shut down before starting the job (or this task was cancelled).
            for request in batch.requests:
                self._drop(request)
            self._fail(batch.requests, lambda: ShuttingDown(f"batcher {self._model!r}/{self.bucket} closed"))
            raise
        except Exception as exc:
            message = (
                f"inference failed for a batch of {len(batch.claimed)} on {self._model!r}/{self.bucket}: "
                f"{type(exc).__name__}: {exc}"
            )
            self._fail(batch.claimed, lambda: BatchError(message), cause=exc)
        else:
            if done is not None:
                outputs, seconds = done
                if self._metrics is not None:
                    self._observe_batch(len(batch.claimed))
                    self._observe_inference(seconds)
                previous = self._batch_seconds
                self._batch_seconds = (
                    seconds if previous is None else previous + LATENCY_SMOOTHING * (seconds - previous)
                )
                for row, request in enumerate(batch.claimed):
                    if not request.future.done():
                        request.future.set_result({name: value[row] for name, value in outputs.items()})
                if self._on_batch is not None:
                    self._on_batch(len(batch.claimed), seconds)
        finally:
            self._fail(batch.expired, lambda: DeadlineExceeded("deadline passed before the batch started"))
            self._running_batches -= 1
            with self._lock:
                self._running_items -= len(batch.claimed)
            self._buffers.append(batch.buffer)
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
            self._drop(request)
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

    def __init__(self, metrics: Metrics | None = None, max_queue_bytes: int | None = None) -> None:
        self._metrics = metrics
        self._max_queue_bytes = max_queue_bytes
        self._batchers: dict[tuple[str, int], Batcher] = {}
        self._budgets: dict[str, ByteBudget] = {}

    def add(self, run_batch: RunBatch, *, model: str, pool: str, bucket: int, **settings: Any) -> Batcher:
        """Create the batcher of (model, bucket); `settings` are `Batcher`'s keyword arguments."""
        if (model, bucket) in self._batchers:
            raise ValueError(f"a batcher for model {model!r} bucket {bucket} already exists; use get()")
        budget = self._budgets.get(pool)
        if budget is None:
            budget = self._budgets[pool] = ByteBudget(pool, self._max_queue_bytes)
            if self._metrics is not None:
                self._metrics.track_budget(budget)
        batcher = Batcher(
            run_batch,
            model=model,
            pool=pool,
            bucket=bucket,
            byte_budget=budget,
            metrics=self._metrics,
            **settings,
        )
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

    def abort(self, message: str) -> None:
        """Answer every unanswered request of every batcher (see `Batcher.abort`)."""
        for batcher in self:
            batcher.abort(message)
