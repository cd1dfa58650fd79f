"""Every backbone family exports to ONNX and TorchScript with fused attention and PyTorch's numerics.

Each family is built at a reduced size, saved as a checkpoint and exported through the public
`export_model` API, then checked here independently of export/verify.py: the artifacts run in ONNX
Runtime (CPU) / TorchScript / torch.export, match the PyTorch model the checkpoint came from, keep
one fused attention op per softmax-attention layer, and give per-sample results that do not depend
on the batch they ran in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export import ExportRequest, ModelEntry, export_model
from models import create_model, save_checkpoint

FP32_TOLERANCE = 1e-4
SMALL_VIT = {"embed_dim": 32, "num_heads": 2, "depth": 2, "num_classes": 10}
# Spatial mixers on patch 8, so a 32x32 input is a 4x4 grid that a 3x3 neighbourhood or 2x2 partition divides.
SPATIAL_VIT = {**SMALL_VIT, "patch_size": 8, "kernel_size": 3, "partition_size": 2}
BATCHES = (1, 3, 8)


@dataclass(frozen=True)
class Family:
    """A registry model at reduced size, the buckets to export, and its softmax-attention layer count."""

    name: str
    overrides: dict[str, Any]
    buckets: tuple[int, ...]
    softmax_layers: int


FAMILIES = {
    "vit": Family("vit_tiny_patch16_224", SMALL_VIT, (32, 64), 2),
    "vit_rope": Family("vit_tiny_patch16_rope_224", SMALL_VIT, (32, 64), 2),
    "vit_sincos": Family("vit_tiny_patch16_sincos_224", SMALL_VIT, (32, 64), 2),
    "vit_pos2d": Family("vit_tiny_patch16_pos2d_224", SMALL_VIT, (32, 64), 2),
    # Swin keeps 7x7 windows (buckets are multiples of 4 x 7): at 56 stage 1 shifts and stage 2 is one
    # window, at 112 both stages shift.
    "swin": Family(
        "swin_tiny_patch4_window7_224",
        {"embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2), "num_classes": 10},
        (56, 112),
        4,
    ),
    "nat": Family("nat_iso_tiny_patch16_224", SPATIAL_VIT, (32, 64), 2),
    "dinat": Family("dinat_iso_tiny_patch16_224", SPATIAL_VIT, (32, 64), 2),
    "maxvit_iso": Family("maxvit_iso_tiny_patch16_224", SPATIAL_VIT, (32, 64), 2),
    "linvit": Family("linvit_tiny_patch16_224", SMALL_VIT, (32, 64), 0),
}
# One family per attention mechanism (global with RoPE, shifted windows, boolean neighbourhood masks,
# block/grid partitions, linear) for the unfused and TorchScript exports, which lower the same code.
MECHANISMS = ("vit_rope", "swin", "dinat", "maxvit_iso", "linvit")


@dataclass(frozen=True)
class Exported:
    family: Family
    model: nn.Module
    entries: list[ModelEntry]


def _export(family_id: str, root: Path, buckets: tuple[int, ...] | None = None, **request: Any) -> Exported:
    family = FAMILIES[family_id]
    torch.manual_seed(0)
    model = create_model(family.name, **family.overrides)
    checkpoint = save_checkpoint(model, root.parent / f"{family_id}.safetensors")
    entries = export_model(
        ExportRequest(
            model=family.name,
            checkpoint=checkpoint,
            overrides=family.overrides,
            buckets=buckets or family.buckets,
            repository=root,
            **request,
        ),
        log=lambda _: None,
    )
    return Exported(family, model, entries)


@pytest.fixture(scope="module", params=list(FAMILIES))
def fused_onnx(request, tmp_path_factory) -> Exported:
    return _export(request.param, tmp_path_factory.mktemp(request.param) / "repo")


@pytest.fixture(scope="module", params=MECHANISMS)
def unfused_onnx(request, tmp_path_factory) -> Exported:
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(f"{request.param}-unfused") / "repo"
    return _export(request.param, root, family.buckets[:1], fused=False)


@pytest.fixture(scope="module", params=MECHANISMS)
def torchscript(request, tmp_path_factory) -> Exported:
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(f"{request.param}-ts") / "repo"
    return _export(request.param, root, family.buckets[:1], artifact_format="torchscript")


def _inputs(bucket: int, batch: int = 8) -> np.ndarray:
    return np.random.default_rng(bucket).standard_normal((batch, 3, bucket, bucket)).astype(np.float32)


def _reference(model: nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return {"logits": out.logits.numpy(), "embedding": out.embedding.numpy()}


def _assert_matches(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], limit: float) -> None:
    for name, want in expected.items():
        error = np.linalg.norm(actual[name] - want) / np.linalg.norm(want)
        assert error <= limit, f"{name}: relative error {error:.2e} > {limit:.0e}"


def _onnx_run(path: Path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda x: dict(zip(names, session.run(None, {"pixel_values": x}), strict=True))


def _torchscript_run(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path))
    return _tuple_run(module)


def _pt2_run(path: Path):
    return _tuple_run(torch.export.load(str(path)).module())


def _tuple_run(module):
    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            logits, embedding = module(torch.from_numpy(x))
        return {"logits": logits.numpy(), "embedding": embedding.numpy()}

    return run


def _op_counts(path: Path) -> dict[str, int]:
    proto = onnx.load(str(path))
    nodes = list(proto.graph.node) + [node for function in proto.functions for node in function.node]
    counts: dict[str, int] = {}
    for node in nodes:
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


def _opset(path: Path) -> int:
    return next(
        o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain == ""
    )


def _assert_batch_independent(run, bucket: int) -> None:
    """Each sample's outputs are the same whether it runs alone, in a batch of 3 or in a batch of 8."""
    x = _inputs(bucket, max(BATCHES))
    full = run(x)
    for batch in BATCHES[:-1]:
        part = run(x[:batch])
        for name in ("logits", "embedding"):
            np.testing.assert_allclose(part[name], full[name][:batch], rtol=1e-5, atol=1e-6)


