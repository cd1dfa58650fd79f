"""The execution runtimes agree: ONNX Runtime, PyTorch (pt2, TorchScript, checkpoint) and the Triton
runtime (tritonclient over KServe v2, against a real `vitserve serve --role pool` process) give the
same top-5 and embeddings for the same digit images; runtime selection and pool failures behave as
documented in service/runtimes.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from export import read_entry
from export.repository import ModelEntry
from models import build_model, save_checkpoint
from service.runtimes import RuntimeUnavailable, load_runtime
from service.runtimes.ort import OnnxRuntime
from service.runtimes.torch_runtime import TorchOptions, TorchRuntime, padded_batch
from service.runtimes.triton_runtime import TritonRuntime, TritonTarget
from service.settings import Settings
from support.digits import DIGITS_MODELS, digits_config, load_digits_images, normalize
from support.repos import Backbone
from support.server import ServerProcess, free_port, start_server

BUCKET = 32
IMAGES = 12
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
# torch's thread count is process-wide: keep the session's, so other tests are not slowed down.
TORCH_THREADS = torch.get_num_threads()


def top5(logits: np.ndarray) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :5]


def assert_same_outputs(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(top5(actual["logits"]), top5(expected["logits"]))
    np.testing.assert_allclose(actual["logits"], expected["logits"], **TOLERANCE)
    np.testing.assert_allclose(actual["embedding"], expected["embedding"], **TOLERANCE)


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """A seeded digits-sized ViT exported as ONNX (`vit_digits`) and TorchScript + pt2 (`vit_digits_ts`),
    with its checkpoint beside the repository."""
    root = tmp_path_factory.mktemp("repository")
    arch, overrides = DIGITS_MODELS["vit"]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(digits_config("vit", BUCKET))
    checkpoint = save_checkpoint(model, root.parent / "vit_digits.safetensors")
    for artifact_format, name in (("onnx", "vit_digits"), ("torchscript", "vit_digits_ts")):
        Backbone(name, arch, (BUCKET,), overrides).export(root, checkpoint, artifact_format)
    return root


@pytest.fixture(scope="module")
def onnx_entry(repository: Path) -> ModelEntry:
    return read_entry(repository / f"vit_digits_{BUCKET}")


@pytest.fixture(scope="module")
def images(onnx_entry: ModelEntry) -> np.ndarray:
    """Real digit images, normalized like the gateway does: the batch every runtime receives."""
    data = load_digits_images(BUCKET)
    return normalize(data.test_images[:IMAGES], onnx_entry.config).numpy()


@pytest.fixture(scope="module")
def reference(onnx_entry: ModelEntry, images: np.ndarray) -> dict[str, np.ndarray]:
    return OnnxRuntime(onnx_entry, threads=2).run(images)


def torch_entry(repository: Path, tmp_path: Path, source: str) -> ModelEntry:
    """An entry whose only PyTorch artifact is `source`, to walk the loader's preference order."""
    if source == "model.pt2":
        return read_entry(repository / f"vit_digits_ts_{BUCKET}")
    if source == "model.pt":
        entry = Path(shutil.copytree(repository / f"vit_digits_ts_{BUCKET}", tmp_path / "ts"))
        (entry / "1" / "model.pt2").unlink()
        return read_entry(entry)
    entry = Path(shutil.copytree(repository / f"vit_digits_{BUCKET}", tmp_path / "onnx"))
    shutil.copy(repository.parent / "vit_digits.safetensors", entry / "1" / "model.safetensors")
    return read_entry(entry)


@pytest.mark.parametrize("source", ["model.pt2", "model.pt", "model.safetensors"])
def test_torch_runtime_matches_onnxruntime(repository, tmp_path, images, reference, source):
    runtime = TorchRuntime(torch_entry(repository, tmp_path, source), threads=TORCH_THREADS)
    assert runtime.source == source
    assert source in runtime.describe()
    assert_same_outputs(reference, runtime.run(images))


