"""Calibrated cost of each repository entry: seconds per batch, by batch size.

The router weighs candidates by these seconds and each batcher's batch limit is the size with the
best measured throughput as served (not the largest that fits: on CPU a large batch is often slower
per image than a medium one, because its activations leave the caches). As served: each batch also
costs the service `BATCH_OVERHEAD_S` beyond its run, so a small entry whose runs cost the same per
image at batch 1 and 4 serves more at 4.

Sources, in order, named in every route as `cost_source`:
- "calibration file": `VITSERVE_CALIBRATION`, YAML `{entry: {batch: seconds}}`, e.g. from a
  benchmark run or from a previous start-up (`vitserve serve` writes what it measured to
  `VITSERVE_CALIBRATION_OUT` when set);
- "measured at start-up": each local entry is timed on its real runtime, batch 1, 2, 4, ... while
  served throughput still grows by `GAIN` and one run stays under `max_run_s` (so the largest shapes are
  measured at batch 1 only and start-up stays bounded);
- "estimated from FLOPs": remote entries nothing measured, at `seconds_per_gflop`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

MEASURED = "measured at start-up"
FILE = "calibration file"
ESTIMATED = "estimated from FLOPs"
# Throughput must grow by this factor for a doubled batch to be worth its latency.
GAIN = 1.05
# What a batch costs the service beyond its run under load: the hops that hand it to its executor
# thread and its results back to the event loop, and the wake-ups of the busy session's workers.
# Measured with ViT-S 224 on 2 cores at c16 (AMD EPYC, 2026-12-04): a served batch took about 4 ms
# plus 2.5 ms per image longer than its raw run (bench/results/batch-limit.json, limits 1 and 4; the
# per-image part, decoding and HTTP beside the run, is the same for every limit and left out here).
BATCH_OVERHEAD_S = 0.004
# One ONNX Runtime CPU core-second does roughly this many GFLOPs on the machines measured (bench/).
DEFAULT_SECONDS_PER_GFLOP = 0.005
TIMED_RUNS = 2


@dataclass(frozen=True)
class EntryCost:
    """Seconds per batch at the measured batch sizes; other sizes are interpolated linearly."""

    seconds: Mapping[int, float]
    source: str

    def __post_init__(self) -> None:
        if not self.seconds or any(b < 1 or s <= 0 for b, s in self.seconds.items()):
            raise ValueError(
                f"calibration needs positive seconds at batch sizes >= 1, got {dict(self.seconds)}"
            )

    def batch_seconds(self, batch: int) -> float:
        """Seconds one batch of `batch` images takes: measured, interpolated, or scaled from the largest."""
        sizes = sorted(self.seconds)
        if batch in self.seconds:
            return self.seconds[batch]
        below = [b for b in sizes if b < batch]
        above = [b for b in sizes if b > batch]
        if not below:
            return self.seconds[sizes[0]] * batch / sizes[0]
        low = below[-1]
        if not above:
            return self.seconds[low] * batch / low
        high = above[0]
        weight = (batch - low) / (high - low)
        return self.seconds[low] * (1 - weight) + self.seconds[high] * weight

    @property
    def best_batch(self) -> int:
        """The measured batch size with the best served throughput; a larger one must beat it by `GAIN`."""
        best = min(self.seconds)
        for batch in sorted(self.seconds):
            if served_rate(batch, self.seconds[batch]) >= GAIN * served_rate(best, self.seconds[best]):
                best = batch
        return best

    def scaled(self, factor: float) -> EntryCost:
        """The same cost with every batch `factor` times as long (same source): see ServedCosts."""
        return EntryCost({b: s * factor for b, s in self.seconds.items()}, self.source)

    def work_seconds(self, items: int, rows: int) -> float:
        """Time to run `items` queued images in batches of at most `rows`."""
        full, rest = divmod(items, rows)
        return full * self.batch_seconds(rows) + (self.batch_seconds(rest) if rest else 0.0)


def served_rate(batch: int, seconds: float) -> float:
    """Images per second the service gets from batches of `batch` that run for `seconds` each."""
    return batch / (seconds + BATCH_OVERHEAD_S)


class ServedCosts:
    """How much longer than calibrated each entry's served batches run, learned while serving.

    Calibration times each entry alone on a quiet process (the faster of two runs), while served
    batches share the cores with decoding and other entries' batches: Swin-T 756x1008 was
    calibrated at 701 ms and took 826 ms served one at a time (README "Routing"). Every served batch
    updates an EWMA of its time over the calibrated time of its size (`SMOOTHING`, clamped to
    `BOUNDS`), and `observe` says when a factor moved by `REPLAN` since `corrected` last applied it,
    so the router is rebuilt on the corrected costs without doing so on every batch. Used on the
    event loop only: batchers report there, and routes and rebuilds run there.
    """

    SMOOTHING = 0.2
    REPLAN = 0.05
    BOUNDS = (0.5, 4.0)

    def __init__(self) -> None:
        self._factors: dict[str, float] = {}
        self._applied: dict[str, float] = {}

    def observe(self, entry: str, cost: EntryCost, batch: int, seconds: float) -> bool:
        """Record one served batch of `entry`; True when its factor moved by REPLAN since applied."""
        low, high = self.BOUNDS
        ratio = min(high, max(low, seconds / cost.batch_seconds(batch)))
        factor = self._factors.get(entry, 1.0)
        factor += self.SMOOTHING * (ratio - factor)
        self._factors[entry] = factor
        return abs(factor / self._applied.get(entry, 1.0) - 1) > self.REPLAN

    def factor(self, entry: str) -> float:
        return self._factors.get(entry, 1.0)

    def corrected(self, costs: Mapping[str, EntryCost]) -> dict[str, EntryCost]:
        """`costs` scaled by each entry's factor; the factors used count as applied."""
        self._applied = dict(self._factors)
        return {name: cost.scaled(self.factor(name)) for name, cost in costs.items()}


