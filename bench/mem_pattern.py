"""ONNX Runtime's memory pattern on and off, in sessions configured as the service serves (no CPU arena).

With the memory pattern on, ONNX Runtime plans one block per run from the tensor sizes of earlier
runs and allocates it whole; off, each tensor is allocated when it is produced and freed when its
last consumer ran. Issue 8 bounds the peak of a 2048x2048 image served natively on the windowed
backbone at 4 GiB, and the pattern was the largest lever left (`peak-2072.json`), so this measures
what turning it off costs where the service runs:

- Latency: each repository entry in `--entries` at each batch in `--batches`, pattern on and off,
  every cell interleaved with every other (bench.timing), so each on/off ratio is measured under
  the same load.
- Peak: each artifact in `--peak` (an exported entry's model.onnx) served by the service's runtime
  class (bench.peak_memory `onnxruntime_served` and `onnxruntime_served_pattern`), one fresh process
  per cell.

    .venv/bin/python -m bench.mem_pattern --repository model_repository \
        --entries vit_global_224 swin_windowed_448 swin_windowed_896 \
        [--peak REPO/swin_windowed_2072/1/model.onnx] [--batches 1 4] [--rounds 4 --seconds 8]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np

from bench.backends import ort_runner, ort_session, setting_cells
from bench.machine import machine_info
from bench.peak_memory import peak_rss
from bench.plots import paired_bars
from bench.results import publish
from bench.timing import STATISTIC, Runner, TimingPlan, add_run_arguments, noise, time_cells
from export.repository import ModelEntry, read_entry

PATTERN = {"on": True, "off": False}
PEAK_RUNTIMES = {"on": "onnxruntime_served_pattern", "off": "onnxruntime_served"}


def latency_cells(
    repository: Path, names: list[str], batches: list[int], threads: int
) -> dict[tuple, Runner]:
    """(entry, batch, pattern) -> runner, on sessions without the CPU arena as the service runs them."""

    def patterns(entry: ModelEntry) -> dict[str, Callable[[np.ndarray], Runner]]:
        return {
            state: partial(ort_runner, ort_session(entry.artifact, threads, lean=True, mem_pattern=on), entry)
            for state, on in PATTERN.items()
        }

    return setting_cells(repository, names, batches, patterns)


def peak_rows(artifacts: list[Path], threads: int, calls: int) -> list[dict]:
    """Peak RSS of batch-1 calls served by OnnxRuntime with the pattern on and off, one process each."""
    rows = []
    for artifact in artifacts:
        entry = read_entry(artifact.parent.parent)
        height, width = entry.shape
        if height != width:
            raise SystemExit(
                f"--peak takes square entries (bench.peak_memory), {entry.name} is {height}x{width}"
            )
        for state, runtime in PEAK_RUNTIMES.items():
            result = peak_rss(runtime, height, entry.arch, threads, artifact, calls)
            rows.append({"measurement": "peak", "entry": entry.name, "pattern": state, **result})
    return rows


def summarize(rows: list[dict]) -> dict:
    """off / on per latency cell (below 1: off is faster) and off - on peak MiB per artifact."""
    ms = {(r["entry"], r["batch"], r["pattern"]): r["ms_p50"] for r in rows if r["measurement"] == "latency"}
    peaks = {(r["entry"], r["pattern"]): r.get("peak_rss_mib") for r in rows if r["measurement"] == "peak"}
    return {
        "off_vs_on_ms": {
            f"{entry} batch {batch}": round(value / ms[(entry, batch, "on")], 3)
            for (entry, batch, state), value in ms.items()
            if state == "off"
        },
        "peak_rss_mib": {f"{entry} pattern {state}": value for (entry, state), value in peaks.items()},
        "noise": noise([r for r in rows if r["measurement"] == "latency"]),
    }


def plot(rows: list[dict], machine: dict, path: Path) -> None:
    latency = {
        (r["entry"], r["batch"], r["pattern"]): r["ms_p50"] for r in rows if r["measurement"] == "latency"
    }
    keys = [key[:2] for key in latency if key[2] == "on"]
    paired_bars(
        [f"{entry}\nbatch {batch}" for entry, batch in keys],
        [(latency[(*key, "on")], latency[(*key, "off")]) for key in keys],
        ("memory pattern on", "memory pattern off"),
        "ms per batch (p50)",
        f"ONNX Runtime memory pattern, no CPU arena: {machine['cores']} threads, {machine['date'][:10]}",
        path,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.mem_pattern", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument(
        "--entries", nargs="+", default=["vit_global_224", "swin_windowed_448", "swin_windowed_896"]
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--peak", nargs="*", type=Path, default=[], help="model.onnx of square entries")
    parser.add_argument("--peak-calls", type=int, default=2)
    add_run_arguments(parser, rounds=4, seconds=8.0, name="mem-pattern")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info("bench.mem_pattern")
    plan = TimingPlan(rounds=args.rounds, seconds=args.seconds, min_calls=2, first_warmup_calls=1)
    peaks = peak_rows(args.peak, args.threads, args.peak_calls)
    timings = time_cells(latency_cells(args.repository, args.entries, args.batches, args.threads), plan)
    rows = peaks + [
        {"measurement": "latency", "entry": entry, "batch": batch, "pattern": state} | timing.summary(batch)
        for (entry, batch, state), timing in timings.items()
    ]
    summary = summarize(rows)
    run_settings = {
        "repository": str(args.repository),
        "entries": args.entries,
        "batches": args.batches,
        "peak_artifacts": [str(p) for p in args.peak],
        "threads": args.threads,
        "ort": {"provider": "CPUExecutionProvider", "cpu_arena": False, "graph_optimization": "ALL"},
        "timing": asdict(plan) | {"statistic": STATISTIC},
    }
    publish(args, machine, run_settings, rows, summary, lambda png: plot(rows, machine, png))


if __name__ == "__main__":
    main()
