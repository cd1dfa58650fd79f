"""`release_freed_memory` hands pages freed on the heap back to the OS (glibc malloc_trim)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.process_memory import release_freed_memory

# Arrays under glibc's mmap threshold (128 KiB) live on the heap, where free() keeps their pages.
SMALL_ARRAY_FLOATS = 8_000
ARRAYS = 20_000  # 1.28 GB of float64 in all


def _resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_freed_heap_pages_go_back_to_the_os() -> None:
    arrays = [np.ones(SMALL_ARRAY_FLOATS) for _ in range(ARRAYS)]
    held = _resident_mib()
    # Free all but the last array, so the heap's top stays in use and only a trim can release the rest.
    del arrays[:-1]
    freed_but_kept = _resident_mib()
    assert release_freed_memory()
    trimmed = _resident_mib()
    assert freed_but_kept > held - 200, (held, freed_but_kept)
    assert trimmed < freed_but_kept - 1000, (freed_but_kept, trimmed)