def estimated_cost(flops: int, seconds_per_gflop: float | None) -> EntryCost:
    """Cost from FLOPs when nothing was measured (batch cost proportional to the batch)."""
    rate = seconds_per_gflop or DEFAULT_SECONDS_PER_GFLOP
    return EntryCost({1: flops / 1e9 * rate}, ESTIMATED)


def measure(
    run: Callable[[np.ndarray], object], input_shape: tuple[int, ...], max_batch: int, max_run_s: float
) -> EntryCost:
    """Time `run` on zero batches of growing size (see the module docstring); the runtime is warm."""
    seconds: dict[int, float] = {}
    batch = 1
    while batch <= max_batch:
        data = np.zeros((batch, *input_shape), np.float32)
        run(data)
        timings = []
        for _ in range(TIMED_RUNS):
            started = time.perf_counter()
            run(data)
            timings.append(time.perf_counter() - started)
        seconds[batch] = min(timings)
        best = max(served_rate(b, s) for b, s in seconds.items() if b < batch) if batch > 1 else 0.0
        if seconds[batch] > max_run_s or served_rate(batch, seconds[batch]) < best * GAIN:
            break
        batch *= 2
    return EntryCost(seconds, MEASURED)


def read_calibration(path: Path) -> dict[str, EntryCost]:
    """`{entry: {batch: seconds}}` from YAML; errors name the file and the bad item."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read calibration file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"calibration file {path} must map entry names to {{batch: seconds}}")
    costs = {}
    for entry, seconds in data.items():
        try:
            costs[str(entry)] = EntryCost({int(b): float(s) for b, s in dict(seconds).items()}, FILE)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"calibration file {path}: entry {entry!r} needs {{batch: seconds}}: {exc}"
            ) from exc
    return costs


def write_calibration(path: Path, costs: Mapping[str, EntryCost]) -> None:
    """Save measured costs in the format `read_calibration` reads."""
    data = {
        entry: {int(b): float(s) for b, s in sorted(c.seconds.items())} for entry, c in sorted(costs.items())
    }
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


__all__ = ["EntryCost", "estimated_cost", "measure", "read_calibration", "write_calibration"]
