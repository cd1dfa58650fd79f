"""What sharing weights across an entry's sessions costs in speed (`VITSERVE_ORT_SHARE_WEIGHTS`),
and what mapping pre-packed ones from a cache buys back (`VITSERVE_ORT_PREPACKED_CACHE`).

The embedded runtime gives all sessions of a backbone one copy of its weights (README "Memory").
ONNX Runtime's Python API cannot share pre-packed weights between sessions (the C API's
PrepackedWeightsContainer is not exposed), so a shared weight must stay in its ONNX layout: the
service turns pre-packing off (`session.disable_prepacking`), and MatMul and Gemm kernels then work
from the plain layout on every run instead of the blocked one they pack once at load. The prepacked
cache (service.runtimes.ort_prepacked) maps the packed layouts ONNX Runtime saved once instead. This
measures each entry in `--entries` at each batch in `--batches`, in the service's runtime class
(`service.runtimes.ort.OnnxRuntime`, ONNX Runtime's default spinning) with shared weights (the
default), private pre-packed ones, and mapped pre-packed ones (cache built in `--cache`, a fresh
temporary directory by default), every cell interleaved with every other (bench.timing).

    .venv/bin/python -m bench.prepacking --repository model_repository \
        [--entries vit_global_224 swin_windowed_448] [--batches 1 4] [--rounds 4 --seconds 8]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np

from bench.backends import setting_cells
from bench.machine import machine_info
from bench.plots import paired_bars
from bench.results import publish
from bench.timing import STATISTIC, Runner, TimingPlan, add_run_arguments, noise, time_cells
from export.repository import ModelEntry
from service.runtimes.ort import OnnxRuntime
from service.runtimes.ort_prepacked import PrepackedCache

SHARED, PRIVATE, MAPPED = (
    "shared, not pre-packed (default)",
    "private, pre-packed",
    "mapped, pre-packed (cache)",
)


def weight_settings(cache: Path) -> dict[str, dict[str, Any]]:
    """Setting name -> OnnxRuntime keyword arguments."""
    return {
        SHARED: {"share_weights": True},
        PRIVATE: {"share_weights": False},
        MAPPED: {"prepacked": PrepackedCache(cache)},
    }


def latency_cells(
    repository: Path, names: list[str], batches: list[int], threads: int, cache: Path
) -> dict[tuple, Runner]:
    """(entry, batch, setting) -> runner on the service's runtime class."""

    def weights(entry: ModelEntry) -> dict[str, Callable[[np.ndarray], Runner]]:
        runtimes = {
            setting: OnnxRuntime(entry, threads, "always", **kwargs)
            for setting, kwargs in weight_settings(cache).items()
        }
        return {setting: partial(_runner, runtime) for setting, runtime in runtimes.items()}

    return setting_cells(repository, names, batches, weights)


def _runner(runtime: OnnxRuntime, pixels: np.ndarray) -> Runner:
    return lambda: runtime.run(pixels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prepacking", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--entries", nargs="+", default=["vit_global_224", "swin_windowed_448"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument(
        "--cache", type=Path, help="pre-packed cache directory (default: a fresh temporary one)"
    )
    add_run_arguments(parser, rounds=4, seconds=8.0, name="prepacking")
    args = parser.parse_args(argv)
    machine = machine_info("bench.prepacking")
    plan = TimingPlan(rounds=args.rounds, seconds=args.seconds, min_calls=2, first_warmup_calls=1)
    with TemporaryDirectory(prefix="prepacked-") as scratch:
        cells = latency_cells(
            args.repository, args.entries, args.batches, args.threads, args.cache or Path(scratch)
        )
        timings = time_cells(cells, plan)
    rows = [
        {"entry": entry, "batch": batch, "weights": setting} | timing.summary(batch)
        for (entry, batch, setting), timing in timings.items()
    ]
    ms = {(r["entry"], r["batch"], r["weights"]): r["ms_p50"] for r in rows}
    keys = [(entry, batch) for entry, batch, setting in ms if setting == SHARED]
    summary = {
        f"{label}_vs_private_ms": {
            f"{entry} batch {batch}": round(ms[entry, batch, setting] / ms[entry, batch, PRIVATE], 3)
            for entry, batch in keys
        }
        for label, setting in (("shared", SHARED), ("mapped", MAPPED))
    } | {"noise": noise(rows)}
    run_settings = {
        "repository": str(args.repository),
        "entries": args.entries,
        "batches": args.batches,
        "threads": args.threads,
        "runtime": "service.runtimes.ort.OnnxRuntime, spinning always, CPU arena and memory pattern off",
        "timing": asdict(plan) | {"statistic": STATISTIC},
    }

    def plot(png: Path) -> None:
        settings = (PRIVATE, SHARED, MAPPED)
        paired_bars(
            [f"{entry}\nbatch {batch}" for entry, batch in keys],
            [tuple(ms[entry, batch, setting] for setting in settings) for entry, batch in keys],
            settings,
            "ms per batch (p50)",
            f"Weights shared, private or mapped pre-packed: {machine['cores']} threads, {machine['date'][:10]}",
            png,
        )

    publish(args, machine, run_settings, rows, summary, plot)


if __name__ == "__main__":
    main()
