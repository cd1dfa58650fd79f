"""tritonclient.http against vitserve's KServe v2 endpoints, as against Triton: health, readiness, model
metadata, and inference with binary and JSON tensors equal to ONNX Runtime on the same tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from export import read_entry
from support.server import ServerProcess

MODEL = "vit_global_224"


@pytest.fixture(scope="module")
def client(photo_server: ServerProcess) -> triton.InferenceServerClient:
    client = triton.InferenceServerClient(url=photo_server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def test_health_readiness_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, model_version="1")
    assert client.get_server_metadata()["name"] == "vitserve"
    metadata = client.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]
    assert metadata["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 1000]},
        {"name": "embedding", "datatype": "FP32", "shape": [-1, 192]},
    ]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_onnxruntime_on_the_same_tensor(
    client: triton.InferenceServerClient, photo_repository: Path, binary: bool
) -> None:
    pixels = np.random.default_rng(int(binary)).standard_normal((3, 3, 224, 224)).astype(np.float32)
    tensor = triton.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "embedding")]

    result = client.infer(MODEL, [tensor], outputs=outputs, model_version="1", request_id="r1")

    entry = read_entry(photo_repository / MODEL)
    session = ort.InferenceSession(str(entry.artifact), providers=["CPUExecutionProvider"])
    logits, embedding = session.run(["logits", "embedding"], {"pixel_values": pixels})
    assert result.get_response()["id"] == "r1"
    np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("embedding"), embedding, atol=1e-4)


def test_unknown_model_is_an_error_tritonclient_reports(client: triton.InferenceServerClient) -> None:
    """KServe v2 errors are {"error": "<message>"}: tritonclient reads the message and the status."""
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as raised:
        client.get_model_metadata("nope")
    assert raised.value.status() == "404"
    assert client.is_server_ready()
