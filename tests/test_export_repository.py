"""The model repository that `vitserve export` writes: Triton's layout and ModelConfig, read back by the service.

config.pbtxt is parsed here with Triton's own protobuf (tritonclient's model_config_pb2) rather than
with export's helpers, and the ONNX graph is checked against what the config declares, since Triton
refuses a model whose config and graph disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export import ExportRequest, export_model, read_entry, read_repository
from models import BackboneConfig, create_model, save_checkpoint

LABELS = ("cat", "dog", "fish", "bird")
OVERRIDES = {"embed_dim": 32, "num_heads": 2, "depth": 2, "num_classes": len(LABELS), "labels": LABELS}
MODEL = "vit_tiny_patch16_224"
BUCKETS = (32, 64)


def _quiet(_: str) -> None:
    """Export logs its verification numbers; the tests check the artifacts themselves."""


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(MODEL, **OVERRIDES)


@pytest.fixture(scope="module")
def repository(model, tmp_path_factory) -> Path:
    """One ONNX backbone at two buckets and a TorchScript one (placed on the GPU) at one bucket."""
    root = tmp_path_factory.mktemp("export-repo") / "model_repository"
    checkpoint = save_checkpoint(model, root.parent / "model.safetensors")
    common = {"model": MODEL, "checkpoint": checkpoint, "overrides": OVERRIDES, "repository": root}
    export_model(ExportRequest(**common, buckets=BUCKETS, name="pets", max_queue_delay_us=500), log=_quiet)
    export_model(
        ExportRequest(
            **common, buckets=BUCKETS[:1], name="pets_ts", artifact_format="torchscript", instance_kind="gpu"
        ),
        log=_quiet,
    )
    return root


def _parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_repository_has_tritons_layout_and_nothing_else(repository):
    assert _files(repository) == {
        "pets_32/config.pbtxt",
        "pets_32/labels.txt",
        "pets_32/1/model.onnx",
        "pets_64/config.pbtxt",
        "pets_64/labels.txt",
        "pets_64/1/model.onnx",
        "pets_ts_32/config.pbtxt",
        "pets_ts_32/labels.txt",
        "pets_ts_32/1/model.pt",
        "pets_ts_32/1/model.pt2",
    }
    assert (repository / "pets_32" / "labels.txt").read_text().splitlines() == list(LABELS)


@pytest.mark.parametrize("entry", ["pets_32", "pets_64", "pets_ts_32"])
def test_config_pbtxt_parses_as_triton_model_config_and_round_trips(repository, entry):
    config = _parse(repository / entry / "config.pbtxt")
    again = text_format.Parse(text_format.MessageToString(config), mc.ModelConfig())
    assert again == config
    assert config.name == entry  # Triton requires the name to match the directory


def test_onnx_config_fields(repository, model):
    config = _parse(repository / "pets_64" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx"
    assert config.default_model_filename == "model.onnx"
    assert 1 <= config.max_batch_size <= 32
    (pixels,) = config.input
    assert (pixels.name, pixels.data_type, list(pixels.dims)) == ("pixel_values", mc.TYPE_FP32, [3, 64, 64])
    logits, embedding = config.output
    assert (logits.name, logits.data_type, list(logits.dims)) == ("logits", mc.TYPE_FP32, [len(LABELS)])
    assert logits.label_filename == "labels.txt"
    assert (embedding.name, embedding.data_type, list(embedding.dims)) == ("embedding", mc.TYPE_FP32, [32])
    batching = config.dynamic_batching
    assert batching.max_queue_delay_microseconds == 500
    assert batching.preferred_batch_size and max(batching.preferred_batch_size) <= config.max_batch_size
    (group,) = config.instance_group
    # The default leaves placement to Triton: a GPU when the server has one, whatever the precision.
    assert group.count == 1 and group.kind == mc.ModelInstanceGroup.KIND_AUTO
    params = {key: value.string_value for key, value in config.parameters.items()}
    assert params["backbone"] == "pets" and params["arch"] == MODEL
    assert params["attention"] == "global"
    assert (params["patch_size"], params["window_size"], params["bucket"]) == ("16", "0", "64")
    assert [float(v) for v in params["mean"].split(",")] == list(model.config.mean)
    assert [float(v) for v in params["std"].split(",")] == list(model.config.std)
    assert params["labels_file"] == "labels.txt"
    assert BackboneConfig.from_dict(json.loads(params["model_config"])) == model.config


def test_torchscript_config_uses_libtorch_output_names(repository):
    config = _parse(repository / "pets_ts_32" / "config.pbtxt")
    assert config.platform == "pytorch_libtorch"
    assert config.default_model_filename == "model.pt"
    assert [o.name for o in config.output] == ["logits__0", "embedding__1"]
    (group,) = config.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU, "an fp32 entry exported for the GPU lands on it"


def test_onnx_graph_agrees_with_config(repository):
    """Input/output names, dtypes and shapes in the graph are the config's, with a symbolic batch axis."""
    for entry in ("pets_32", "pets_64"):
        config = _parse(repository / entry / "config.pbtxt")
        graph = onnx.load(str(repository / entry / "1" / "model.onnx")).graph
        declared = {t.name: list(t.dims) for t in (*config.input, *config.output)}
        for value in (*graph.input, *graph.output):
            dims = value.type.tensor_type.shape.dim
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            assert dims[0].dim_param, f"{entry}: {value.name} batch axis is fixed"
            assert [d.dim_value for d in dims[1:]] == declared.pop(value.name)
        assert not declared, f"{entry}: config declares tensors the graph lacks: {declared}"


