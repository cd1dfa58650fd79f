"""Runtime comparison (issue 3): torch eager vs TorchScript vs ONNX Runtime fp32 vs ONNX Runtime int8.

Each model is exported at one bucket with the project's export code (fp32 ONNX, int8 ONNX with
dynamic quantization of the Linear layers, TorchScript), then all runtimes of all models are
timed in one run, interleaved (bench.timing), on the same random batch. Throughput ratios are
against torch eager on the same model and batch.

    .venv/bin/python -m bench.runtimes [--models ...] [--batches 1 8] [--rounds 3 --seconds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from bench.backends import (
    eager_model,
    export_entry,
    load_torchscript,
    ort_runner,
    ort_session,
    random_batch,
    torch_runner,
)
from bench.machine import machine_info
from bench.plots import runtime_bars
from bench.results import write_results
from bench.timing import STATISTIC, Runner, TimingPlan, add_run_arguments, noise, time_cells

MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224", "swin_tiny_patch4_window7_224")
RUNTIMES = ("torch_eager", "torchscript", "onnxruntime_fp32", "onnxruntime_int8")
BASELINE = "torch_eager"
# (runtime, artifact format, precision) for the exported variants.
EXPORTS = (
    ("torchscript", "torchscript", "fp32"),
    ("onnxruntime_fp32", "onnx", "fp32"),
    ("onnxruntime_int8", "onnx", "int8"),
)


def _runners(
    model: str, size: int, batches: tuple[int, ...], repository: Path, threads: int
) -> tuple[dict[tuple[str, str, int], Runner], dict[str, Path]]:
    """Export and load one model: (model, runtime, batch) -> runner, and runtime -> artifact path."""
    runners: dict[tuple[str, str, int], Runner] = {}
    artifacts: dict[str, Path] = {}
    eager = eager_model(model)
    for runtime, artifact_format, precision in EXPORTS:
        entry = export_entry(model, repository, size, artifact_format, precision)
        artifacts[runtime] = entry.artifact
        if artifact_format == "torchscript":
            module = load_torchscript(entry)
            for batch in batches:
                runners[(model, runtime, batch)] = torch_runner(module, random_batch(batch, size))
        else:
            session = ort_session(entry.artifact, threads)
            for batch in batches:
                runners[(model, runtime, batch)] = ort_runner(session, entry, random_batch(batch, size))
    for batch in batches:
        runners[(model, BASELINE, batch)] = torch_runner(eager, random_batch(batch, size))
    return runners, artifacts


def _rows(timings: dict, artifacts: dict, size: int) -> list[dict]:
    rows = []
    for (model, runtime, batch), timing in timings.items():
        artifact = artifacts[model].get(runtime)
        rows.append(
            {
                "model": model,
                "runtime": runtime,
                "batch": batch,
                "size": size,
                **timing.summary(batch),
                "artifact_mib": round(artifact.stat().st_size / 2**20, 1) if artifact else None,
            }
        )
    baseline = {(r["model"], r["batch"]): r["img_per_s"] for r in rows if r["runtime"] == BASELINE}
    for row in rows:
        row["speedup_vs_eager"] = round(row["img_per_s"] / baseline[(row["model"], row["batch"])], 3)
    order = {name: i for i, name in enumerate(RUNTIMES)}
    return sorted(rows, key=lambda r: (r["model"], r["batch"], order[r["runtime"]]))


def _summary(rows: list[dict]) -> dict:
    speedups = {
        f"{r['model']} batch {r['batch']}": {
            s["runtime"]: s["speedup_vs_eager"]
            for s in rows
            if (s["model"], s["batch"]) == (r["model"], r["batch"])
        }
        for r in rows
        if r["runtime"] == BASELINE
    }
    return {"speedup_vs_eager": speedups, "noise": noise(rows)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.runtimes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--size", type=int, default=224, help="input side and export bucket")
    add_run_arguments(parser, rounds=6, seconds=3.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info("bench.runtimes")
    threads = args.threads
    torch.set_num_threads(threads)
    plan = TimingPlan(rounds=args.rounds, seconds=args.seconds)
    runners: dict[tuple[str, str, int], Runner] = {}
    artifacts: dict[str, dict[str, Path]] = {}
    with tempfile.TemporaryDirectory(prefix="vitserve-bench-") as tmp:
        for model in args.models:
            print(f"exporting {model} at {args.size}", file=sys.stderr)
            model_runners, artifacts[model] = _runners(
                model, args.size, tuple(args.batches), Path(tmp), threads
            )
            runners.update(model_runners)
        order = {name: i for i, name in enumerate(RUNTIMES)}
        cells = dict(sorted(runners.items(), key=lambda kv: (kv[0][0], kv[0][2], order[kv[0][1]])))
        timings = time_cells(cells, plan)
        rows = _rows(timings, artifacts, args.size)
    settings = {
        "models": args.models,
        "batches": args.batches,
        "size": args.size,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "ort": {"provider": "CPUExecutionProvider", "intra_op_threads": threads, "graph_optimization": "ALL"},
        "int8": "onnxruntime quantize_dynamic, QInt8 weights, MatMul/Gemm only (export.precision)",
        "timing": asdict(plan) | {"statistic": STATISTIC},
    }
    summary = _summary(rows)
    paths = write_results("runtimes", machine, settings, rows, summary, args.output_dir)
    png = args.output_dir / "runtimes.png"
    title = f"{machine['cpu_model']}, {threads} threads, input {args.size}x{args.size} ({machine['date']})"
    runtime_bars(rows, RUNTIMES, title, png)
    for row in rows:
        print(
            f"{row['model']:32s} b{row['batch']:<2d} {row['runtime']:17s} {row['img_per_s']:9.2f} img/s "
            f"{row['ms_p50']:9.2f} ms  x{row['speedup_vs_eager']:.2f}  spread {row['round_spread']:.1%}"
        )
    print("wrote " + ", ".join(str(p) for p in [*paths, png]))


if __name__ == "__main__":
    main()
