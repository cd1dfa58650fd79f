"""The sessions of one backbone hold one copy of its weights (README "Memory", ARCHITECTURE "Shapes").

Each shape is its own artifact, and the exporter names folded weights (`val_1655`) by their place in
the traced graph, so the same weight carries a different name in every shape; and without a checkpoint
every export run draws the weights afresh unless it is seeded. Either would give each shape a private
copy of the weights in the gateway. These tests read real artifacts exported here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from export.repository import ModelEntry, read_entry
from service.runtimes.ort_weights import MIN_SHARED_BYTES, SharedWeights
from support.repos import PHOTO_GLOBAL, Backbone


def _large_initializers(artifact: Path) -> dict[str, tuple[str, int]]:
    """name -> (content digest, bytes) of the initializers SharedWeights considers."""
    found = {}
    for tensor in onnx.load(str(artifact)).graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.nbytes >= MIN_SHARED_BYTES:
            found[tensor.name] = (hashlib.sha256(array.tobytes()).hexdigest(), array.nbytes)
    return found


def _artifact(repository: Path, entry: str) -> Path:
    return read_entry(repository / entry).artifact


def _outputs(entry: ModelEntry, store: SharedWeights | None, image: np.ndarray) -> list[np.ndarray]:
    artifact = entry.artifact
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if store is not None:
        options.add_session_config_entry("session.disable_prepacking", "1")
        store.attach(artifact, options)
    return ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"]).run(
        None, {entry.input_name: image}
    )


@pytest.fixture(scope="module")
def second_run_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photo ViT at another shape, exported by a separate run after the global RNG moved on."""
    root = tmp_path_factory.mktemp("second-run")
    torch.manual_seed(12345)
    torch.rand(1000)
    Backbone(PHOTO_GLOBAL.name, PHOTO_GLOBAL.model, ((256, 192),), PHOTO_GLOBAL.overrides).export(root)
    return root


def test_windowed_shapes_share_weights_stored_under_different_names(photo_repository: Path) -> None:
    small = _artifact(photo_repository, "swin_windowed_448")
    large = _artifact(photo_repository, "swin_windowed_896")
    small_tensors, large_tensors = _large_initializers(small), _large_initializers(large)
    renamed = {
        name
        for name, (digest, _) in large_tensors.items()
        if any(d == digest and n != name for n, (d, _) in small_tensors.items())
    }
    assert renamed, (
        "the exporter named every weight alike in both shapes; this test no longer covers renaming"
    )

    store = SharedWeights()
    assert store.attach(small, ort.SessionOptions()) == 0
    reused = store.attach(large, ort.SessionOptions())
    large_bytes = sum(size for _, size in large_tensors.values())
    assert reused >= 0.9 * large_bytes, f"896 reused {reused} of its {large_bytes} weight bytes from 448"
    assert store.nbytes <= 1.1 * sum(size for _, size in small_tensors.values())


def test_separate_export_runs_of_a_backbone_write_the_same_weights(
    photo_repository: Path, second_run_repository: Path
) -> None:
    first = _artifact(photo_repository, "vit_global_224")
    second = _artifact(second_run_repository, "vit_global_256x192")
    first_digests = {digest for digest, _ in _large_initializers(first).values()}
    second_tensors = _large_initializers(second)
    missing = [name for name, (digest, _) in second_tensors.items() if digest not in first_digests]
    # Shape-dependent constants (e.g. a position table interpolated in the graph) may differ; weights may not.
    assert sum(second_tensors[n][1] for n in missing) <= 0.1 * sum(s for _, s in second_tensors.values()), (
        missing
    )

    store = SharedWeights()
    store.attach(first, ort.SessionOptions())
    assert store.attach(second, ort.SessionOptions()) >= 0.9 * sum(s for _, s in second_tensors.values())


def test_sessions_on_shared_weights_compute_what_private_sessions_compute(photo_repository: Path) -> None:
    store = SharedWeights()
    rng = np.random.default_rng(0)
    for entry in ("swin_windowed_448", "swin_windowed_896", "vit_global_224", "vit_global_192x256"):
        served = read_entry(photo_repository / entry)
        image = rng.standard_normal((1, *served.input_shape), dtype=np.float32)
        for shared, private in zip(
            _outputs(served, store, image), _outputs(served, None, image), strict=True
        ):
            np.testing.assert_allclose(shared, private, rtol=1e-5, atol=1e-5, err_msg=entry)
