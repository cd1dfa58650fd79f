"""The dynamic batcher under real asyncio with a real numpy batch function.

`RowSums` is the unit's counterpart, not a mock: it computes per-row pixel sums and row indexes and
records the request ids (each image is filled with its id) of every batch it ran, so the tests can
check which requests were computed together and that each caller got its own row. A threading gate
holds the first batch in run_batch, which makes the states "running", "staged" and "queued" reachable
deterministically without timing assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.batcher import (
    Batcher,
    BatcherGroup,
    BatchError,
    DeadlineExceeded,
    InferenceTimeout,
    QueueFull,
    ShuttingDown,
)
from service.metrics import Metrics

BUCKET = 4
PIXELS_PER_IMAGE = 3 * BUCKET * BUCKET


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run a coroutine test in a fresh event loop (pytest-asyncio is not a dependency)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def image(request_id: int, bucket: int = BUCKET) -> np.ndarray:
    return np.full((3, bucket, bucket), request_id, np.float32)


class RowSums:
    """Batch function: per-row sums and row indexes; records ids per batch and the threads it ran in."""

    def __init__(
        self,
        gate: threading.Event | None = None,
        poison: int | None = None,
        barrier: threading.Barrier | None = None,
    ) -> None:
        self.gate, self.poison, self.barrier = gate, poison, barrier
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.started = threading.Event()

    def __call__(self, batch: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
        self.threads.add(threading.get_ident())
        ids = [int(v) for v in batch[:, 0, 0, 0]]
        self.batches.append(ids)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(5), "the test never opened the gate"
        if self.barrier is not None:
            self.barrier.wait()
        if self.poison in ids:
            raise RuntimeError(f"poisoned request {self.poison}")
        return {"sum": batch.reshape(len(batch), -1).sum(axis=1), "row": np.arange(len(batch))}

    @property
    def computed(self) -> list[int]:
        return [i for batch in self.batches for i in batch]

    def batch_of(self, request_id: int) -> list[int]:
        return next(b for b in self.batches if request_id in b)


def make(run: RowSums, **settings: Any) -> Batcher:
    defaults: dict[str, Any] = {"model": "vit", "pool": "global", "bucket": BUCKET, "max_queue_delay_s": 0.01}
    return Batcher(run, **{**defaults, **settings})


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Yield to the loop until `condition` holds (synchronization, not a timing assertion)."""
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, "the batcher never reached the expected state"
        await asyncio.sleep(0.001)


async def start_blocked_batch(batcher: Batcher, run: RowSums, request_id: int) -> asyncio.Task:
    """Submit one request and return once its batch is inside run_batch, held by the gate."""
    task = asyncio.create_task(batcher.submit(image(request_id)))
    assert await asyncio.to_thread(run.started.wait, 5)
    return task


def check_own_row(run: RowSums, request_id: int, result: dict[str, np.ndarray]) -> None:
    assert result["sum"] == pytest.approx(request_id * PIXELS_PER_IMAGE)
    assert result["row"] == run.batch_of(request_id).index(request_id)


@async_test
async def test_concurrent_requests_share_batches_and_each_gets_its_own_row() -> None:
    run = RowSums()
    batcher = make(run, max_batch_size=8, max_queue_delay_s=0.05)
    ids = list(range(1, 9))
    results = await asyncio.gather(*(batcher.submit(image(i)) for i in ids))
    assert max(len(b) for b in run.batches) > 1
    assert sorted(run.computed) == ids
    for i, result in zip(ids, results, strict=True):
        check_own_row(run, i, result)
    assert threading.get_ident() not in run.threads, "run_batch must never run on the event loop thread"
    await batcher.close()


@async_test
async def test_max_batch_size_caps_every_batch() -> None:
    run = RowSums()
    batcher = make(run, max_batch_size=4)
    results = await asyncio.gather(*(batcher.submit(image(i)) for i in range(10)))
    assert max(len(b) for b in run.batches) <= 4
    assert sorted(run.computed) == list(range(10))
    for i, result in enumerate(results):
        check_own_row(run, i, result)
    await batcher.close()