def test_read_repository_reads_every_entry_back(repository, model):
    entries = read_repository(repository)
    assert [(e.name, e.bucket) for e in entries] == [("pets_32", 32), ("pets_64", 64), ("pets_ts_32", 32)]
    onnx_entry = entries[1]
    assert onnx_entry.backbone == "pets" and onnx_entry.arch == MODEL
    assert onnx_entry.config == model.config
    assert onnx_entry.labels == LABELS
    assert onnx_entry.artifact == repository / "pets_64" / "1" / "model.onnx"
    assert onnx_entry.version == 1 and onnx_entry.precision == "fp32"
    assert onnx_entry.attention == ("global",)
    assert onnx_entry.tokens == (64 // 16) ** 2
    assert onnx_entry.input_shape == (3, 64, 64)
    assert (onnx_entry.logits_name, onnx_entry.embedding_name) == ("logits", "embedding")
    assert onnx_entry.max_queue_delay_us == 500
    assert entries[2].pt2_artifact == repository / "pets_ts_32" / "1" / "model.pt2"


def test_repository_entry_serves_the_checkpoint_it_was_exported_from(repository, model):
    """What a runtime does with an entry: normalize with its mean/std, run, read labels."""
    entry = read_entry(repository / "pets_32")
    images = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    pixels = (images - np.array(entry.mean, np.float32)[:, None, None]) / np.array(entry.std, np.float32)[
        :, None, None
    ]
    session = ort.InferenceSession(str(entry.artifact), providers=["CPUExecutionProvider"])
    logits, _ = session.run([entry.logits_name, entry.embedding_name], {entry.input_name: pixels})
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels)).logits.numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    assert [entry.labels[i] for i in logits.argmax(1)] == [LABELS[i] for i in expected.argmax(1)]


def test_pt2_batch_axis_has_no_upper_bound(repository, model):
    """The loaded program must accept any batch a config's max_batch_size (or a runtime's power-of-two
    padding) allows; an exported upper bound becomes a guard that fails such batches."""
    entry = read_entry(repository / "pets_ts_32")
    program = torch.export.load(str(entry.pt2_artifact)).module()
    pixels = torch.randn(129, 3, 32, 32)
    with torch.no_grad():
        logits, _ = program(pixels)
        expected = model(pixels).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
