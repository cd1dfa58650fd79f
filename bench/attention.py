"""Global vs windowed attention at high resolution, beside the cost model the router uses.

Global-attention ViTs (learned position table interpolated to the grid) and Swin-T (shifted 7x7
windows) at batch 1, in ONNX Runtime and in torch eager, at each input side. Each ONNX artifact
is exported at its own bucket; Swin buckets must be multiples of patch x window = 28, so Swin's
ONNX point for a side that is not one (1024) is the next multiple up (1036: the whole image fits,
Swin does slightly more work than at 1024). Torch eager runs every model at exactly the side.
Cells of one side are timed interleaved (bench.timing). Peak resident memory of one 2048x2048
forward is measured in fresh processes (bench.peak_memory).

Writes attention.json/.csv/.png and calibration.yaml: measured ONNX Runtime seconds per
estimated GFLOP per backbone (batch 1), the factor the router multiplies its cost estimates by.

    .venv/bin/python -m bench.attention [--sizes 224 448 672 1024] [--memory-size 2048]
    .venv/bin/python -m bench.attention --name attention-2048 --global-models vit_small_patch16_224 \
        --sizes 1024 2048 --runtimes torch_eager --memory-size 0 --rounds 2 --seconds 1 --warmup-seconds 0
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from bench.backends import (
    eager_model,
    export_entry,
    ort_session,
    random_batch,
    session_runner,
    torch_runner,
    unverified_onnx,
)
from bench.machine import machine_info
from bench.peak_memory import RUNTIMES as PEAK_RUNTIMES
from bench.peak_memory import peak_rss
from bench.plots import attention_lines
from bench.results import publish
from bench.timing import STATISTIC, Runner, TimingPlan, add_run_arguments, noise, time_cells
from export import read_repository
from models import estimate_cost, get_config

GLOBAL_MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224")
WINDOWED_MODEL = "swin_tiny_patch4_window7_224"
RUNTIMES = ("onnxruntime", "torch_eager")
MEMORY_BUDGET_MIB = 4096
# Issue 8: at 2048x2048 the windowed backbone at least 3x faster than the matched global one.
CLAIM_SIDE = 2048
CLAIM_SPEEDUP = 3.0


def bucket_for(model: str, side: int) -> int:
    """The smallest exportable bucket that holds a side x side image."""
    multiple = get_config(model).bucket_multiple
    return math.ceil(side / multiple) * multiple


def _attention_kind(model: str) -> str:
    return ",".join(sorted(set(get_config(model).attention_kinds)))


def _cost_fields(model: str, size: int) -> dict:
    cost = estimate_cost(model, size, size)
    return {
        "tokens": cost.tokens,
        "attention_gflops": round(cost.attention_flops / 1e9, 3),
        "gflops": round(cost.gflops, 3),
        "attention_score_mib": round(cost.attention_bytes / 2**20, 1),
    }


def verified(model: str, bucket: int, verify_max_side: int) -> bool:
    """Whether the ONNX artifact of `model` at `bucket` is verified: always for the windowed model,
    up to `verify_max_side` for global ones (bench.backends.unverified_onnx says why)."""
    return model == WINDOWED_MODEL or bucket <= verify_max_side


def onnx_artifact(model: str, bucket: int, directory: Path, verify_max_side: int) -> Path:
    """The ONNX artifact of `model` at `bucket`: a verified repository entry, else the same
    exporter's output unverified (see `verified`)."""
    if verified(model, bucket, verify_max_side):
        return export_entry(model, directory, bucket).artifact
    directory.mkdir(parents=True, exist_ok=True)
    return unverified_onnx(model, bucket, directory / f"{model}-{bucket}.onnx")