@async_test
async def test_each_successful_batch_is_reported_on_the_event_loop_with_its_rows() -> None:
    """`on_batch` feeds the served-cost correction (service/state.py): one report per batch that
    answered, with its rows and a positive run time, on the loop thread; a failed batch reports nothing."""
    run = RowSums(poison=99)
    reports: list[tuple[int, float, int]] = []
    batcher = make(
        run,
        max_batch_size=4,
        on_batch=lambda rows, seconds: reports.append((rows, seconds, threading.get_ident())),
    )
    await asyncio.gather(*(batcher.submit(image(i)) for i in range(6)))
    with pytest.raises(BatchError):
        await batcher.submit(image(99))
    assert [rows for rows, _, _ in reports] == [len(b) for b in run.batches[:-1]]
    assert sum(rows for rows, _, _ in reports) == 6
    assert all(seconds > 0 for _, seconds, _ in reports)
    assert {thread for _, _, thread in reports} == {threading.get_ident()}
    await batcher.close()


@async_test
async def test_a_new_batch_limit_applies_from_the_next_batch_on() -> None:
    """A cost calibrated after start-up re-plans the limit (service/state.py, background calibration):
    batches grow past the old limit and shrink below it, and every row still reaches its caller,
    through buffers of the old size being dropped rather than reused."""
    run = RowSums()
    batcher = make(run, max_batch_size=2, max_queue_delay_s=0.05)
    for limit, ids in ((2, range(0, 6)), (6, range(6, 12)), (1, range(12, 15))):
        batcher.set_batch_limit(limit)
        first = len(run.batches)
        results = await asyncio.gather(*(batcher.submit(image(i)) for i in ids))
        assert max(len(b) for b in run.batches[first:]) <= limit
        for i, result in zip(ids, results, strict=True):
            check_own_row(run, i, result)
    assert max(len(b) for b in run.batches) == 6
    assert sorted(run.computed) == list(range(15))
    with pytest.raises(ValueError, match="at least 1"):
        batcher.set_batch_limit(0)
    await batcher.close()


@async_test
async def test_lone_requests_start_at_once_but_wait_for_company_after_a_shared_batch() -> None:
    """A minute of queue delay: only the batcher's own choice can make these requests finish promptly."""
    run = RowSums()
    batcher = make(run, max_batch_size=2, max_queue_delay_s=60)
    for i in (1, 2, 3):  # concurrency 1: every request finds the batcher idle after a batch of one
        check_own_row(run, i, await asyncio.wait_for(batcher.submit(image(i)), 10))
    await asyncio.wait_for(asyncio.gather(batcher.submit(image(4)), batcher.submit(image(5))), 10)
    # After a batch of two a lone request waits for company instead of starting alone.
    lone = asyncio.create_task(batcher.submit(image(6)))
    await until(lambda: batcher.queue_depth == 1)
    await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(lone, batcher.submit(image(7))), 10)
    assert run.batches == [[1], [2], [3], [4, 5], [6, 7]]
    await batcher.close()


@pytest.mark.parametrize(("budget", "rows"), [(200, 3), (10, 1)])
@async_test
async def test_token_budget_caps_batches(budget: int, rows: int) -> None:
    run = RowSums()
    batcher = make(run, max_batch_size=32, tokens_per_item=64, max_batch_tokens=budget)
    assert batcher.rows == rows
    await asyncio.gather(*(batcher.submit(image(i)) for i in range(7)))
    assert max(len(b) for b in run.batches) <= rows
    assert max(len(b) for b in run.batches) * 64 <= max(budget, 64)
    assert sorted(run.computed) == list(range(7))
    await batcher.close()


@async_test
async def test_full_queue_rejects_with_retry_after_and_never_computes_the_rejected() -> None:
    gate = threading.Event()
    run = RowSums(gate)
    # Four rows per batch and three queue places: while the first batch is held the queue never fills
    # a batch, so the three requests stay queued and the fourth is rejected.
    batcher = make(run, max_batch_size=4, max_queue_size=3)
    first = await start_blocked_batch(batcher, run, 1)
    queued = [asyncio.create_task(batcher.submit(image(i))) for i in (2, 3, 4)]
    await until(lambda: batcher.queue_depth == 3)
    with pytest.raises(QueueFull) as rejected:
        await batcher.submit(image(99))
    assert rejected.value.retry_after_s > 0
    gate.set()
    for i, result in zip((1, 2, 3, 4), await asyncio.gather(first, *queued), strict=True):
        check_own_row(run, i, result)
    assert 99 not in run.computed
    await batcher.close()


