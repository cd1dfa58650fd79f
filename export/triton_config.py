"""Triton ModelConfig for a repository entry, built as the protobuf Triton itself parses.

Generating the text proto from `model_config_pb2.ModelConfig` (shipped by tritonclient) means the
file is valid by construction; `parameters` carry what vitserve's gateway needs to serve the entry
without loading the model first (backbone, arch, attention, patch, window, bucket, labels, and the
checkpoint's preprocessing: mean/std, interpolation, resize policy, crop_pct).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.shapes import ShapeSpec, as_shape, shape_name
from models.config import BackboneConfig

PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}
MODEL_FILENAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}
LABELS_FILENAME = "labels.txt"
# Where Triton places an entry's instances, chosen at export and independent of precision: `auto` lets
# Triton decide (a GPU when the server sees one, else the CPU), `gpu` refuses to load without one.
INSTANCE_KINDS = {
    "auto": mc.ModelInstanceGroup.KIND_AUTO,
    "cpu": mc.ModelInstanceGroup.KIND_CPU,
    "gpu": mc.ModelInstanceGroup.KIND_GPU,
}


def output_names(artifact_format: str) -> tuple[str, str]:
    """Logits and embedding output names; Triton's libtorch backend needs the `<name>__<index>` form."""
    if artifact_format == "torchscript":
        return "logits__0", "embedding__1"
    return "logits", "embedding"


@dataclass(frozen=True)
class EntrySpec:
    """Everything that goes into one entry's config.pbtxt."""

    name: str
    backbone: str
    arch: str
    config: BackboneConfig
    bucket: ShapeSpec
    artifact_format: str
    precision: str
    max_batch_size: int
    max_queue_delay_us: int
    tokens: int
    instance_kind: str = "auto"


def _float_list(values: tuple[float, ...]) -> str:
    return ",".join(repr(float(v)) for v in values)


def build_model_config(spec: EntrySpec) -> mc.ModelConfig:
    """The ModelConfig protobuf for an entry."""
    cfg = spec.config
    logits_name, embedding_name = output_names(spec.artifact_format)
    config = mc.ModelConfig(
        name=spec.name,
        platform=PLATFORMS[spec.artifact_format],
        max_batch_size=spec.max_batch_size,
        default_model_filename=MODEL_FILENAMES[spec.artifact_format],
    )
    config.input.add(name="pixel_values", data_type=mc.TYPE_FP32, dims=[cfg.in_chans, *as_shape(spec.bucket)])
    config.output.add(
        name=logits_name,
        data_type=mc.TYPE_FP32,
        dims=[cfg.num_classes or cfg.num_features],
        label_filename=LABELS_FILENAME,
    )
    config.output.add(name=embedding_name, data_type=mc.TYPE_FP32, dims=[cfg.num_features])
    preferred = sorted({max(1, spec.max_batch_size // 2), spec.max_batch_size})
    config.dynamic_batching.max_queue_delay_microseconds = spec.max_queue_delay_us
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.instance_group.add(count=1, kind=INSTANCE_KINDS[spec.instance_kind])
    parameters = {
        "backbone": spec.backbone,
        "arch": spec.arch,
        "family": cfg.family,
        "attention": ",".join(dict.fromkeys(cfg.attention_kinds)),
        "patch_size": str(cfg.patch_size),
        "window_size": str(cfg.window),
        "bucket": shape_name(spec.bucket),
        "tokens": str(spec.tokens),
        "precision": spec.precision,
        "labels_file": LABELS_FILENAME,
        "mean": _float_list(cfg.mean),
        "std": _float_list(cfg.std),
        "interpolation": cfg.interpolation,
        "resize": cfg.resize,
        "crop_pct": repr(float(cfg.crop_pct)),
        "model_config": json.dumps(cfg.to_dict(), separators=(",", ":")),
    }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def to_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_text(text: str) -> mc.ModelConfig:
    """Parse config.pbtxt text; raises google.protobuf.text_format.ParseError on invalid input."""
    return text_format.Parse(text, mc.ModelConfig())