def _latency_rows(
    models: list[str],
    sides: list[int],
    runtimes: list[str],
    repository: Path,
    threads: int,
    plan: TimingPlan,
    verify_max_side: int,
    lean: bool,
) -> list[dict]:
    """Export and load every (model, runtime, side), then time them all interleaved.

    Interleaving across sides too means a burst of load from other processes hits every side
    alike instead of tilting the curves, at the price of holding every session at once (`lean`
    sessions give their activations back after each run, so several 2048 sessions fit).
    """
    cells: dict[tuple[str, str, int], tuple[Runner, int]] = {}
    for model in models:
        eager = eager_model(model)
        for side in sides:
            if "onnxruntime" in runtimes:
                bucket = bucket_for(model, side)
                artifact = onnx_artifact(model, bucket, repository / str(side), verify_max_side)
                session = ort_session(artifact, threads, lean=lean)
                cells[(model, "onnxruntime", side)] = (
                    session_runner(session, random_batch(1, bucket)),
                    bucket,
                )
            if "torch_eager" in runtimes:
                cells[(model, "torch_eager", side)] = (torch_runner(eager, random_batch(1, side)), side)
    runners = {key: runner for key, (runner, _) in cells.items()}
    timings = time_cells(runners, plan)
    rows = []
    for (model, runtime, side), (_, size) in cells.items():
        timing = timings[(model, runtime, side)]
        fields = _cost_fields(model, size)
        rows.append(
            {
                "measurement": "latency",
                "model": model,
                "attention": _attention_kind(model),
                "runtime": runtime,
                "side": side,
                "size": size,
                "verified": runtime != "onnxruntime" or verified(model, size, verify_max_side),
                **fields,
                **timing.summary(1),
                "seconds_per_gflop": timing.median / fields["gflops"],
            }
        )
    return sorted(rows, key=lambda r: (r["side"], r["runtime"], models.index(r["model"])))


def _memory_rows(
    models: list[str], side: int, repository: Path, threads: int, runtimes: list[str]
) -> list[dict]:
    """Peak RSS of serving side x side images: the windowed model in each ONNX Runtime
    configuration of `runtimes` (bench.peak_memory.RUNTIMES) and in torch eager, the global
    `models` in torch eager.

    Global models are not exported at this side: export verifies each artifact at batch 3 in both
    PyTorch and ONNX Runtime, over 10 TFLOPs for ViT-T at 2048 (minutes on a few cores). The
    windowed entry is the one the latency rows exported at this side, when they did.
    """
    bucket = bucket_for(WINDOWED_MODEL, side)
    directory = repository.parent / str(side)
    exported = (
        [e for e in read_repository(directory) if e.arch == WINDOWED_MODEL] if directory.exists() else []
    )
    artifact = exported[0].artifact if exported else export_entry(WINDOWED_MODEL, repository, bucket).artifact
    jobs = [(WINDOWED_MODEL, r, bucket, artifact) for r in runtimes if r.startswith("onnxruntime")]
    if "torch_eager" in runtimes:
        jobs += [(model, "torch_eager", side, None) for model in (WINDOWED_MODEL, *models)]
    rows = []
    for model, runtime, size, path in jobs:
        print(f"peak RSS: {model} {runtime} at {size}", file=sys.stderr)
        result = peak_rss(runtime, size, model, threads, path)
        rows.append(
            {
                "measurement": "peak_rss",
                "model": model,
                "attention": _attention_kind(model),
                "runtime": runtime,
                "side": side,
                "size": size,
                **_cost_fields(model, size),
                **result,
                "within_budget": result.get("peak_rss_mib", math.inf) <= MEMORY_BUDGET_MIB,
            }
        )
    return rows


def _speedups(rows: list[dict]) -> dict:
    """Global ms / windowed ms at each side and runtime: how much faster the windowed route is."""
    latency = {
        (r["model"], r["runtime"], r["side"]): r["ms_p50"] for r in rows if r["measurement"] == "latency"
    }
    speedups: dict[str, dict[str, float]] = {}
    for (model, runtime, side), ms in sorted(latency.items(), key=lambda kv: kv[0][2]):
        windowed = latency.get((WINDOWED_MODEL, runtime, side))
        if model != WINDOWED_MODEL and windowed:
            speedups.setdefault(f"{model} / {WINDOWED_MODEL}", {})[f"{runtime} {side}"] = round(
                ms / windowed, 2
            )
    return speedups


