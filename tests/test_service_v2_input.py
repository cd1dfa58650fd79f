"""Hostile and malformed KServe v2 infer requests: every one is answered 400/413/422 with the KServe JSON
error shape before anything is computed, and the server keeps serving. The classification extension
and `binary_data_output: false` behave as tritonclient expects from Triton."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from support.server import ServerProcess, assert_serves, scrape_metrics


@pytest.fixture(scope="module")
def served(photo_server: ServerProcess) -> dict:
    """The smallest global entry as /v1/models describes it (names come from the server, not the test)."""
    models = httpx.get(f"{photo_server.url}/v1/models").json()["models"]
    return min((m for m in models if m["pool"] == "global"), key=lambda m: m["bucket"])


def _tensor(shape: list, **fields: object) -> dict:
    return {"name": "pixel_values", "shape": shape, "datatype": "FP32", **fields}


def _binary(head: dict, payload: bytes, header_length: int | None = None) -> dict:
    encoded = json.dumps(head).encode()
    length = len(encoded) if header_length is None else header_length
    return {"content": encoded + payload, "headers": {"inference-header-content-length": str(length)}}


def malformed_cases(side: int, max_batch: int) -> dict[str, dict]:
    """id -> httpx request keyword arguments; each is a request Triton would refuse."""
    shape = [1, 3, side, side]
    values = 3 * side * side
    zeros = [0.0] * values
    row = np.zeros(values, np.float32).tobytes()
    return {
        "not json": {"content": b"{not json"},
        "json but not an object": {"json": [1, 2, 3]},
        "no inputs": {"json": {"inputs": []}},
        "binary_data_size null": _binary(
            {"inputs": [_tensor(shape, parameters={"binary_data_size": None})]}, row
        ),
        "binary_data_size a string": _binary(
            {"inputs": [_tensor(shape, parameters={"binary_data_size": str(len(row))})]}, row
        ),
        "data of empty objects": {"json": {"inputs": [_tensor(shape, data=[{}] * values)]}},
        "data null values": {"json": {"inputs": [_tensor(shape, data=[None] * values)]}},
        "data numeric strings": {"json": {"inputs": [_tensor(shape, data=["1.5"] * values)]}},
        "data booleans": {"json": {"inputs": [_tensor(shape, data=[True] * values)]}},
        "data NaN": {
            "content": json.dumps({"inputs": [_tensor(shape, data=[float("nan")] + zeros[1:])]}).encode()
        },
        "data beyond float32": {"json": {"inputs": [_tensor(shape, data=[1e39] + zeros[1:])]}},
        "data too short": {"json": {"inputs": [_tensor(shape, data=zeros[:-1])]}},
        "shape overflowing int64": {"json": {"inputs": [_tensor([2**62, 3, side, side], data=zeros)]}},
        "negative dim": {"json": {"inputs": [_tensor([-1, 3, side, side], data=zeros)]}},
        "batch above max_batch_size": {
            "json": {"inputs": [_tensor([max_batch + 1, 3, side, side], data=zeros)]}
        },
        "wrong image dims": {"json": {"inputs": [_tensor([1, 3, side, side + 1], data=zeros)]}},
        "unknown datatype": {"json": {"inputs": [{**_tensor(shape, data=zeros), "datatype": "BYTES"}]}},
        "second unknown input": {
            "json": {"inputs": [_tensor(shape, data=zeros), {**_tensor(shape, data=zeros), "name": "x"}]}
        },
        "binary size not a multiple of the dtype": _binary(
            {"inputs": [_tensor(shape, parameters={"binary_data_size": len(row) + 2})]}, row + b"\0\0"
        ),
        "binary size larger than the body": _binary(
            {"inputs": [_tensor(shape, parameters={"binary_data_size": len(row)})]}, row[:-4]
        ),
        "body longer than the binary sizes": _binary(
            {"inputs": [_tensor(shape, parameters={"binary_data_size": len(row)})]}, row + b"\0" * 4
        ),
        "header length past the body": _binary(
            {"inputs": [_tensor(shape, parameters={"binary_data_size": len(row)})]}, row, 10**9
        ),
        "header length not a number": _binary(
            {"inputs": [_tensor(shape, parameters={"binary_data_size": len(row)})]}, row, -5
        ),
        "unknown output": {
            "json": {"inputs": [_tensor(shape, data=zeros)], "outputs": [{"name": "probabilities"}]}
        },
        "binary_data_output as a string": {
            "json": {"inputs": [_tensor(shape, data=zeros)], "parameters": {"binary_data_output": "false"}}
        },
        "binary_data as a number": {
            "json": {
                "inputs": [_tensor(shape, data=zeros)],
                "outputs": [{"name": "logits", "parameters": {"binary_data": 1}}],
            }
        },
        "classification as a string": {
            "json": {
                "inputs": [_tensor(shape, data=zeros)],
                "outputs": [{"name": "logits", "parameters": {"classification": "3"}}],
            }
        },
        "timeout negative": {"json": {"inputs": [_tensor(shape, data=zeros)], "parameters": {"timeout": -1}}},
    }


CASE_IDS = list(malformed_cases(224, 8))


@pytest.mark.parametrize("case", CASE_IDS)
def test_malformed_infer_request_is_a_json_client_error_and_never_computed(
    photo_server: ServerProcess, served: dict, case: str
) -> None:
    url = photo_server.url
    request = malformed_cases(served["bucket"], served["max_batch_size"])[case]
    before = scrape_metrics(url)

    response = httpx.post(f"{url}/v2/models/{served['name']}/infer", timeout=60, **request)

    assert response.status_code in (400, 413, 422), response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body["error"], str) and len(body["error"]) > 10, body
    delta = scrape_metrics(url) - before
    assert delta.value("vitserve_batch_size_count", model=served["name"]) == 0
    assert delta.value("vitserve_requests_total", endpoint="v2_infer", status=str(response.status_code)) == 1


def test_the_server_keeps_serving_after_every_malformed_request(photo_server: ServerProcess) -> None:
    assert_serves(photo_server.url)


@pytest.fixture(scope="module")
def client(photo_server: ServerProcess):
    client = triton.InferenceServerClient(url=photo_server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def _pixels(side: int, rows: int = 2) -> np.ndarray:
    return np.random.default_rng(side).standard_normal((rows, 3, side, side)).astype(np.float32)


def test_classification_extension_answers_like_triton(client, served: dict) -> None:
    """tritonclient's class_count: BYTES [batch, k] of "score:index:label", the k largest logits in order."""
    pixels = _pixels(served["bucket"])
    tensor = triton.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    plain = client.infer(served["name"], [tensor], outputs=[triton.InferRequestedOutput("logits")])
    logits = plain.as_numpy("logits")
    for binary in (True, False):
        top = client.infer(
            served["name"],
            [tensor],
            outputs=[triton.InferRequestedOutput("logits", binary_data=binary, class_count=3)],
        ).as_numpy("logits")
        assert top.shape == (2, 3)
        for row in range(2):
            # tritonclient returns BYTES as bytes from binary data and as str from JSON data
            fields = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in top[row]]
            indexes = [int(f[1]) for f in fields]
            assert indexes == list(np.argsort(-logits[row], kind="stable")[:3])
            assert [float(f[0]) for f in fields] == pytest.approx(logits[row, indexes], abs=1e-5)
            assert all(len(f) == 3 and f[2] for f in fields)  # the entry has labels: score:index:label


def test_binary_data_output_false_returns_json_tensors(photo_server: ServerProcess, served: dict) -> None:
    pixels = _pixels(served["bucket"], rows=1)
    head = {
        "inputs": [_tensor(list(pixels.shape), parameters={"binary_data_size": pixels.nbytes})],
        "parameters": {"binary_data_output": False},
    }
    response = httpx.post(
        f"{photo_server.url}/v2/models/{served['name']}/infer", timeout=60, **_binary(head, pixels.tobytes())
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in response.headers
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert set(outputs) == {"logits", "embedding"}
    assert all(len(o["data"]) == np.prod(o["shape"]) for o in outputs.values())
