"""Served throughput by batch limit, all limits in one interleaved run (issue 8, item 5).

Each entry's batch limit comes from start-up calibration (`service/calibration.py`: the batch with
the best throughput as served, counting `BATCH_OVERHEAD_S` per batch), and on ViT-S 224 batches 1,
2, 4 and 8 run within a few percent of each other per image, so which one start-up picks is partly
noise. This benchmark asks whether that choice matters under load: one `vitserve serve` per limit
in `--limits`, all up at once on the same repository as bench.serving (the global backbone's 224
entry), each given the limit through a `VITSERVE_CALIBRATION` file whose costs make that batch the
best by the calibration's own rule (`forcing_costs`; the route is forced, so the costs decide
nothing else). Then `hey` at c16 and c64 for `--load-seconds`, every server in turn, in
`--load-rounds` rounds; headline = median img/s over rounds, and each limit's ratio to the best
limit of the same concurrency.

    .venv/bin/python -m bench.batch_limit            # needs `hey` (apt-get install hey)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from statistics import median

import httpx

from bench.http import hey, vitserve
from bench.machine import cores, machine_info
from bench.results import add_output_arguments, write_results
from bench.serving import LOADS, prepare
from service.calibration import EntryCost, write_calibration

LIMITS = (1, 2, 4, 8)
# Seconds per image of the forcing costs: any positive value, only their ratios matter.
UNIT_S = 0.02


def forcing_costs(limit: int) -> EntryCost:
    """Costs whose best batch is `limit`: every smaller power of two at UNIT_S per image, `limit` at half."""
    seconds = {b: b * UNIT_S for b in (1 << i for i in range(limit.bit_length() - 1))}
    seconds[limit] = limit * UNIT_S / 2
    cost = EntryCost(seconds, "calibration file")
    if cost.best_batch != limit:
        raise AssertionError(f"forcing costs {seconds} give batch {cost.best_batch}, not {limit}")
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", default=",".join(map(str, LIMITS)), help="batch limits served")
    parser.add_argument("--load-seconds", type=float, default=8, help="duration of each hey run")
    parser.add_argument("--load-rounds", type=int, default=3, help="rounds of hey runs per limit and load")
    parser.add_argument("--threads", type=int, default=cores(), help="intra-op threads of every server")
    parser.add_argument(
        "--repository", type=Path, help="reuse a repository bench.serving exported (default: export one)"
    )
    add_output_arguments(parser, "batch-limit")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("hey is not installed: apt-get install hey")
    limits = [int(limit) for limit in args.limits.split(",")]
    machine = machine_info("bench.batch_limit")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repository, entry, body = prepare(root, args.repository)
        path = f"/v1/classify?route=global&bucket={entry.bucket}"
        with ExitStack() as stack:
            servers = {}
            for limit in limits:
                calibration = root / f"calibration-{limit}.yaml"
                write_calibration(calibration, {entry.name: forcing_costs(limit)})
                settings = {"intra_op_threads": args.threads, "calibration": calibration}
                servers[limit] = server = stack.enter_context(vitserve(repository, settings))
                models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["models"]
                served = next(m["max_batch_size"] for m in models if m["name"] == entry.name)
                if served != limit:
                    raise SystemExit(f"the server given batch limit {limit} batches up to {served}")
            rows = [
                {"limit": limit, "round": load_round, **hey(server.url + path, body, c, args.load_seconds)}
                for load_round in range(args.load_rounds)
                for limit, server in servers.items()
                for c in LOADS
            ]
    summary = _summary(rows, limits)
    run_settings = {
        "entry": entry.name,
        "limits": limits,
        "loads": LOADS,
        "load_seconds": args.load_seconds,
        "load_rounds": args.load_rounds,
        "threads": args.threads,
        "image": "skimage astronaut resized to 224x224 JPEG, forced to route=global&bucket=224",
    }
    for written in write_results(args.name, machine, run_settings, rows, summary, args.output_dir):
        print(f"wrote {written}", file=sys.stderr)
    _plot(summary, args.output_dir / f"{args.name}.png")
    print(summary)


def _summary(rows: list[dict], limits: list[int]) -> dict:
    rates = {
        c: {
            n: median(r["img_per_s"] for r in rows if r["limit"] == n and r["concurrency"] == c)
            for n in limits
        }
        for c in LOADS
    }
    return {
        f"c{c}": {
            str(n): {"img_per_s": round(rate, 2), "over_best_limit": round(rate / max(by_limit.values()), 3)}
            for n, rate in by_limit.items()
        }
        for c, by_limit in rates.items()
    }


def _plot(summary: dict, path: Path) -> None:
    """img/s per limit at each load; the c64 bar is labelled with its ratio to c16 (item 5: no fall)."""
    from bench.plots import paired_bars

    limits = list(summary[f"c{LOADS[0]}"])
    paired_bars(
        [f"limit {n}" for n in limits],
        [[summary[f"c{c}"][n]["img_per_s"] for c in LOADS] for n in limits],
        [f"c{c}" for c in LOADS],
        "HTTP img/s (median of rounds)",
        "ViT-S/16 224 served by batch limit (one run, servers interleaved)",
        path,
    )


if __name__ == "__main__":
    main()
