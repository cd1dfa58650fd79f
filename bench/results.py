"""Result files: one JSON (machine, settings, rows, summary) and one CSV (machine as `#` comment lines, then rows)."""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.machine import load_average

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def add_output_arguments(parser: argparse.ArgumentParser, name: str | None = None) -> None:
    """--output-dir, and --name (result files <name>.json/.csv/.png) when the benchmark has a default `name`."""
    if name is not None:
        parser.add_argument(
            "--name", default=name, help="result files <name>.json, .csv and, if plotted, .png"
        )
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)


def write_results(
    name: str,
    machine: Mapping[str, Any],
    settings: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    directory: Path = RESULTS_DIR,
) -> list[Path]:
    """Write `<name>.json` and `<name>.csv` under `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    machine = {**machine, "load_average_end": load_average()}
    json_path = directory / f"{name}.json"
    document = {"benchmark": name, "machine": machine, "settings": settings, "summary": summary, "rows": rows}
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    csv_path = directory / f"{name}.csv"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with csv_path.open("w", newline="") as handle:
        for key, value in machine.items():
            handle.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]


def publish(
    output: argparse.Namespace,
    machine: Mapping[str, Any],
    settings: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    plot: Callable[[Path], None],
) -> list[Path]:
    """`write_results` as `output.name` under `output.output_dir` (the options `add_output_arguments`
    adds), then `plot(<output_dir>/<name>.png)`; prints the summary and the files written."""
    name, directory = output.name, output.output_dir
    paths = write_results(name, machine, settings, rows, summary, directory)
    png = directory / f"{name}.png"
    plot(png)
    paths.append(png)
    print(yaml.safe_dump(dict(summary), sort_keys=False))
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths
