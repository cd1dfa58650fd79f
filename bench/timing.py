"""Latency measurement that holds up on a shared, noisy machine.

Every cell (one runtime on one model, size and batch) is timed in several rounds, and the
rounds visit the cells in turn, so a burst of load from another process spreads over all cells
instead of skewing one of them. Before each visit the cell waits a moment (other runtimes'
worker threads stop spinning) and warms up again.

The headline latency is the median of the quietest round (the lowest per-round median): other
processes only ever add time, and with every cell visited in several rounds, each gets the same
chances to be timed while the machine is quiet. The median over all rounds and the spread of the
per-round medians are reported beside it, as the noise the run saw.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

from bench.machine import cores
from bench.results import add_output_arguments
from export.progress import Progress

Runner = Callable[[], object]
STATISTIC = (
    "ms_p50: median latency of the quietest round (lowest per-round median); *_all_rounds: over every call"
)


@dataclass(frozen=True)
class TimingPlan:
    """How long to time each cell: `seconds` in total over `rounds` visits, at least `min_calls` per visit.

    Each visit first warms up for `warmup_seconds` (at least one call; none when 0, for cells so
    slow that one call dwarfs any warm-up effect).
    """

    rounds: int = 6
    seconds: float = 3.0
    min_calls: int = 2
    first_warmup_calls: int = 3
    warmup_seconds: float = 0.3
    pause_seconds: float = 0.2

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.seconds <= 0 or self.min_calls < 1:
            raise ValueError(f"timing plan needs rounds >= 1, seconds > 0 and min_calls >= 1, got {self}")


@dataclass
class Timing:
    """Seconds per call of one cell, over all rounds."""

    samples: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median of the quietest round: the headline latency."""
        return min(self.round_medians)

    @property
    def median_all(self) -> float:
        return statistics.median(self.samples)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    @property
    def round_spread(self) -> float:
        """(slowest - fastest round median) / fastest: how much the run drifted while this cell was timed."""
        return (max(self.round_medians) - min(self.round_medians)) / self.median

    def summary(self, batch: int) -> dict[str, float | int]:
        return {
            "ms_p50": round(self.median * 1e3, 3),
            "img_per_s": round(batch / self.median, 2),
            "ms_p50_all_rounds": round(self.median_all * 1e3, 3),
            "ms_p10_all_rounds": round(self.quantile(0.1) * 1e3, 3),
            "ms_p90_all_rounds": round(self.quantile(0.9) * 1e3, 3),
            "calls": len(self.samples),
            "round_spread": round(self.round_spread, 4),
            "all_rounds_excess": round(self.median_all / self.median - 1, 4),
        }


def call_until(runner: Runner, seconds: float, min_calls: int) -> list[float]:
    """Seconds of each call of `runner`, called for `seconds` and at least `min_calls` times."""
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_calls or time.perf_counter() - start < seconds:
        begin = time.perf_counter()
        runner()
        samples.append(time.perf_counter() - begin)
    return samples


def time_cells(cells: Mapping[Hashable, Runner], plan: TimingPlan) -> dict[Hashable, Timing]:
    """Time every runner in `cells` under `plan`, visiting the cells in turn each round.

    Each timed cell is a progress step (see export.progress: on a terminal, not under CI).
    """
    progress = Progress(plan.rounds * len(cells))
    for runner in cells.values():
        for _ in range(plan.first_warmup_calls):
            runner()
    timings = {key: Timing() for key in cells}
    for round_index in range(plan.rounds):
        for key, runner in cells.items():
            time.sleep(plan.pause_seconds)
            call_until(runner, plan.warmup_seconds, 0)
            samples = call_until(runner, plan.seconds / plan.rounds, plan.min_calls)
            timings[key].samples.extend(samples)
            timings[key].round_medians.append(statistics.median(samples))
            progress.step(
                f"round {round_index + 1}/{plan.rounds} {key}: {statistics.median(samples) * 1e3:.2f} ms"
            )
    return timings


def noise(rows: list[dict]) -> dict[str, float]:
    """How much other load disturbed a run: per-cell excess of the all-rounds median over the quietest
    round's, and the slowest/fastest round ratio, as median and maximum over the timed rows."""
    timed = [r for r in rows if "round_spread" in r]
    result = {}
    for key in ("all_rounds_excess", "round_spread"):
        values = [r[key] for r in timed]
        result[f"median_{key}"] = round(statistics.median(values), 4)
        result[f"max_{key}"] = max(values)
    return result


def add_run_arguments(
    parser: argparse.ArgumentParser, rounds: int, seconds: float, name: str | None = None
) -> None:
    """Options every latency benchmark takes: timing plan, threads and output (`add_output_arguments`)."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument(
        "--seconds", type=float, default=seconds, help="timed seconds per cell over all rounds"
    )
    parser.add_argument(
        "--threads", type=int, default=cores(), help="intra-op threads of every runtime (default: the cores)"
    )
    add_output_arguments(parser, name)
