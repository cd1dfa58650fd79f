"""Trained digits models keep what they learned through export: fp32 exactly, int8 and fp16 within bounds.

Random weights cannot show that quantization preserved a decision boundary; the digits ViT and Swin
(session fixtures, trained on scikit-learn's digits) can. Each is saved as a checkpoint and exported
through `export_model` like a user's model, then evaluated in ONNX Runtime on the held-out digits.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export import ExportRequest, ModelEntry, export_model
from models import save_checkpoint
from support.digits import DigitsData, digits_model_spec, normalize

BUCKET = 32
FAMILIES = ("vit", "swin")
MIN_INT8_COSINE = 0.99
MIN_INT8_AGREEMENT = 0.98
FP16_TOLERANCE = 1e-2


def _quiet(_: str) -> None:
    """Export logs its verification numbers; these tests measure the artifacts on real data instead."""


@pytest.fixture(scope="module")
def exported(digits_vit, digits_swin, tmp_path_factory) -> dict[tuple[str, str], ModelEntry]:
    """(family, precision) -> entry: fp32 and int8 for both families, fp16 for the ViT."""
    root = tmp_path_factory.mktemp("digits-export") / "model_repository"
    entries = {}
    for family, model, precisions in (
        ("vit", digits_vit, ("fp32", "int8", "fp16")),
        ("swin", digits_swin, ("fp32", "int8")),
    ):
        checkpoint = save_checkpoint(model, root.parent / f"digits_{family}.safetensors")
        name, overrides = digits_model_spec(family)
        for precision in precisions:
            request = ExportRequest(
                model=name,
                checkpoint=checkpoint,
                overrides=overrides,
                buckets=(BUCKET,),
                precision=precision,
                name=f"digits_{family}_{precision}",
                repository=root,
            )
            (entries[family, precision],) = export_model(request, log=_quiet)
    return entries


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(request, family: str) -> nn.Module:
    return request.getfixturevalue(f"digits_{family}")


@pytest.fixture
def pixels(digits_data: DigitsData, model: nn.Module) -> np.ndarray:
    """The held-out digits, normalized with the model's own mean/std (ViT and Swin differ)."""
    return normalize(digits_data.test_images, model.config).numpy()


def _run(entry: ModelEntry, pixels: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(entry.artifact), providers=["CPUExecutionProvider"])
    logits, embedding = session.run(["logits", "embedding"], {"pixel_values": pixels})
    return {"logits": logits, "embedding": embedding}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_fp32_onnx_accuracy_equals_pytorch(exported, model, pixels, digits_data, family):
    assert model.config.labels == exported[family, "fp32"].labels == digits_data.labels
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels)).logits.numpy()
    logits = _run(exported[family, "fp32"], pixels)["logits"]
    labels = digits_data.test_labels.numpy()
    assert (logits.argmax(1) == labels).mean() == (expected.argmax(1) == labels).mean()
    assert (logits.argmax(1) == expected.argmax(1)).all()
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) <= 1e-4


def test_int8_keeps_embeddings_and_decisions(exported, pixels, digits_data, family):
    fp32, int8 = exported[family, "fp32"], exported[family, "int8"]
    ops = {node.op_type for node in onnx.load(str(int8.artifact)).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops, "the int8 graph is not quantized"
    assert int8.artifact.stat().st_size < 0.6 * fp32.artifact.stat().st_size
    reference, quantized = _run(fp32, pixels), _run(int8, pixels)
    assert _cosines(quantized["embedding"], reference["embedding"]).mean() >= MIN_INT8_COSINE
    agreement = (quantized["logits"].argmax(1) == reference["logits"].argmax(1)).mean()
    assert agreement >= MIN_INT8_AGREEMENT
    labels = digits_data.test_labels.numpy()
    fp32_accuracy = (reference["logits"].argmax(1) == labels).mean()
    int8_accuracy = (quantized["logits"].argmax(1) == labels).mean()
    assert int8_accuracy >= fp32_accuracy - (1 - MIN_INT8_AGREEMENT)


def test_fp16_export_matches_pytorch_within_tolerance(exported, digits_data, digits_vit):
    pixels = normalize(digits_data.test_images, digits_vit.config).numpy()
    entry = exported["vit", "fp16"]
    graph = onnx.load(str(entry.artifact)).graph
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)
    # Inputs and outputs stay float32, so every runtime feeds the same tensors whatever the precision.
    assert {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)} == {onnx.TensorProto.FLOAT}
    with torch.no_grad():
        expected = digits_vit(torch.from_numpy(pixels))
    actual = _run(entry, pixels)
    for name in ("logits", "embedding"):
        want = getattr(expected, name).numpy()
        assert np.linalg.norm(actual[name] - want) / np.linalg.norm(want) <= FP16_TOLERANCE
    assert entry.precision == "fp16"
