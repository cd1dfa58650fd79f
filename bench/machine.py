"""Describe the machine and the run, so every result file says where and how its numbers were taken."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cores() -> int:
    """CPUs this process may run on: the thread count every runtime is given."""
    return len(os.sched_getaffinity(0))


def _cpuinfo() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", []
    fields = dict(
        line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith(" ")
    )
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model = fields.get("model name", "unknown")
    family = fields.get("cpu family")
    if family:
        model = f"{model} (family {family}, model {fields.get('model', '?')})"
    flags = fields.get("flags", "").split()
    return model, [f for f in SIMD_FLAGS if f in flags]


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    """1/5/15-minute load: the machine is shared, so each file records how busy it was."""
    return [round(x, 2) for x in os.getloadavg()]


def command(module: str) -> str:
    """The command line that reproduces this run, with the interpreter relative to the repository root."""
    python = Path(sys.executable)
    try:
        python = python.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join([str(python), "-m", module, *sys.argv[1:]])


def machine_info(module: str) -> dict[str, Any]:
    """Hardware, library versions, date and command of this run."""
    model, simd = _cpuinfo()
    return {
        "cpu_model": model,
        "cpu_simd": simd,
        "cores": cores(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command(module),
        "load_average_start": load_average(),
    }
