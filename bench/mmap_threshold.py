"""What a fixed glibc mmap threshold (`VITSERVE_MALLOC_MMAP_THRESHOLD_KIB`) costs per batch.

glibc's default threshold is dynamic: it rises to the size of each mapped block freed (up to 32
MiB), so a session's mid-size tensors soon come from the heap and are reused run after run. A fixed
threshold maps and unmaps every tensor above it, so each run faults those pages in afresh, which
lowers what a native-resolution request leaves resident (bench.memory, `memory-native-2048-*.json`)
and costs time on every shape whose tensors fall between the two. Once fixed, a process cannot go
back to the dynamic threshold, so every (round, setting) is a fresh child process that applies the
setting the way `vitserve serve` does (`service.process_memory.set_mmap_threshold`), loads the
entries in the service's runtime class (`OnnxRuntime`, the spinning session) and times each at
batch 1; the settings alternate round by round. Headline: median of the quietest round per cell.

    .venv/bin/python -m bench.mmap_threshold --repository model_repository \
        [--entries vit_global_224 swin_windowed_448 swin_windowed_896] [--kib 4096] [--rounds 4]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.backends import random_batch
from bench.machine import machine_info
from bench.plots import paired_bars
from bench.results import publish
from bench.timing import add_run_arguments, call_until
from export.repository import read_entry
from service.process_memory import set_mmap_threshold
from service.runtimes.ort import IDLE_SPINNING, OnnxRuntime

DYNAMIC = "dynamic"
WARMUP_CALLS = 2
MIN_CALLS = 3


def child(repository: Path, entries: list[str], setting: str, seconds: float, threads: int) -> dict:
    """Seconds per batch-1 call of each entry in this process, under `setting` (KiB or dynamic)."""
    if setting != DYNAMIC and not set_mmap_threshold(int(setting)):
        raise SystemExit("mallopt is not available: this C library is not glibc")
    samples: dict[str, list[float]] = {}
    for name in entries:
        entry = read_entry(repository / name)
        run = functools.partial(OnnxRuntime(entry, threads, IDLE_SPINNING).run, random_batch(1, entry.shape))
        call_until(run, 0, WARMUP_CALLS)
        samples[name] = call_until(run, seconds, MIN_CALLS)
    return samples


def _run_child(args: argparse.Namespace, setting: str) -> dict[str, list[float]]:
    command = [sys.executable, "-m", "bench.mmap_threshold", "--child", setting]
    command += ["--repository", str(args.repository), "--seconds", str(args.seconds / args.rounds)]
    command += ["--threads", str(args.threads), "--entries", *args.entries]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> list[dict]:
    settings = [DYNAMIC, *(str(k) for k in args.kib)]
    rounds: dict[tuple[str, str], list[list[float]]] = {(e, s): [] for e in args.entries for s in settings}
    for _ in range(args.rounds):
        for setting in settings:
            for name, times in _run_child(args, setting).items():
                rounds[(name, setting)].append(times)
    rows = []
    for (name, setting), visits in rounds.items():
        medians = [statistics.median(v) for v in visits]
        every = [t for v in visits for t in v]
        rows.append(
            {
                "entry": name,
                "mmap_threshold_kib": setting,
                "ms_p50": round(min(medians) * 1e3, 3),
                "ms_p50_all_rounds": round(statistics.median(every) * 1e3, 3),
                "round_spread": round((max(medians) - min(medians)) / min(medians), 4),
                "calls": len(every),
            }
        )
    return rows


def summarize(rows: list[dict]) -> dict:
    """Each fixed threshold's ms over the dynamic threshold's, per entry (above 1: the fixed one is slower)."""
    ms = {(r["entry"], r["mmap_threshold_kib"]): r["ms_p50"] for r in rows}
    return {
        "fixed_vs_dynamic_ms": {
            f"{entry} {setting} KiB": round(value / ms[(entry, DYNAMIC)], 3)
            for (entry, setting), value in ms.items()
            if setting != DYNAMIC
        },
        "max_round_spread": max(r["round_spread"] for r in rows),
    }


def plot(rows: list[dict], machine: dict, path: Path) -> None:
    ms = {(r["entry"], r["mmap_threshold_kib"]): r["ms_p50"] for r in rows}
    fixed = [key for key in ms if key[1] != DYNAMIC]
    paired_bars(
        [f"{entry}\n{setting} KiB" for entry, setting in fixed],
        [(ms[(entry, DYNAMIC)], ms[(entry, setting)]) for entry, setting in fixed],
        ("glibc dynamic threshold", "fixed threshold"),
        "ms per batch-1 call (p50)",
        f"glibc mmap threshold, ONNX Runtime: {machine['cores']} threads, {machine['date'][:10]}",
        path,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mmap_threshold", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument(
        "--entries", nargs="+", default=["vit_global_224", "swin_windowed_448", "swin_windowed_896"]
    )
    parser.add_argument("--kib", nargs="+", type=int, default=[4096], help="fixed thresholds to compare")
    add_run_arguments(parser, rounds=4, seconds=24.0, name="mmap-threshold")
    parser.add_argument("--child", metavar="SETTING", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.repository, args.entries, args.child, args.seconds, args.threads)))
        return
    machine = machine_info("bench.mmap_threshold")
    rows = measure(args)
    run_settings = {
        "repository": str(args.repository),
        "entries": args.entries,
        "kib": args.kib,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "threads": args.threads,
        "batch": 1,
        "runtime": "service.runtimes.ort.OnnxRuntime, spinning session",
        "statistic": "ms_p50: median of the quietest round (one fresh process per round and setting)",
    }
    summary = summarize(rows)
    publish(args, machine, run_settings, rows, summary, lambda png: plot(rows, machine, png))


if __name__ == "__main__":
    main()