@async_test
async def test_deadline_already_passed_is_answered_without_computing() -> None:
    run = RowSums()
    batcher = make(run)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(image(7), deadline=time.monotonic() - 0.001)
    assert run.batches == []
    check_own_row(run, 8, await batcher.submit(image(8), deadline=time.monotonic() + 5))
    await batcher.close()


@pytest.mark.parametrize("max_batch_size", [1, 4], ids=["staged", "queued"])
@async_test
async def test_deadline_passing_while_waiting_is_answered_and_never_computed(max_batch_size: int) -> None:
    """With one row per batch the waiting request is staged in the spare buffer, with four it stays queued."""
    gate = threading.Event()
    run = RowSums(gate)
    batcher = make(run, max_batch_size=max_batch_size)
    first = await start_blocked_batch(batcher, run, 1)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(image(2), deadline=time.monotonic() + 0.02)
    gate.set()
    check_own_row(run, 1, await first)
    check_own_row(run, 3, await batcher.submit(image(3)))
    assert 2 not in run.computed
    assert batcher.queue_depth == 0 and batcher.pending_tokens == 0
    await batcher.close()


@pytest.mark.parametrize("max_batch_size", [3, 8], ids=["staged", "queued"])
@async_test
async def test_cancelled_request_is_withdrawn_and_never_computed(max_batch_size: int) -> None:
    """Cancelling the middle request of three: staged rows after it move up, queued ones are skipped."""
    gate = threading.Event()
    run = RowSums(gate)
    batcher = make(run, max_batch_size=max_batch_size, tokens_per_item=10)
    first = await start_blocked_batch(batcher, run, 1)
    waiting = {i: asyncio.create_task(batcher.submit(image(i))) for i in (2, 3, 4)}
    await until(lambda: batcher.queue_depth == 3)
    waiting[3].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting[3]
    gate.set()
    for i, task in ((1, first), (2, waiting[2]), (4, waiting[4])):
        check_own_row(run, i, await task)
    assert 3 not in run.computed
    assert batcher.queue_depth == 0 and batcher.pending_tokens == 0
    await batcher.close()


@async_test
async def test_cancelling_a_running_request_drops_only_its_result() -> None:
    gate = threading.Event()
    run = RowSums(gate)
    batcher = make(run, max_batch_size=2, max_queue_delay_s=1.0)
    tasks = [asyncio.create_task(batcher.submit(image(i))) for i in (1, 2)]
    assert await asyncio.to_thread(run.started.wait, 5)
    tasks[0].cancel()
    gate.set()
    check_own_row(run, 2, await tasks[1])
    assert run.batches == [[1, 2]]
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    await batcher.close()


@async_test
async def test_failing_batch_fails_only_its_requests_and_service_continues() -> None:
    run = RowSums(poison=13)
    batcher = make(run, max_batch_size=2)
    outcomes = await asyncio.gather(
        *(batcher.submit(image(i)) for i in (13, 1, 2, 3)), return_exceptions=True
    )
    failed_batch = run.batch_of(13)
    for i, outcome in zip((13, 1, 2, 3), outcomes, strict=True):
        if i in failed_batch:
            assert isinstance(outcome, BatchError) and "poisoned request 13" in str(outcome)
            assert isinstance(outcome.__cause__, RuntimeError)
        else:
            check_own_row(run, i, outcome)
    check_own_row(run, 4, await batcher.submit(image(4)))
    await batcher.close()


@async_test
async def test_outputs_without_a_row_per_request_fail_the_batch_with_a_clear_message() -> None:
    batcher = make(
        lambda batch, deadline: {"logits": np.zeros((1, 10))}, max_batch_size=4, max_queue_delay_s=0.05
    )
    outcomes = await asyncio.gather(*(batcher.submit(image(i)) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, BatchError) and "expected first dimension" in str(o) for o in outcomes)
    await batcher.close()


