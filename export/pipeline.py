"""`vitserve export`: build, export, verify and publish one entry per resolution bucket.

All buckets are staged and verified before any is published, so a failing bucket leaves the
repository as it was.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.errors import ExportError
from export.onnx_export import export_onnx
from export.precision import PRECISIONS, convert_precision
from export.progress import Progress
from export.repository import ModelEntry, ensure_writable, publish, read_entry, remove_created, staging
from export.shapes import ShapeSpec, as_shape, aspect_ladder, shape_name
from export.torchscript_export import export_pt2, export_torchscript
from export.triton_config import (
    INSTANCE_KINDS,
    LABELS_FILENAME,
    MODEL_FILENAMES,
    EntrySpec,
    build_model_config,
    to_text,
)
from export.verify import verify_artifact
from models import create_model, estimate_cost
from models.config import BackboneConfig

FORMATS = ("onnx", "torchscript")
VERSION = "1"
# Pixels per batch held roughly constant across buckets: 32 images at 384x384.
PIXEL_BUDGET = 32 * 384 * 384
MAX_BATCH_CAP = 32
# Without a checkpoint the weights are random, drawn from this seed: every export run of a backbone
# then writes the same weights, so each shape of it answers alike and the gateway's sessions share one
# copy of them (service/runtimes/ort_weights.py), whichever `vitserve export` run wrote each shape.
RANDOM_INIT_SEED = 0
# Entry names become directory names that Triton also uses as model names: no separators, not hidden.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ExportRequest:
    """One `vitserve export` invocation; `overrides` are config fields (as in `create_model`) for the Python API."""

    model: str
    repository: Path
    buckets: tuple[ShapeSpec, ...] = ()
    ladders: tuple[int, ...] = ()
    checkpoint: Path | None = None
    artifact_format: str = "onnx"
    precision: str = "fp32"
    instance_kind: str = "auto"
    name: str | None = None
    max_batch_size: int | None = None
    max_queue_delay_us: int = 2000
    fused: bool = True
    overrides: Mapping[str, Any] = field(default_factory=dict)


def default_max_batch(bucket: ShapeSpec) -> int:
    """Largest batch config.pbtxt allows for a shape: a constant pixel budget, so large shapes batch less.

    The service measures the best batch within this cap at start-up (service/calibration.py).
    """
    height, width = as_shape(bucket)
    return max(1, min(MAX_BATCH_CAP, PIXEL_BUDGET // (height * width)))


def validate_buckets(
    config: BackboneConfig, buckets: tuple[ShapeSpec, ...], model: str
) -> tuple[ShapeSpec, ...]:
    """Both sides of every shape must be positive multiples of patch x window so the first stage needs no padding."""
    buckets = buckets or (config.img_size,)
    multiple = config.bucket_multiple
    for bucket in buckets:
        for side in dict.fromkeys(as_shape(bucket)):
            if side <= 0 or side % multiple:
                lower = max(multiple, side // multiple * multiple)
                raise ExportError(
                    f"bucket {shape_name(bucket)} is not a positive multiple of {multiple} (patch {config.patch_size}"
                    f"{f' x window {config.window}' if config.window else ''}) for {model}; "
                    f"try {lower} or {lower + multiple}"
                )
    return tuple(dict.fromkeys(buckets))


def _check_request(request: ExportRequest) -> None:
    if request.artifact_format not in FORMATS:
        raise ExportError(f"unknown format {request.artifact_format!r}; choose one of {', '.join(FORMATS)}")
    if request.precision not in PRECISIONS:
        raise ExportError(f"unknown precision {request.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if request.instance_kind not in INSTANCE_KINDS:
        raise ExportError(
            f"unknown instance kind {request.instance_kind!r}; choose one of {', '.join(INSTANCE_KINDS)}"
        )
    if request.artifact_format == "torchscript" and request.precision != "fp32":
        raise ExportError(
            "TorchScript exports are fp32; the PyTorch runtime applies fp16/bf16 autocast on GPU"
        )
    if request.artifact_format == "torchscript" and not request.fused:
        raise ExportError(
            "--unfused applies to ONNX only; TorchScript always keeps scaled_dot_product_attention"
        )
    if request.max_batch_size is not None and request.max_batch_size < 1:
        raise ExportError(f"max batch size must be >= 1, got {request.max_batch_size}")
    if request.max_queue_delay_us < 0:
        raise ExportError(f"max queue delay must be >= 0 microseconds, got {request.max_queue_delay_us}")
    if request.name is not None and not NAME_PATTERN.fullmatch(request.name):
        raise ExportError(
            f"entry name {request.name!r} must start with a letter or digit and use only letters, digits, "
            "'_', '.' and '-' (it becomes a directory and a Triton model name)"
        )


def seeded_model(name: str, checkpoint: Path | None = None, **overrides: Any) -> nn.Module:
    """The model `vitserve export` builds: `checkpoint`'s weights, else random ones from
    RANDOM_INIT_SEED (the caller's random state is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(RANDOM_INIT_SEED)
        return create_model(name, checkpoint=checkpoint, **overrides)


def _build_model(request: ExportRequest) -> nn.Module:
    try:
        return seeded_model(request.model, request.checkpoint, **request.overrides)
    except KeyError as exc:
        raise ExportError(str(exc.args[0]) if exc.args else str(exc)) from exc
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        source = f" with checkpoint {request.checkpoint}" if request.checkpoint else ""
        raise ExportError(f"cannot build {request.model}{source}: {exc}") from exc


def _write_artifacts(
    model: nn.Module, request: ExportRequest, bucket: ShapeSpec, version_dir: Path, log
) -> None:
    """Export and verify one bucket; an exporter crash becomes an ExportError naming what was exported."""
    try:
        _export_and_verify(model, request, bucket, version_dir, log)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"{request.artifact_format}/{request.precision} export of {request.model} at bucket {shape_name(bucket)} failed "
            f"({type(exc).__name__}: {exc}); nothing was written"
        ) from exc


