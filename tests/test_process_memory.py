"""`release_freed_memory` hands pages freed on the heap back to the OS (glibc malloc_trim), and
`VITSERVE_MALLOC_MMAP_THRESHOLD_KIB` fixes the size from which freed blocks are unmapped at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.process_memory import release_freed_memory
from support.server import running_server, start_server

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


# In a fresh interpreter: a 16 MiB block mapped and freed raises glibc's dynamic threshold to 16 MiB,
# so a 4 MiB block then comes from the heap and stays resident after free() (a small block allocated
# after it keeps it off the heap's top); with a fixed 1 MiB threshold it is mapped and unmapped.
FREE_PROBE = """
import ctypes, sys
from pathlib import Path
from service.process_memory import set_mmap_threshold

def resident_kib():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1])

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] != "dynamic":
    assert set_mmap_threshold(int(sys.argv[1]))
libc.free(libc.malloc(16 << 20))
block = libc.malloc(4 << 20)
ctypes.memset(block, 1, 4 << 20)
pin = libc.malloc(64 << 10)
before = resident_kib()
libc.free(block)
print(before - resident_kib())
"""


def _released_kib(threshold: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", FREE_PROBE, threshold],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return int(done.stdout)


def test_a_fixed_mmap_threshold_unmaps_freed_blocks_at_once() -> None:
    assert _released_kib("dynamic") < 512
    assert _released_kib("1024") >= 4000


def test_the_server_applies_the_mmap_threshold_setting(tmp_path: Path, photo_repository: Path) -> None:
    with running_server(tmp_path, repository=photo_repository, malloc_mmap_threshold_kib=4096) as server:
        assert httpx.get(f"{server.url}/v1/models").status_code == 200
        assert '"kib": 4096' in server.log()
    with pytest.raises(RuntimeError, match="malloc_mmap_threshold_kib"):
        start_server(tmp_path, repository=photo_repository, malloc_mmap_threshold_kib=2)