@async_test
async def test_concurrent_batches_run_in_parallel_up_to_the_configured_count() -> None:
    # Each batch waits at a two-party barrier: it only passes if two batches run at once.
    run = RowSums(barrier=threading.Barrier(2, timeout=5))
    batcher = make(run, max_batch_size=1, max_concurrent_batches=2)
    results = await asyncio.gather(batcher.submit(image(1)), batcher.submit(image(2)))
    assert [r["sum"] for r in results] == [PIXELS_PER_IMAGE, 2 * PIXELS_PER_IMAGE]
    assert len(run.threads) == 2
    await batcher.close()


@async_test
async def test_drain_finishes_running_and_queued_work_then_rejects() -> None:
    gate = threading.Event()
    run = RowSums(gate)
    batcher = make(run, max_batch_size=2)
    first = await start_blocked_batch(batcher, run, 1)
    waiting = [asyncio.create_task(batcher.submit(image(i))) for i in (2, 3, 4)]
    await until(lambda: batcher.queue_depth == 3)
    closing = asyncio.create_task(batcher.close(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(ShuttingDown):
        await batcher.submit(image(5))
    assert not closing.done()
    gate.set()
    await closing
    assert all(task.done() for task in (first, *waiting))
    for i, task in zip((1, 2, 3, 4), (first, *waiting), strict=True):
        check_own_row(run, i, task.result())
    with pytest.raises(ShuttingDown):
        await batcher.submit(image(6))


@async_test
async def test_close_without_drain_fails_queued_and_finishes_running() -> None:
    gate = threading.Event()
    run = RowSums(gate)
    batcher = make(run, max_batch_size=4)
    first = await start_blocked_batch(batcher, run, 1)
    queued = asyncio.create_task(batcher.submit(image(2)))
    await until(lambda: batcher.queue_depth == 1)
    closing = asyncio.create_task(batcher.close(drain=False))
    with pytest.raises(ShuttingDown):
        await queued
    gate.set()
    await closing
    check_own_row(run, 1, await first)
    assert run.computed == [1]


def test_invalid_settings_and_inputs_are_rejected_with_the_reason() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be at least 1"):
        make(RowSums(), max_batch_size=0)
    batcher = make(RowSums())
    with pytest.raises(ValueError, match=r"float32 images of shape \(3, 4, 4\)"):
        asyncio.run(batcher.submit(np.zeros((3, 8, 8), np.float32)))
    with pytest.raises(ValueError, match="got float64"):
        asyncio.run(batcher.submit(np.zeros((3, 4, 4))))


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the rendered exposition, keyed by (name, sorted labels)."""
    text = metrics.render()[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[name, tuple(sorted(labels.items()))]


@async_test
async def test_metrics_equal_what_happened() -> None:
    metrics = Metrics()
    run = RowSums()
    batcher = make(run, model="vit", pool="global", max_batch_size=4, tokens_per_item=196, metrics=metrics)
    await asyncio.gather(*(batcher.submit(image(i)) for i in range(10)))
    assert value(metrics, "vitserve_batch_size_count", model="vit") == len(run.batches)
    assert value(metrics, "vitserve_batch_size_sum", model="vit") == 10
    assert value(metrics, "vitserve_queue_duration_seconds_count", model="vit") == 10
    assert value(metrics, "vitserve_inference_duration_seconds_count", model="vit") == len(run.batches)
    assert value(metrics, "vitserve_queue_depth", pool="global", model="vit") == 0
    assert value(metrics, "vitserve_pending_tokens", pool="global") == 0
    await batcher.close()


@async_test
async def test_group_keys_batchers_by_model_and_bucket_and_aggregates_pool_gauges() -> None:
    metrics = Metrics()
    group = BatcherGroup(metrics)
    gate = threading.Event()
    small, large, other = RowSums(gate), RowSums(gate), RowSums()
    settings = {"max_batch_size": 4, "max_queue_delay_s": 0.01}
    group.add(small, model="swin", pool="windowed", bucket=4, tokens_per_item=16, **settings)
    group.add(large, model="swin", pool="windowed", bucket=8, tokens_per_item=64, **settings)
    group.add(other, model="vit", pool="global", bucket=4, tokens_per_item=1, **settings)
    with pytest.raises(ValueError, match="already exists"):
        group.add(small, model="swin", pool="windowed", bucket=4)
    with pytest.raises(KeyError, match="known: swin/4, swin/8, vit/4"):
        group.get("swin", 16)

    running = [
        await start_blocked_batch(group.get("swin", 4), small, 1),
        asyncio.create_task(group.get("swin", 8).submit(image(2, bucket=8))),
    ]
    assert await asyncio.to_thread(large.started.wait, 5)
    queued = [asyncio.create_task(group.get("swin", 4).submit(image(i))) for i in (3, 4)]
    await until(lambda: group.queue_depth("windowed") == 2)
    expected_tokens = 3 * 16 + 1 * 64
    assert group.pending_tokens("windowed") == expected_tokens
    assert value(metrics, "vitserve_pending_tokens", pool="windowed") == expected_tokens
    assert value(metrics, "vitserve_queue_depth", pool="windowed", model="swin") == 2
    assert value(metrics, "vitserve_pending_tokens", pool="global") == 0

    gate.set()
    await asyncio.gather(*running, *queued)
    assert value(metrics, "vitserve_pending_tokens", pool="windowed") == 0
    assert value(metrics, "vitserve_queue_depth", pool="windowed", model="swin") == 0
    await group.close()
    assert len(group) == 3


# --- Exact deadlines across the buckets of one pool, bounded memory, hung runtimes, aborted drains. ---


def pool_of_two(
    metrics: Metrics, gate: threading.Event, **settings: Any
) -> tuple[Batcher, Batcher, RowSums, RowSums]:
    """Two buckets of one pool sharing one batch thread, as `ServingState` builds them."""
    shared = ThreadPoolExecutor(1, thread_name_prefix="shared-pool")
    group = BatcherGroup(metrics, **settings)
    small_run, large_run = RowSums(gate), RowSums()
    common = {"pool": "windowed", "max_batch_size": 4, "max_queue_delay_s": 0.0, "executor": shared}
    small = group.add(small_run, model="swin", bucket=BUCKET, **common)
    large = group.add(large_run, model="swin", bucket=2 * BUCKET, **common)
    return small, large, small_run, large_run


@async_test
async def test_a_batch_waiting_behind_another_buckets_batch_still_expires_and_is_never_computed() -> None:
    """The issue's reproduction: a batch handed to the shared thread is not running until the thread starts it."""
    metrics = Metrics()
    gate = threading.Event()
    small, large, small_run, large_run = pool_of_two(metrics, gate)
    blocked = await start_blocked_batch(small, small_run, 1)
    deadline = time.monotonic() + 0.05
    late = [asyncio.create_task(large.submit(image(i, bucket=2 * BUCKET), deadline)) for i in (2, 3, 4)]
    await until(lambda: large.queue_depth == 3)  # handed over or queued, not running
    for task in late:
        with pytest.raises(DeadlineExceeded):
            await task
    assert large.queue_depth == 0 and large.pending_tokens == 0
    gate.set()
    check_own_row(small_run, 1, await blocked)
    assert (await large.submit(image(5, bucket=2 * BUCKET)))["sum"] == 5 * 4 * PIXELS_PER_IMAGE
    assert large_run.computed == [5]
    # The metrics prove it: three requests left the queue, one was computed.
    assert value(metrics, "vitserve_queue_duration_seconds_count", model="swin") == 1 + 3 + 1
    assert value(metrics, "vitserve_batch_size_sum", model="swin") == 2
    await small.close()
    await large.close()


@async_test
async def test_cancelling_a_request_waiting_for_the_shared_thread_withdraws_it_and_leaves_queue_depth() -> (
    None
):
    metrics = Metrics()
    gate = threading.Event()
    small, large, small_run, large_run = pool_of_two(metrics, gate)
    blocked = await start_blocked_batch(small, small_run, 1)
    waiting = {i: asyncio.create_task(large.submit(image(i, bucket=2 * BUCKET))) for i in (2, 3)}
    await until(lambda: large.queue_depth == 2)
    waiting[2].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting[2]
    assert large.queue_depth == 1
    assert value(metrics, "vitserve_queue_depth", pool="windowed", model="swin") == 1
    gate.set()
    await blocked
    assert (await waiting[3])["sum"] == 3 * 4 * PIXELS_PER_IMAGE
    assert large_run.computed == [3]
    await small.close()
    await large.close()


async def submit_and_withdraw(batcher: Batcher, request_id: int, *, expire: bool) -> weakref.ref:
    """Submit one image and let its deadline pass or cancel it; a weak reference to its pixels."""
    pixels = image(request_id)
    ref = weakref.ref(pixels)
    task = asyncio.create_task(batcher.submit(pixels, deadline=time.monotonic() + (0.005 if expire else 5)))
    del pixels
    await asyncio.sleep(0)  # the task's first step queues the request
    assert batcher.queue_depth == 1
    if not expire:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, DeadlineExceeded):
        await task
    return ref


@async_test
async def test_expired_and_cancelled_requests_release_their_pixels_at_once_and_free_their_place() -> None:
    """With a queue of two, forty withdrawn requests neither hold memory nor block the next admission."""
    gate = threading.Event()
    run = RowSums(gate)
    batcher = make(run, max_queue_size=2, max_batch_size=1)
    blocked = await start_blocked_batch(batcher, run, 1)
    refs = [await submit_and_withdraw(batcher, 100 + i, expire=i % 2 == 0) for i in range(40)]
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    assert batcher.queue_depth == 0 and len(batcher._queue) == 0
    second = asyncio.create_task(batcher.submit(image(2)))
    third = asyncio.create_task(batcher.submit(image(3)))
    await until(lambda: batcher.queue_depth == 2)
    with pytest.raises(QueueFull):
        batcher.reserve()
    gate.set()
    await asyncio.gather(blocked, second, third)
    assert run.computed == [1, 2, 3]
    await batcher.close()


@async_test
async def test_a_pools_byte_budget_bounds_admission_across_its_buckets() -> None:
    metrics = Metrics()
    small_bytes = 3 * BUCKET * BUCKET * 4
    small, large, _, _ = pool_of_two(metrics, threading.Event(), max_queue_bytes=5 * small_bytes)
    first = large.reserve()  # 4 small images' worth
    assert value(metrics, "vitserve_queue_bytes", pool="windowed") == 4 * small_bytes
    second = small.reserve()
    with pytest.raises(QueueFull, match="queued bytes"):
        small.reserve()
    with pytest.raises(QueueFull, match="queued bytes"):
        large.reserve()
    first.release()
    with small.reserve(), small.reserve():
        assert small.queue_bytes == 3 * small_bytes
    second.release()
    assert value(metrics, "vitserve_queue_bytes", pool="windowed") == 0
    with pytest.raises(QueueFull, match="3 rows"):
        make(RowSums(), max_queue_size=2).reserve(3)


@async_test
async def test_a_hung_runtime_answers_504_and_keeps_to_its_threads() -> None:
    """The running request times out at its deadline; those behind it expire unrun; no thread is added."""
    gate = threading.Event()
    run = RowSums(gate)
    batcher = make(run, max_batch_size=1)
    threads_before = threading.active_count()
    hung = asyncio.create_task(batcher.submit(image(1), deadline=time.monotonic() + 0.1))
    behind = [
        asyncio.create_task(batcher.submit(image(i), deadline=time.monotonic() + 0.1)) for i in range(2, 12)
    ]
    with pytest.raises(InferenceTimeout):
        await hung
    for task in behind:
        with pytest.raises(DeadlineExceeded):
            await task
    # The batcher's one batch thread and one thread of the loop's executor that copies staged batches.
    assert threading.active_count() <= threads_before + 2
    assert run.computed == [1]
    gate.set()
    check_own_row(run, 12, await batcher.submit(image(12)))
    await batcher.close()


@async_test
async def test_abort_answers_queued_staged_and_running_requests_at_once() -> None:
    gate = threading.Event()
    run = RowSums(gate)
    batcher = make(run, max_batch_size=1)
    running = await start_blocked_batch(batcher, run, 1)
    waiting = [asyncio.create_task(batcher.submit(image(i))) for i in (2, 3, 4)]
    await until(lambda: batcher.queue_depth == 3)
    batcher.abort("drain timed out")
    for task in (running, *waiting):
        with pytest.raises(ShuttingDown, match="drain timed out"):
            await task
    assert batcher.queue_depth == 0
    gate.set()
    await batcher.close()
    assert run.computed == [1]
