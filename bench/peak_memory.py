"""Peak resident memory of serving single images, measured in a fresh process.

A fresh interpreter holds nothing but the runtime, the model and a few batch-1 forward passes,
so its peak RSS is what a serving pod for that (model, size) needs at least. The peak is read from
/proc/self/status VmHWM, the high-water mark of this process's own address space: Linux carries
`ru_maxrss` over fork and exec, so a child's ru_maxrss starts at the parent's size at fork
(here the parent holds every model of the benchmark). The parent calls `peak_rss(...)`; the
child is `python -m bench.peak_memory` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.backends import eager_model, ort_session, random_batch, session_runner, torch_runner
from bench.machine import cores
from export.repository import read_entry
from service.runtimes.ort import OnnxRuntime

# onnxruntime: the benchmarks' session (bench.backends.ort_session); _lean: arena and memory
# pattern off; _served: the service's own runtime class on the artifact's repository entry
# (service.runtimes.ort.OnnxRuntime with its defaults: shared weights, no CPU arena), which runs
# one warm-up call when it loads; _served_pattern: the same with ONNX Runtime's memory pattern on
# (the service's default before bench.mem_pattern measured it).
RUNTIMES = (
    "onnxruntime",
    "onnxruntime_lean",
    "onnxruntime_served",
    "onnxruntime_served_pattern",
    "torch_eager",
)
# ONNX Runtime's resident set keeps growing after the first call (its memory pattern and arena are
# sized from earlier runs), so a single call understates what a serving process holds.
CALLS = 3


def _max_rss_mib() -> float:
    """Peak RSS of this address space (VmHWM, KiB); ru_maxrss where /proc is missing (it may overstate)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(
    runtime: str,
    size: int,
    model: str,
    threads: int,
    artifact: Path | None = None,
    calls: int = CALLS,
    timeout: float = 900,
) -> dict:
    """Run `calls` forward passes of `model` (or the ONNX `artifact`) at size x size in a fresh process."""
    command = [sys.executable, "-m", "bench.peak_memory", runtime, model, str(size)]
    command += ["--threads", str(threads), "--calls", str(calls)]
    if artifact is not None:
        command += ["--artifact", str(artifact)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": f"exit status {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(runtime: str, model: str, size: int, threads: int, artifact: Path | None, calls: int) -> dict:
    torch.set_num_threads(threads)
    pixels = random_batch(1, size)
    if runtime.startswith("onnxruntime") and artifact is None:
        raise SystemExit(f"{runtime} needs --artifact PATH (an exported model.onnx)")
    if runtime.startswith("onnxruntime_served"):
        pattern = runtime == "onnxruntime_served_pattern"
        served = OnnxRuntime(read_entry(artifact.parent.parent), threads, mem_pattern=pattern)
        run = lambda: served.run(pixels)  # noqa: E731
    elif runtime.startswith("onnxruntime"):
        run = session_runner(ort_session(artifact, threads, lean=runtime == "onnxruntime_lean"), pixels)
    else:
        run = torch_runner(eager_model(model), pixels)
    loaded = _max_rss_mib()
    peaks, seconds = [], []
    for _ in range(calls):
        start = time.perf_counter()
        outputs = run()
        seconds.append(round(time.perf_counter() - start, 3))
        peaks.append(round(_max_rss_mib(), 1))
    values = outputs.values() if isinstance(outputs, dict) else outputs
    if not all(np.isfinite(np.asarray(o)).all() for o in values):
        raise SystemExit(f"{model} at {size} produced non-finite outputs")
    return {
        "loaded_rss_mib": round(loaded, 1),
        "first_call_peak_rss_mib": peaks[0],
        "peak_rss_mib": peaks[-1],
        "call_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peak_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("runtime", choices=RUNTIMES)
    parser.add_argument("model")
    parser.add_argument("size", type=int)
    parser.add_argument("--artifact", type=Path)
    parser.add_argument("--threads", type=int, default=cores())
    parser.add_argument("--calls", type=int, default=CALLS)
    args = parser.parse_args(argv)
    print(json.dumps(_measure(args.runtime, args.model, args.size, args.threads, args.artifact, args.calls)))


if __name__ == "__main__":
    main()