def _export_and_verify(
    model: nn.Module, request: ExportRequest, bucket: ShapeSpec, version_dir: Path, log
) -> None:
    target = version_dir / MODEL_FILENAMES[request.artifact_format]
    if request.artifact_format == "torchscript":
        export_torchscript(model, bucket, target)
        log(f"  torchscript: {verify_artifact(model, target, 'torchscript', 'fp32', bucket).summary()}")
        pt2 = target.with_suffix(".pt2")
        export_pt2(model, bucket, pt2)
        log(f"  pt2: {verify_artifact(model, pt2, 'pt2', 'fp32', bucket).summary()}")
        return
    if request.precision == "fp32":
        export_onnx(model, bucket, target, fused=request.fused)
    else:
        fp32 = version_dir / "fp32.onnx"
        export_onnx(model, bucket, fp32, fused=request.fused)
        convert_precision(fp32, target, request.precision)
        fp32.unlink()
    report = verify_artifact(model, target, "onnx", request.precision, bucket, fused=request.fused)
    log(f"  onnx/{request.precision}: {report.summary()}")


def entry_spec(request: ExportRequest, config: BackboneConfig, bucket: ShapeSpec) -> EntrySpec:
    """What `request` writes into the config.pbtxt of its entry at `bucket`, known before any export runs."""
    return EntrySpec(
        name=f"{request.name or request.model}_{shape_name(bucket)}",
        backbone=request.name or request.model,
        arch=request.model,
        config=config,
        bucket=bucket,
        artifact_format=request.artifact_format,
        precision=request.precision,
        max_batch_size=request.max_batch_size or default_max_batch(bucket),
        max_queue_delay_us=request.max_queue_delay_us,
        tokens=estimate_cost(config, *as_shape(bucket)).tokens,
        instance_kind=request.instance_kind,
    )


def export_model(request: ExportRequest, log: Callable[[str], None] = print) -> list[ModelEntry]:
    """Export every bucket of `request`; returns the published entries. Raises ExportError, writing nothing."""
    _check_request(request)
    model = _build_model(request)
    config = model.config
    ladder = tuple(s for side in request.ladders for s in aspect_ladder(side, config.bucket_multiple))
    buckets = validate_buckets(config, (*request.buckets, *ladder), request.model)
    root = Path(request.repository)
    created = ensure_writable(root)
    backbone = request.name or request.model
    staged: list[tuple[str, Path]] = []
    progress = Progress(len(buckets))
    try:
        for bucket in buckets:
            entry = f"{backbone}_{shape_name(bucket)}"
            log(f"exporting {request.model} as {entry} ({request.artifact_format}/{request.precision})")
            with staging(root, entry) as stage:
                staged.append((entry, stage))
                version_dir = stage / VERSION
                version_dir.mkdir()
                _write_artifacts(model, request, bucket, version_dir, log)
                spec = entry_spec(request, config, bucket)
                (stage / "config.pbtxt").write_text(to_text(build_model_config(spec)))
                (stage / LABELS_FILENAME).write_text("\n".join(config.label_names()) + "\n")
            progress.step(f"exported and verified {entry}")
    except BaseException:
        for _, stage in staged:
            shutil.rmtree(stage, ignore_errors=True)
        remove_created(created)
        raise
    return [read_entry(publish(stage, root, entry)) for entry, stage in staged]