def calibration(rows: list[dict], machine: dict) -> dict:
    """Median measured ONNX Runtime seconds per estimated GFLOP per backbone, with each point and the fit error."""
    backbones = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        points = [
            r
            for r in rows
            if r["measurement"] == "latency" and r["model"] == model and r["runtime"] == "onnxruntime"
        ]
        if not points:
            continue
        factor = statistics.median(p["seconds_per_gflop"] for p in points)
        backbones[model] = {
            "seconds_per_gflop": float(f"{factor:.4g}"),
            "max_relative_error": round(max(abs(p["seconds_per_gflop"] / factor - 1) for p in points), 3),
            "points": [
                {
                    "size": p["size"],
                    "gflops": p["gflops"],
                    "seconds": round(p["ms_p50"] / 1e3, 5),
                    "seconds_per_gflop": float(f"{p['seconds_per_gflop']:.4g}"),
                }
                for p in points
            ],
        }
    return {
        "runtime": "onnxruntime",
        "provider": "CPUExecutionProvider",
        "batch": 1,
        "threads": machine["cores"],
        "cpu_model": machine["cpu_model"],
        "date": machine["date"],
        "command": machine["command"],
        "backbones": backbones,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--global-models", nargs="+", default=list(GLOBAL_MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 448, 672, 1024])
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument(
        "--name",
        default="attention",
        help="result files <name>.json/.csv/.png (calibration.yaml only for the default name)",
    )
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=0.3,
        help="warm-up before each timed visit; 0 for sizes where one call takes seconds",
    )
    parser.add_argument(
        "--memory-size", type=int, default=2048, help="side for the peak-RSS runs; 0 skips them"
    )
    parser.add_argument(
        "--memory-global-models",
        nargs="*",
        default=["vit_tiny_patch16_224"],
        help="global models whose torch eager forward at --memory-size is measured (they are slow there)",
    )
    parser.add_argument(
        "--memory-runtimes",
        nargs="+",
        choices=PEAK_RUNTIMES,
        default=["onnxruntime", "onnxruntime_lean", "torch_eager"],
        help="configurations of the peak-RSS runs (bench.peak_memory)",
    )
    parser.add_argument(
        "--verify-max-side",
        type=int,
        default=1100,
        help="global-model ONNX buckets above this are exported without verification (ViT-S at 2048 cannot be verified here)",
    )
    parser.add_argument(
        "--ort-lean",
        action="store_true",
        help="latency sessions without CPU arena and memory pattern, so several 2048 sessions fit in memory",
    )
    add_run_arguments(parser, rounds=4, seconds=4.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info("bench.attention")
    threads = args.threads
    torch.set_num_threads(threads)
    plan = TimingPlan(
        rounds=args.rounds,
        seconds=args.seconds,
        min_calls=2,
        first_warmup_calls=1,
        warmup_seconds=args.warmup_seconds,
    )
    models = [*args.global_models, WINDOWED_MODEL]
    with tempfile.TemporaryDirectory(prefix="vitserve-bench-") as tmp:
        rows = _latency_rows(
            models, args.sizes, args.runtimes, Path(tmp), threads, plan, args.verify_max_side, args.ort_lean
        )
        if args.memory_size:
            rows += _memory_rows(
                args.memory_global_models,
                args.memory_size,
                Path(tmp) / "memory",
                threads,
                args.memory_runtimes,
            )
    settings = {
        "global_models": args.global_models,
        "windowed_model": WINDOWED_MODEL,
        "sizes": args.sizes,
        "runtimes": args.runtimes,
        "onnx_buckets": {m: {s: bucket_for(m, s) for s in args.sizes} for m in models},
        "batch": 1,
        "threads": threads,
        "ort": {
            "provider": "CPUExecutionProvider",
            "intra_op_threads": threads,
            "graph_optimization": "ALL",
            "lean": args.ort_lean,
        },
        "verify_max_side": args.verify_max_side,
        "memory_runtimes": args.memory_runtimes,
        "timing": asdict(plan) | {"statistic": STATISTIC},
        "memory_budget_mib": MEMORY_BUDGET_MIB,
    }
    speedups = _speedups(rows)
    claim = {
        f"{pair} ({runtime})": ratios[f"{runtime} {CLAIM_SIDE}"]
        for pair, ratios in speedups.items()
        for runtime in args.runtimes
        if f"{runtime} {CLAIM_SIDE}" in ratios
    }
    summary = {
        "windowed_speedup": speedups,
        f"claim_windowed_{CLAIM_SPEEDUP:g}x_at_{CLAIM_SIDE}": {
            k: {"speedup": v, "holds": v >= CLAIM_SPEEDUP} for k, v in claim.items()
        },
        "peak_rss_mib": {
            f"{r['model']} {r['runtime']} {r['size']}": r.get("peak_rss_mib", r.get("error"))
            for r in rows
            if r["measurement"] == "peak_rss"
        },
        "noise": noise(rows),
    }
    if args.name == "attention" and "onnxruntime" in args.runtimes:
        calibration_path = args.output_dir / "calibration.yaml"
        calibration_path.write_text(yaml.safe_dump(calibration(rows, machine), sort_keys=False))
        print(f"wrote {calibration_path}")
    title = f"global vs windowed attention, batch 1, {machine['cpu_model']}, {threads} threads ({machine['date']})"
    latency = [r for r in rows if r["measurement"] == "latency"]
    publish(
        args,
        machine,
        settings,
        rows,
        summary,
        lambda png: attention_lines(latency, title, png),
    )


if __name__ == "__main__":
    main()