def test_onnx_export_writes_one_entry_per_bucket(fused_onnx):
    assert [e.bucket for e in fused_onnx.entries] == list(fused_onnx.family.buckets)
    for entry in fused_onnx.entries:
        assert entry.artifact == entry.path / "1" / "model.onnx"
        assert entry.input_shape == (3, entry.bucket, entry.bucket)


def test_onnx_runs_in_onnxruntime_and_matches_pytorch(fused_onnx):
    for entry in fused_onnx.entries:
        x = _inputs(entry.bucket)
        _assert_matches(_onnx_run(entry.artifact)(x), _reference(fused_onnx.model, x), FP32_TOLERANCE)


def test_onnx_has_one_fused_attention_node_per_softmax_layer_and_no_softmax(fused_onnx):
    for entry in fused_onnx.entries:
        counts = _op_counts(entry.artifact)
        assert _opset(entry.artifact) >= 23
        assert counts.get("Attention", 0) == fused_onnx.family.softmax_layers
        assert counts.get("Softmax", 0) == 0


def test_onnx_batch_axis_is_dynamic(fused_onnx):
    entry = fused_onnx.entries[0]
    graph = onnx.load(str(entry.artifact)).graph
    for value in (*graph.input, *graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param, f"{value.name} has a fixed batch size"
    _assert_batch_independent(_onnx_run(entry.artifact), entry.bucket)


def test_unfused_onnx_has_one_softmax_per_layer_and_matches(unfused_onnx):
    (entry,) = unfused_onnx.entries
    counts = _op_counts(entry.artifact)
    assert _opset(entry.artifact) == 18
    assert counts.get("Attention", 0) == 0
    assert counts.get("Softmax", 0) == unfused_onnx.family.softmax_layers
    x = _inputs(entry.bucket)
    _assert_matches(_onnx_run(entry.artifact)(x), _reference(unfused_onnx.model, x), FP32_TOLERANCE)


def test_torchscript_keeps_one_sdpa_per_layer_and_matches(torchscript):
    (entry,) = torchscript.entries
    assert entry.artifact.name == "model.pt" and entry.platform == "pytorch_libtorch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(entry.artifact))
    graph = str(module.inlined_graph)
    assert graph.count("aten::scaled_dot_product_attention") == torchscript.family.softmax_layers
    # Triton's libtorch backend binds the config's input to the forward argument of the same name.
    assert module.forward.schema.arguments[1].name == entry.input_name == "pixel_values"
    x = _inputs(entry.bucket)
    _assert_matches(_torchscript_run(entry.artifact)(x), _reference(torchscript.model, x), FP32_TOLERANCE)
    _assert_batch_independent(_torchscript_run(entry.artifact), entry.bucket)


def test_pt2_beside_torchscript_loads_and_matches(torchscript):
    (entry,) = torchscript.entries
    assert entry.pt2_artifact == entry.artifact.with_suffix(".pt2")
    x = _inputs(entry.bucket)
    _assert_matches(_pt2_run(entry.pt2_artifact)(x), _reference(torchscript.model, x), FP32_TOLERANCE)
    _assert_batch_independent(_pt2_run(entry.pt2_artifact), entry.bucket)
