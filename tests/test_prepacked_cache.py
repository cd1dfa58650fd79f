"""Pre-packed weights written once and mapped (`VITSERVE_ORT_PREPACKED_CACHE`, README "Memory").

The cache must answer what the artifact answers, keep its packed layouts (else it is just a slower
copy), give the shapes of a backbone the same weight files, reuse what it wrote, and never stop the
service from serving when it cannot be written or read back. These tests run ONNX Runtime on
artifacts exported here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.repository import read_entry
from service.cli import build_parser
from service.runtimes import load_runtime
from service.runtimes.ort import OnnxRuntime
from service.runtimes.ort_prepacked import PACKED_PREFIX, PrepackedCache
from service.settings import Settings
from support.server import encode_image, running_server

ENTRIES = ("swin_windowed_448", "swin_windowed_896", "vit_global_224", "vit_global_192x256")


def _weight_files(model: Path) -> dict[str, int]:
    """Weight file name -> bytes, of every external initializer `model` maps."""
    files = {}
    for tensor in onnx.load(str(model), load_external_data=False).graph.initializer:
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location")
        if location:
            files[location] = (model.parent / location).stat().st_size
    return files


def test_mapped_sessions_compute_what_the_artifact_computes(photo_repository: Path, tmp_path: Path) -> None:
    cache = PrepackedCache(tmp_path)
    rng = np.random.default_rng(0)
    for name in ENTRIES:
        entry = read_entry(photo_repository / name)
        image = rng.standard_normal((2, *entry.input_shape), dtype=np.float32)
        mapped = OnnxRuntime(entry, 1, "off", prepacked=cache).run(image)
        reference = ort.InferenceSession(str(entry.artifact), providers=["CPUExecutionProvider"]).run(
            [entry.logits_name, entry.embedding_name], {entry.input_name: image}
        )
        for got, want in zip((mapped["logits"], mapped["embedding"]), reference, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_the_cache_keeps_the_packed_layouts(photo_repository: Path, tmp_path: Path) -> None:
    model = PrepackedCache(tmp_path).model_for(read_entry(photo_repository / "vit_global_224").artifact)
    packed = [
        tensor.name
        for tensor in onnx.load(str(model), load_external_data=False).graph.initializer
        if any(entry.key.startswith(PACKED_PREFIX) for entry in tensor.external_data)
    ]
    # Two blocks of a ViT: qkv, proj, fc1, fc2 each, plus patch embedding and head.
    assert len(packed) >= 8, f"only {packed} carry a packed layout"


def test_shapes_of_a_backbone_map_the_same_weight_files(photo_repository: Path, tmp_path: Path) -> None:
    cache = PrepackedCache(tmp_path)
    small = _weight_files(cache.model_for(read_entry(photo_repository / "swin_windowed_448").artifact))
    large = _weight_files(cache.model_for(read_entry(photo_repository / "swin_windowed_896").artifact))
    shared = sum(size for name, size in large.items() if name in small)
    assert shared >= 0.9 * sum(large.values()), (
        f"896 maps {shared} of its {sum(large.values())} bytes from 448's files"
    )
    on_disk = sum(f.stat().st_size for f in cache.directory.glob("*.bin"))
    assert on_disk <= 1.1 * sum(small.values())


def test_a_second_cache_on_the_same_directory_reuses_the_model(
    photo_repository: Path, tmp_path: Path
) -> None:
    artifact = read_entry(photo_repository / "vit_global_224").artifact
    first = PrepackedCache(tmp_path).model_for(artifact)
    written = {path: path.stat().st_mtime_ns for path in first.parent.iterdir()}
    assert PrepackedCache(tmp_path).model_for(artifact) == first
    assert {path: path.stat().st_mtime_ns for path in first.parent.iterdir()} == written


def test_an_unwritable_cache_falls_back_to_the_artifact(
    photo_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    entry = read_entry(photo_repository / "vit_global_224")
    image = np.zeros((1, *entry.input_shape), dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="service.runtimes.ort"):
        served = OnnxRuntime(entry, 1, "off", prepacked=PrepackedCache(blocker)).run(image)
    assert "pre-packed model cache unusable" in caplog.text
    reference = OnnxRuntime(entry, 1, "off").run(image)
    np.testing.assert_allclose(served["logits"], reference["logits"], rtol=1e-5, atol=1e-5)


def test_a_damaged_cache_falls_back_to_the_artifact(
    photo_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = read_entry(photo_repository / "vit_global_224")
    cache = PrepackedCache(tmp_path)
    cache.model_for(entry.artifact)
    largest = max(cache.directory.glob("*.bin"), key=lambda path: path.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)
    image = np.zeros((1, *entry.input_shape), dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="service.runtimes.ort"):
        served = OnnxRuntime(entry, 1, "off", prepacked=cache).run(image)
    assert "pre-packed model cache unusable" in caplog.text
    reference = OnnxRuntime(entry, 1, "off").run(image)
    np.testing.assert_allclose(served["logits"], reference["logits"], rtol=1e-5, atol=1e-5)


def test_the_gateway_serves_from_the_cache_it_writes(photo_repository: Path, tmp_path: Path) -> None:
    cache = tmp_path / "prepacked"
    body = encode_image(np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    answers = {}
    for name, settings in {
        "cache": {"ort_prepacked_cache": cache},
        "artifact": {"ort_prepacked_cache": "off"},
    }.items():
        with running_server(tmp_path / name, repository=photo_repository, **settings) as server:
            response = httpx.post(
                f"{server.url}/v1/embed", content=body, headers={"content-type": "image/png"}, timeout=60
            )
            assert response.status_code == 200, response.text
            answers[name] = response.json()
    models = list(cache.glob("*/*.onnx"))
    assert len(models) == len(list(photo_repository.glob("*/config.pbtxt"))), models
    assert answers["cache"]["route"]["shape"] == answers["artifact"]["route"]["shape"]
    np.testing.assert_allclose(
        answers["cache"]["embedding"], answers["artifact"]["embedding"], rtol=1e-4, atol=1e-4
    )


def test_the_cache_is_on_by_default_in_the_user_cache(
    photo_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unset, the setting is $XDG_CACHE_HOME/vitserve/prepacked (outside the repository, which Triton
    reads); 'off' turns it off, and the runtime then loads the artifact itself."""
    monkeypatch.delenv("VITSERVE_ORT_PREPACKED_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    default = Settings()
    assert default.ort_prepacked_cache == tmp_path / "vitserve" / "prepacked"
    entry = read_entry(photo_repository / "vit_global_224")
    load_runtime("onnxruntime", entry, 1, default, demand=lambda: 0)
    assert len(list((tmp_path / "vitserve" / "prepacked").glob("*/*.onnx"))) == 1
    for off in ("off", ""):
        monkeypatch.setenv("VITSERVE_ORT_PREPACKED_CACHE", off)
        assert Settings().ort_prepacked_cache is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    load_runtime("onnxruntime", entry, 1, Settings(), demand=lambda: 0)
    assert not (tmp_path / "elsewhere").exists()


def test_serve_help_names_the_default_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A default computed at start (the user's cache) is shown as the directory, like every other default."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    assert f"VITSERVE_ORT_PREPACKED_CACHE, default {tmp_path / 'vitserve' / 'prepacked'}]" in text
    assert "PydanticUndefined" not in text
