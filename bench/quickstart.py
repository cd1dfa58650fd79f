"""Seconds from `make serve` on a fresh clone to the first answered POST /v1/classify, by phase.

Runs tests/e2e/quickstart.sh (fresh clone, new virtualenv, export, serve, the README's request) and
reads the phases it prints: install, export (the first bucket of each backbone), start-up and the
first request. Writes quickstart.json/.csv/.png under bench/results/.

The machine is shared, so each run records the load average before and after it. The settings
record whether PYTHONDONTWRITEBYTECODE is set: a fresh machine leaves it unset, and with it set no
process reuses another's compiled modules (an export of vit_small at 224 then took 24 s of CPU
instead of 14 s, measured on this machine).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from bench.machine import load_average, machine_info
from bench.plots import phase_bars
from bench.results import add_output_arguments, write_results

SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "quickstart.sh"
PHASES = ("install_s", "export_s", "startup_and_first_request_s")
PHASE_LINE = re.compile(
    r"quickstart: install ([\d.]+) s, export ([\d.]+) s, start-up and first request ([\d.]+) s"
)
TOTAL_LINE = re.compile(r"quickstart: make serve answered POST /v1/classify after ([\d.]+) s")


def run_once(index: int, port: int) -> dict:
    """One quick start; its phases, total and the machine's load before it started."""
    load = load_average()
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**os.environ, "QUICKSTART_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if result.returncode != 0:
        sys.exit(
            f"quickstart.sh failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    phases, total = PHASE_LINE.search(result.stdout), TOTAL_LINE.search(result.stdout)
    row = {"run": f"run {index + 1}", **dict(zip(PHASES, map(float, phases.groups()), strict=True))}
    return {
        **row,
        "total_s": float(total.group(1)),
        "load_average_start": load,
        "load_average_end": load_average(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--port", type=int, default=18123)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    rows = [run_once(index, args.port) for index in range(args.runs)]
    summary = {"best_total_s": min(r["total_s"] for r in rows), "target_s": 120}
    paths = write_results(
        "quickstart",
        machine_info("bench.quickstart"),
        vars(args)
        | {"output_dir": None, "pythondontwritebytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))},
        rows,
        summary,
        args.output_dir,
    )
    png = args.output_dir / "quickstart.png"
    phase_bars(rows, PHASES, "make serve to first /v1/classify on a fresh clone (shared 2-core machine)", png)
    for row in rows:
        print(", ".join(f"{k} {v}" for k, v in row.items()))
    print("wrote " + ", ".join(str(p) for p in [*paths, png]))


if __name__ == "__main__":
    main()
