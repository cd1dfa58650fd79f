"""One artifact with dynamic spatial dims against one artifact per shape, in ONNX Runtime.

Issue 8 asks for one artifact per backbone with dynamic height and width where ONNX Runtime runs
it as fast as fixed shapes, and shared weights across the sessions of one backbone otherwise.
For each backbone of the default pair (the Makefile's GLOBAL_MODEL and WINDOWED_MODEL) this
exports one ONNX artifact with dynamic batch, height and width (`export_onnx(dynamic_spatial=True)`,
traced at the backbone's first shape) and, unless a repository already holds them, one verified
fixed-shape entry per shape (`bench.backends.export_entry`, as `vitserve export` writes them).

- Correctness: the dynamic artifact is checked against PyTorch at every shape with the exporter's
  own check (`export.verify.verify_artifact`: relative error <= 1e-4, one fused Attention node per
  layer). torch.export follows the Python branches that depend on the input size for the traced
  shape only, so shapes that take other branches fail there or give other numbers.
- Latency: wherever the dynamic artifact runs, both artifacts are timed at batch 1 and at the
  entry's batch (the best-throughput batch the service's start-up calibration picks for the fixed
  entry, `service.calibration.measure`), in sessions configured alike (`bench.backends.ort_session`),
  every cell interleaved with every other (`bench.timing`), so the dynamic / fixed ratio of each
  cell is measured under the same load.

    .venv/bin/python -m bench.dynamic_dims [--repository model_repository] [--rounds 4 --seconds 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from bench.backends import eager_model, export_entry, ort_runner, ort_session, random_batch
from bench.machine import machine_info
from bench.plots import paired_bars
from bench.results import publish
from bench.timing import STATISTIC, Runner, TimingPlan, add_run_arguments, noise, time_cells
from export import ModelEntry, read_repository
from export.errors import VerificationError
from export.onnx_export import SPATIAL_MULTIPLES, export_onnx
from export.shapes import Shape, as_shape, parse_shape, shape_name
from export.verify import verify_artifact
from service.calibration import measure
from service.settings import Settings

# The default pair and shapes of each: the first is traced for the dynamic artifact; the others
# are a shape of the same branch class and one of another (see the module docstring).
DEFAULT_SHAPES = {
    "vit_small_patch16_224": "256x192,224,192x256",
    "swin_tiny_patch4_window7_224": "448,896,532x392",
}


def _shapes(text: str) -> list[Shape]:
    return [as_shape(parse_shape(item)) for item in text.split(",")]


def fixed_entry(repository: Path, model: str, shape: Shape) -> ModelEntry:
    """The fp32 ONNX entry of `model` at `shape` in `repository`, exported there if it holds none."""
    if repository.exists():
        for entry in read_repository(repository):
            if entry.arch == model and entry.shape == shape and entry.platform == "onnxruntime_onnx":
                if entry.precision == "fp32":
                    return entry
    return export_entry(model, repository, shape)


def _verify(model: str, artifact: Path, shape: Shape) -> dict:
    """The exporter's check of the dynamic artifact at `shape`: whether it runs there, whether it
    passes, and the numbers or the error."""
    try:
        report = verify_artifact(eager_model(model), artifact, "onnx", "fp32", shape)
    except VerificationError as exc:
        return {"runs": True, "verified": False, "verification": str(exc)[:400]}
    except Exception as exc:  # noqa: BLE001 - a graph that cannot run at this shape is a result
        return {"runs": False, "verified": False, "verification": f"{type(exc).__name__}: {str(exc)[:400]}"}
    return {"runs": True, "verified": True, "verification": report.summary()}


def entry_batch(session, entry: ModelEntry, settings: Settings) -> int:
    """The batch limit the service's start-up calibration would give the fixed entry."""
    outputs = [entry.logits_name, entry.embedding_name]
    run = lambda x: session.run(outputs, {entry.input_name: x})  # noqa: E731
    cost = measure(run, entry.input_shape, entry.max_batch_size, settings.calibration_max_run_s)
    return cost.best_batch


def _backbone_cells(
    model: str, shapes: list[Shape], repository: Path, scratch: Path, threads: int, settings: Settings
) -> tuple[list[dict], dict[tuple, Runner]]:
    """Export the dynamic artifact, verify it at every shape, and the cells to time where it runs."""
    print(
        f"exporting {model} with dynamic height and width (traced at {shape_name(shapes[0])})",
        file=sys.stderr,
    )
    dynamic = scratch / f"{model}-dynamic.onnx"
    export_onnx(eager_model(model), shapes[0], dynamic, dynamic_spatial=True)
    dynamic_session = ort_session(dynamic, threads)
    rows, cells = [], {}
    for shape in shapes:
        entry = fixed_entry(repository, model, shape)
        check = _verify(model, dynamic, shape)
        fixed_session = ort_session(entry.artifact, threads)
        batch = entry_batch(fixed_session, entry, settings)
        rows.append(
            {
                "measurement": "verify",
                "model": model,
                "shape": shape_name(shape),
                "traced_shape": shape_name(shapes[0]),
                "entry_batch": batch,
                **check,
            }
        )
        if not check["runs"]:
            continue
        for size in sorted({1, batch}):
            pixels = random_batch(size, shape)
            cells[(model, shape_name(shape), size, "fixed")] = ort_runner(fixed_session, entry, pixels)
            cells[(model, shape_name(shape), size, "dynamic")] = ort_runner(dynamic_session, entry, pixels)
    return rows, cells


