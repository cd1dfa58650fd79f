"""Give memory freed by large batches back to the operating system (glibc's `malloc_trim`).

ONNX Runtime runs here without its CPU arena, so a session's activations are freed after every run,
but glibc keeps freed heap pages mapped for reuse: after start-up calibration, whose largest batches
are the biggest allocations a server makes, an idle gateway held 1,458 MiB for seven sessions where
1,033 MiB were live (bench/memory.py, README "Memory"). `malloc_trim(0)` returns those pages. It is
called after work known to allocate far more than steady serving (calibration), not per batch,
since trimming costs a walk of the heap. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return getattr(library, "malloc_trim", None)


def release_freed_memory() -> bool:
    """Return freed heap pages to the OS; True when glibc released any."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
