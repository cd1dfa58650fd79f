"""Worker threads named in the operating system as they are in Python.

Python 3.11 leaves every thread's OS name as the process's ("python"), so `top -H`, `perf`,
`py-spy` and /proc/PID/task/*/comm cannot tell a decode thread from a batch thread or an ONNX
Runtime worker. Each executor of the gateway names its threads when they start.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Linux keeps 15 bytes of a thread's name.
OS_NAME_BYTES = 15


def name_os_thread() -> None:
    """Give the calling thread's OS name its Python name (cut to OS_NAME_BYTES); nothing without /proc."""
    name = threading.current_thread().name.encode()[:OS_NAME_BYTES]
    try:
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_bytes(name)
    except OSError:
        pass


def named_executor(workers: int, prefix: str) -> ThreadPoolExecutor:
    """A ThreadPoolExecutor whose threads `<prefix>_<n>` carry that name in the OS too."""
    return ThreadPoolExecutor(workers, thread_name_prefix=prefix, initializer=name_os_thread)