def _ratios(rows: list[dict]) -> dict[str, float]:
    """dynamic ms / fixed ms per (model, shape, batch): above 1, the dynamic artifact is slower."""
    latency = {
        (r["model"], r["shape"], r["batch"], r["variant"]): r["ms_p50"] for r in rows if "variant" in r
    }
    return {
        f"{model} {shape} batch {batch}": round(ms / latency[(model, shape, batch, "fixed")], 3)
        for (model, shape, batch, variant), ms in latency.items()
        if variant == "dynamic"
    }


def plot(rows: list[dict], machine: dict, path: Path) -> None:
    """Fixed vs dynamic ms per (model, shape, batch); shapes where the dynamic artifact is wrong say so."""
    latency = {
        (r["model"], r["shape"], r["batch"], r["variant"]): r["ms_p50"] for r in rows if "variant" in r
    }
    wrong = {(r["model"], r["shape"]) for r in rows if r["measurement"] == "verify" and not r["verified"]}
    keys = [key[:3] for key in latency if key[3] == "fixed"]
    labels = [
        f"{model.split('_patch')[0]}\n{shape} b{batch}"
        + ("\n(dynamic wrong)" if (model, shape) in wrong else "")
        for model, shape, batch in keys
    ]
    paired_bars(
        labels,
        [(latency[(*key, "fixed")], latency[(*key, "dynamic")]) for key in keys],
        ("fixed shape", "dynamic H, W"),
        "ms per batch (p50)",
        f"ONNX Runtime, dynamic H, W vs fixed shapes: {machine['cores']} threads, {machine['date'][:10]}",
        path,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dynamic_dims", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=[f"{model}={shapes}" for model, shapes in DEFAULT_SHAPES.items()],
        help="MODEL=SHAPE,SHAPE,... (the first shape is traced for the dynamic artifact)",
    )
    parser.add_argument(
        "--repository", type=Path, help="take the fixed entries from this repository (default: export them)"
    )
    add_run_arguments(parser, rounds=4, seconds=4.0, name="dynamic-dims")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info("bench.dynamic_dims")
    torch.set_num_threads(args.threads)
    settings = Settings()
    plan = TimingPlan(rounds=args.rounds, seconds=args.seconds, min_calls=2, first_warmup_calls=1)
    backbones = {model: _shapes(shapes) for model, _, shapes in (s.partition("=") for s in args.shapes)}
    rows: list[dict] = []
    cells: dict[tuple, Runner] = {}
    with tempfile.TemporaryDirectory(prefix="vitserve-bench-") as tmp:
        repository = args.repository or Path(tmp) / "repository"
        for model, shapes in backbones.items():
            backbone_rows, backbone_cells = _backbone_cells(
                model, shapes, repository, Path(tmp), args.threads, settings
            )
            rows += backbone_rows
            cells.update(backbone_cells)
        timings = time_cells(cells, plan)
    for (model, shape, batch, variant), timing in timings.items():
        rows.append(
            {"measurement": "latency", "model": model, "shape": shape, "batch": batch, "variant": variant}
            | timing.summary(batch)
        )
    ratios = _ratios(rows)
    summary = {
        "dynamic_vs_fixed_ms": ratios,
        "verified_shapes": {
            f"{r['model']} {r['shape']}": r["verified"] for r in rows if r["measurement"] == "verify"
        },
        "noise": noise(rows),
    }
    run_settings = {
        "shapes": {model: [shape_name(s) for s in shapes] for model, shapes in backbones.items()},
        "repository": str(args.repository) if args.repository else None,
        "threads": args.threads,
        "dynamic_dims": f"batch, height and width; height and width {SPATIAL_MULTIPLES} bucket multiples",
        "ort": {
            "provider": "CPUExecutionProvider",
            "intra_op_threads": args.threads,
            "graph_optimization": "ALL",
        },
        "calibration_max_run_s": settings.calibration_max_run_s,
        "timing": asdict(plan) | {"statistic": STATISTIC},
    }
    publish(args, machine, run_settings, rows, summary, lambda png: plot(rows, machine, png))


if __name__ == "__main__":
    main()
