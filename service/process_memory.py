"""Give memory freed by large batches back to the operating system (glibc's `malloc_trim`), and
optionally fix the size from which glibc maps allocations on their own (`mallopt`).

ONNX Runtime runs here without its CPU arena, so a session's activations are freed after every run,
but glibc keeps freed heap pages mapped for reuse: after start-up calibration, whose largest batches
are the biggest allocations a server makes, an idle gateway held 1,458 MiB for seven sessions where
1,033 MiB were live (bench/memory.py, README "Memory"). `malloc_trim(0)` returns those pages. It is
called after work known to allocate far more than steady serving (calibration), not per batch,
since trimming costs a walk of the heap. Elsewhere than glibc it does nothing.

glibc's mmap threshold starts at 128 KiB and rises to the size of each mapped block freed, up to
32 MiB, so after a few runs a session's tensors of up to 32 MiB come from the heap, where freed
blocks of one run are not always reusable by the next (fragmentation) and stay resident. A fixed
threshold (`VITSERVE_MALLOC_MMAP_THRESHOLD_KIB`) maps every tensor above it and unmaps it when freed.
At 4096 KiB a server with a 2072x2072 Swin-T entry peaked 552 MiB lower at start-up and 44 MiB lower
serving it, at 1.13x and 1.28x the time per batch on Swin-T 448 and 896, where every run then faults
its tensors in afresh (README "Memory", bench/mmap_threshold.py); so it is for pods that serve
native-resolution shapes, not a default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt's parameter number for the mmap threshold (malloc.h).
M_MMAP_THRESHOLD = -3


@functools.cache
def _libc_function(name: str):
    """`name` from the C library, None where it has none (malloc_trim and mallopt are glibc's; musl has neither)."""
    path = ctypes.util.find_library("c")
    library = ctypes.CDLL(path) if path else None
    return getattr(library, name, None)


def release_freed_memory() -> bool:
    """Return freed heap pages to the OS; True when glibc released any."""
    trim = _libc_function("malloc_trim")
    return bool(trim(0)) if trim is not None else False


def set_mmap_threshold(kib: int) -> bool:
    """Map every allocation of at least `kib` KiB on its own from now on (glibc's dynamic threshold
    off); True when the C library took it."""
    mallopt = _libc_function("mallopt")
    return bool(mallopt(M_MMAP_THRESHOLD, kib * 1024)) if mallopt is not None else False
