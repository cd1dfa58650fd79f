"""Lanes: how the local batches of one pool share its cores.

One batch at a time on every intra-op thread is the fastest way to run a lone request, but under load
it loses throughput: each operator's parallel loop waits for its slowest thread, and on a small
machine one of them is always being preempted by the gateway's decode, HTTP and client threads.
So a pool runs up to `lanes` batches at once: a batch that starts while nothing else of its pool is
running takes the wide session (all threads); one that starts beside another takes a narrow session
of threads / lanes threads, which never waits for a thread it does not own. Under steady load the
pool settles into `lanes` narrow batches side by side; at low load every batch runs wide.
README "Configuration" (`VITSERVE_ORT_LANES`) gives the measured effect.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class PoolLanes:
    """The batches of one pool running now, shared by the runtimes of the pool's local entries."""

    def __init__(self, lanes: int, on_beside: Callable[[], None] | None = None) -> None:
        """`on_beside` is called for each batch that starts while another runs (a metric's inc)."""
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        self.lanes = lanes
        self._on_beside = on_beside
        self._running = 0
        self._lock = threading.Lock()

    @contextmanager
    def batch(self) -> Iterator[bool]:
        """Hold a lane for one batch; yields True when the batch starts alone (it may take every thread)."""
        with self._lock:
            alone = self._running == 0
            self._running += 1
        if not alone and self._on_beside is not None:
            self._on_beside()
        try:
            yield alone
        finally:
            with self._lock:
                self._running -= 1


__all__ = ["PoolLanes"]