def test_torch_runtime_without_weights_says_what_to_add(repository, tmp_path):
    entry = read_entry(Path(shutil.copytree(repository / f"vit_digits_{BUCKET}", tmp_path / "onnx")))
    with pytest.raises(FileNotFoundError, match="model.pt2.*model.safetensors.*save_checkpoint"):
        TorchRuntime(entry, threads=TORCH_THREADS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only rules")
def test_torch_options_on_cpu_are_float32():
    assert TorchOptions().resolve() == (torch.device("cpu"), "fp32")
    with pytest.raises(ValueError, match="needs CUDA"):
        TorchOptions(precision="fp16").resolve()
    with pytest.raises(ValueError, match="needs CUDA"):
        TorchOptions(compile="cuda-graphs").resolve()
    with pytest.raises(ValueError, match="CUDA is not available"):
        TorchOptions(device="cuda").resolve()


def test_padded_batch_sizes_are_powers_of_two_up_to_the_cap():
    assert [padded_batch(n, 24) for n in (1, 2, 3, 5, 9, 17, 24)] == [1, 2, 4, 8, 16, 24, 24]


@pytest.fixture(scope="module")
def pool(repository: Path, tmp_path_factory) -> ServerProcess:
    """A real `vitserve serve --role pool` process serving only the ONNX entry."""
    server = start_server(
        tmp_path_factory.mktemp("pool-logs"), repository=repository, role="pool", models="vit_digits"
    )
    yield server
    server.stop()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_runtime_against_a_vitserve_pool_matches_onnxruntime(
    pool, onnx_entry, images, reference, binary
):
    runtime = TritonRuntime(onnx_entry, TritonTarget(pool.url, "global", timeout_s=30, binary=binary))
    assert_same_outputs(reference, runtime.run(images))
    assert runtime.describe() == f"triton http 127.0.0.1:{pool.port} (pool global)"


def test_triton_server_error_is_a_failure_not_an_outage(pool, repository):
    """The pool answers 404 for an entry it does not serve: a 500 for the gateway, not a 503."""
    entry = read_entry(repository / f"vit_digits_ts_{BUCKET}")
    runtime = TritonRuntime(entry, TritonTarget(pool.url, "global"))
    with pytest.raises(RuntimeError, match="404") as failure:
        runtime.run(np.zeros((1, 3, BUCKET, BUCKET), dtype=np.float32))
    assert not isinstance(failure.value, RuntimeUnavailable)


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_dead_pool_is_unavailable_and_named(onnx_entry, scheme):
    url = f"{scheme}://127.0.0.1:{free_port()}"
    runtime = TritonRuntime(onnx_entry, TritonTarget(url, "windowed", connect_timeout_s=0.5))
    with pytest.raises(RuntimeUnavailable, match=f"pool windowed at {url}"):
        runtime.run(np.zeros((2, 3, BUCKET, BUCKET), dtype=np.float32))


def test_runtime_selection_per_model(repository, onnx_entry):
    settings = Settings(
        runtime="onnxruntime",
        runtimes="vit_digits_ts=torch, vit_digits_32=triton",
        triton_urls="global=http://127.0.0.1:8001,vit_digits=grpc://10.0.0.7:8001",
        triton_timeout_ms=2500,
    )
    assert settings.runtime_for("vit_digits_32", "vit_digits") == "triton"
    assert settings.runtime_for("vit_digits_ts_32", "vit_digits_ts") == "torch"
    assert settings.runtime_for("other_32", "other") == "onnxruntime"

    triton = load_runtime("triton", onnx_entry, 1, settings, pool="global")
    assert isinstance(triton, TritonRuntime)
    assert triton.target == TritonTarget(
        "grpc://10.0.0.7:8001", "global", timeout_s=2.5, connect_timeout_s=1.0
    )

    torch_entry_ = read_entry(repository / f"vit_digits_ts_{BUCKET}")
    assert isinstance(load_runtime("torch", torch_entry_, TORCH_THREADS, settings), TorchRuntime)

    with pytest.raises(ValueError, match="VITSERVE_TRITON_URLS has no URL"):
        load_runtime("triton", onnx_entry, 1, Settings(), pool="windowed")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("runtimes", "vit=tensorrt", "tensorrt"),
        ("runtimes", "vit", "is not NAME=VALUE"),
        ("triton_urls", "global=", "is not NAME=VALUE"),
    ],
)
def test_malformed_runtime_settings_are_rejected(field, value, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**{field: value})


def test_triton_url_must_name_scheme_host_and_port():
    with pytest.raises(ValueError, match="grpc://HOST:PORT or http://HOST:PORT"):
        TritonTarget("127.0.0.1:8001", "global")


def test_triton_timeout_is_what_is_left_of_the_batch_deadline(onnx_entry):
    runtime = TritonRuntime(onnx_entry, TritonTarget("http://127.0.0.1:9", "global", timeout_s=30))
    assert runtime._timeout_s(None) == 30
    assert runtime._timeout_s(time.monotonic() + 1e6) == 30  # a far deadline keeps the configured timeout
    assert runtime._timeout_s(time.monotonic() + 2.0) <= 2.0  # a near one shortens it
    assert runtime._timeout_s(time.monotonic() - 5.0) == pytest.approx(0.001)
