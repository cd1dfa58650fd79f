"""tritonclient.grpc against vitserve's own KServe v2 gRPC service, in the pool and the gateway role.

A real pool process serves the digits ViT; a real gateway serves the digits repository with that ViT
on the triton runtime pointed at the pool's gRPC port (so its batches cross gRPC to the pool) and
the Swin on its embedded ONNX Runtime. Over gRPC both answer health, metadata, config and infer with
raw (binary) inputs, equal to their HTTP v2 endpoint and to an ONNX Runtime session on the same
tensor; bad requests get the gRPC code matching their HTTP status, are counted, never computed, and
the servers keep serving (ARCHITECTURE.md "HTTP API", service/grpc_server.py).
"""

from __future__ import annotations

import queue
import signal
import socket
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from export import read_entry
from models import build_model
from service.runtimes.ort import OnnxRuntime
from service.settings import Settings
from support.digits import digits_config
from support.repos import Backbone, DigitsRepository, build_digits_repository
from support.server import (
    PNG,
    ServerProcess,
    encode_image,
    free_port,
    prime_batch_of_two,
    running_server,
    scrape_metrics,
    start_server,
    wait_until,
)

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
OUTPUTS = ("logits", "embedding")
ROLES = ("pool", "gateway")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> DigitsRepository:
    """The digits repository layout (ViT and Swin at 32, routing file) on seeded untrained models:
    these tests compare transports, not accuracy."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vit, swin = (build_model(digits_config(family)).eval() for family in ("vit", "swin"))
    return build_digits_repository(tmp_path_factory.mktemp("grpc"), vit, swin)


def entry_name(backbone: Backbone) -> str:
    return f"{backbone.name}_{backbone.buckets[0]}"


@pytest.fixture(scope="module")
def pool(repository: DigitsRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`vitserve serve --role pool` serving the ViT, with gRPC on its own port."""
    with running_server(
        tmp_path_factory.mktemp("grpc-pool"),
        repository=repository.path,
        role="pool",
        models=repository.global_backbone.name,
        grpc_port=free_port(),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    repository: DigitsRepository, pool: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A gateway whose ViT batches go to the pool over gRPC; its Swin runs in-process."""
    with running_server(
        tmp_path_factory.mktemp("grpc-gateway"),
        repository=repository.path,
        routing=repository.routing,
        runtimes=f"{repository.global_backbone.name}=triton",
        triton_urls=f"global=grpc://{pool.grpc_address}",
        grpc_port=free_port(),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def servers(pool: ServerProcess, gateway: ServerProcess) -> dict[str, ServerProcess]:
    return {"pool": pool, "gateway": gateway}


@pytest.fixture(scope="module")
def models(repository: DigitsRepository) -> dict[str, list[str]]:
    """The entries each role serves."""
    vit, swin = entry_name(repository.global_backbone), entry_name(repository.windowed_backbone)
    return {"pool": [vit], "gateway": [vit, swin]}


def grpc_client(server: ServerProcess) -> triton_grpc.InferenceServerClient:
    assert server.grpc_address is not None
    return triton_grpc.InferenceServerClient(server.grpc_address)


def pixels(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 32, 32)).astype(np.float32)


def grpc_infer(server: ServerProcess, model: str, data: np.ndarray, **options: object):
    tensor = triton_grpc.InferInput("pixel_values", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    outputs = [triton_grpc.InferRequestedOutput(name) for name in OUTPUTS]
    with grpc_client(server) as client:
        return client.infer(model, [tensor], outputs=outputs, client_timeout=60, **options)


def http_infer(server: ServerProcess, model: str, data: np.ndarray) -> dict[str, np.ndarray]:
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    try:
        tensor = triton_http.InferInput("pixel_values", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        result = client.infer(model, [tensor])
        return {name: result.as_numpy(name) for name in OUTPUTS}
    finally:
        client.close()


@pytest.mark.parametrize("role", ROLES)
def test_health_metadata_and_config(servers: dict, models: dict, role: str) -> None:
    with grpc_client(servers[role]) as client:
        assert client.is_server_live()
        assert client.is_server_ready()
        metadata = client.get_server_metadata(as_json=True)
        assert metadata["name"] == "vitserve"
        assert "binary_tensor_data" in metadata["extensions"]
        for model in models[role]:
            assert client.is_model_ready(model)
            assert client.is_model_ready(model, model_version="1")
            http = httpx.get(f"{servers[role].url}/v2/models/{model}").json()
            got = client.get_model_metadata(model, as_json=True)
            assert got["name"] == model and got["versions"] == ["1"] and got["platform"] == http["platform"]
            for kind in ("inputs", "outputs"):
                assert [
                    {"name": t["name"], "datatype": t["datatype"], "shape": [int(d) for d in t["shape"]]}
                    for t in got[kind]
                ] == http[kind]
            config = client.get_model_config(model).config
            assert config.name == model and config.max_batch_size >= 2
            assert [i.name for i in config.input] == ["pixel_values"]


@pytest.mark.parametrize("role", ROLES)
def test_infer_with_raw_inputs_equals_http_and_onnxruntime(
    servers: dict, models: dict, repository: DigitsRepository, role: str
) -> None:
    server = servers[role]
    for model in models[role]:
        data = pixels(3, seed=len(model))
        result = grpc_infer(server, model, data, request_id="grpc-1")
        reference = OnnxRuntime(read_entry(repository.path / model), threads=1).run(data)
        over_http = http_infer(server, model, data)
        assert result.get_response().id == "grpc-1"
        assert result.get_response().model_version == "1"
        for name in OUTPUTS:
            got = result.as_numpy(name)
            assert got.shape == reference[name].shape and got.dtype == np.float32
            np.testing.assert_allclose(got, over_http[name], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got, reference[name], **TOLERANCE)


def test_typed_fp32_contents_equal_raw_inputs(pool: ServerProcess, models: dict) -> None:
    """A client sending `contents.fp32_contents` (not tritonclient's raw bytes) gets the same answer."""
    (model,) = models["pool"]
    data = pixels(2, seed=7)
    request = infer_request(model, shape=data.shape)
    request.inputs[0].contents.fp32_contents.extend(data.ravel().tolist())
    with grpc.insecure_channel(pool.grpc_address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert [o.name for o in response.outputs] == list(OUTPUTS)
    raw = grpc_infer(pool, model, data)
    for index, name in enumerate(OUTPUTS):
        typed = np.frombuffer(response.raw_output_contents[index], np.float32).reshape(
            response.outputs[index].shape
        )
        np.testing.assert_allclose(typed, raw.as_numpy(name), rtol=1e-5, atol=1e-5)


def test_classification_extension_over_grpc(gateway: ServerProcess, models: dict) -> None:
    model = models["gateway"][1]
    data = pixels(2, seed=3)
    tensor = triton_grpc.InferInput("pixel_values", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    with grpc_client(gateway) as client:
        logits = client.infer(model, [tensor], outputs=[triton_grpc.InferRequestedOutput("logits")]).as_numpy(
            "logits"
        )
        top = client.infer(
            model, [tensor], outputs=[triton_grpc.InferRequestedOutput("logits", class_count=3)]
        ).as_numpy("logits")
    assert top.shape == (2, 3)
    for row in range(2):
        fields = [element.decode().split(":") for element in top[row]]
        assert [int(f[1]) for f in fields] == list(np.argsort(-logits[row], kind="stable")[:3])
        assert [float(f[0]) for f in fields] == pytest.approx(
            logits[row, [int(f[1]) for f in fields]], abs=1e-5
        )
        assert all(f[2] == f[1] for f in fields)  # the digits' labels are their indexes


def infer_request(
    model: str,
    raw: tuple[bytes, ...] = (),
    shape: tuple[int, ...] = (1, 3, 32, 32),
    datatype: str = "FP32",
    outputs: tuple[str, ...] = (),
    version: str = "",
) -> pb.ModelInferRequest:
    """A ModelInferRequest of one `pixel_values` input, built by hand to send what tritonclient would not."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, raw_input_contents=list(raw))
    request.inputs.add(name="pixel_values", datatype=datatype, shape=list(shape))
    request.outputs.extend(pb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs)
    return request


def bad_requests(model: str, max_batch: int) -> dict[str, tuple[pb.ModelInferRequest, grpc.StatusCode]]:
    """id -> (request, the code it must get); each gets 400 or 404 over HTTP."""
    row = pixels(1).tobytes()
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    return {
        "wrong shape": (infer_request(model, (row[: len(row) // 2],), shape=(1, 3, 32, 16)), invalid),
        "wrong dtype": (infer_request(model, (row,), datatype="INT32"), invalid),
        "unknown model": (infer_request("no_such_model", (row,)), not_found),
        "unknown version": (infer_request(model, (row,), version="7"), not_found),
        "batch too large": (
            infer_request(model, (row * (max_batch + 1),), shape=(max_batch + 1, 3, 32, 32)),
            invalid,
        ),
        "raw size short": (infer_request(model, (row[:-4],)), invalid),
        "raw size long": (infer_request(model, (row + b"\0" * 4,)), invalid),
        "two raw entries for one input": (infer_request(model, (row, row)), invalid),
        "no data": (infer_request(model), invalid),
        "NaN": (infer_request(model, (np.full((1, 3, 32, 32), np.nan, np.float32).tobytes(),)), invalid),
        "unknown output": (infer_request(model, (row,), outputs=("probabilities",)), invalid),
    }


HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: "400", grpc.StatusCode.NOT_FOUND: "404"}


@pytest.mark.parametrize("role", ROLES)
def test_bad_requests_get_their_codes_are_counted_and_the_server_keeps_serving(
    servers: dict, models: dict, role: str
) -> None:
    server = servers[role]
    model = models[role][0]
    with grpc_client(server) as client:
        max_batch = client.get_model_config(model).config.max_batch_size
    before = scrape_metrics(server.url)
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for case, (request, code) in bad_requests(model, max_batch).items():
            with pytest.raises(grpc.RpcError) as failure:
                stub.ModelInfer(request, timeout=60)
            assert failure.value.code() == code, (case, failure.value.details())
            assert len(failure.value.details()) > 10, case
            trailing = dict(failure.value.trailing_metadata())
            assert trailing["vitserve-code"] in ("invalid_request", "model_not_found", "version_not_found"), (
                case
            )
    delta = scrape_metrics(server.url) - before
    assert delta.value("vitserve_batch_size_count") == 0
    for code, status in HTTP_STATUS.items():
        expected = sum(1 for _, c in bad_requests(model, max_batch).values() if c == code)
        assert delta.value("vitserve_requests_total", endpoint="grpc_infer", status=status) == expected

    result = grpc_infer(server, model, pixels(1))
    assert result.as_numpy("logits").shape[0] == 1


def test_tritonclient_errors_carry_the_grpc_status(pool: ServerProcess, models: dict) -> None:
    """What the gateway's triton runtime reads: `status()` is the gRPC code's name."""
    with pytest.raises(InferenceServerException) as failure:
        grpc_infer(pool, "no_such_model", pixels(1))
    assert failure.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in failure.value.message()
    with grpc_client(pool) as client, pytest.raises(InferenceServerException) as failure:
        client.is_model_ready("no_such_model")
    assert failure.value.status() == "StatusCode.NOT_FOUND"


def test_a_message_over_the_body_limit_is_resource_exhausted(pool: ServerProcess, models: dict) -> None:
    """gRPC itself refuses it (413 over HTTP); the server keeps serving."""
    limit = Settings().max_body_bytes  # the pool runs with the default
    request = infer_request(models["pool"][0], (bytes(limit + 1),))
    with grpc.insecure_channel(pool.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as failure:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_infer(pool, models["pool"][0], pixels(1)).as_numpy("logits").shape[0] == 1


def test_v2_timeout_that_passes_before_compute_is_deadline_exceeded(
    pool: ServerProcess, models: dict
) -> None:
    (model,) = models["pool"]
    before = scrape_metrics(pool.url)
    with pytest.raises(InferenceServerException) as failure:
        grpc_infer(pool, model, pixels(1), timeout=1)  # the v2 `timeout` parameter: 1 us
    assert failure.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    delta = scrape_metrics(pool.url) - before
    assert delta.value("vitserve_requests_total", endpoint="grpc_infer", status="504") == 1
    assert delta.value("vitserve_batch_size_count") == 0


def test_gateway_classify_runs_on_the_pool_over_grpc(gateway: ServerProcess, pool: ServerProcess) -> None:
    """/v1/classify on the gateway: its ViT batch crosses the pool's gRPC port and comes back labelled."""
    image = encode_image(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    before = scrape_metrics(pool.url)
    response = httpx.post(
        f"{gateway.url}/v1/classify", params={"route": "global"}, content=image, headers=PNG, timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["route"]["pool"] == "global" and len(body["predictions"]) == 5
    delta = scrape_metrics(pool.url) - before
    assert delta.value("vitserve_requests_total", endpoint="grpc_infer", status="200") == 1
    assert delta.value("vitserve_requests_total", endpoint="v2_infer") == 0
    with httpx.Client() as client:
        described = {m["name"]: m["runtime"] for m in client.get(f"{gateway.url}/v1/models").json()["models"]}
    assert f"triton grpc {pool.grpc_address}" in described[body["route"]["entry"]]


def test_repository_extension_over_grpc(pool: ServerProcess, models: dict) -> None:
    """tritonclient.grpc's index, unload and load drive the same lifecycle as /v2/repository."""
    (model,) = models["pool"]
    with grpc_client(pool) as client:
        (row,) = [m for m in client.get_model_repository_index().models if m.name == model]
        assert (row.version, row.state) == ("1", "READY")
        client.unload_model(model)
        with pytest.raises(InferenceServerException) as failure:
            client.is_model_ready(model)
        assert failure.value.status() == "StatusCode.NOT_FOUND"
        (row,) = [m for m in client.get_model_repository_index().models if m.name == model]
        assert (row.state, row.reason) == ("UNAVAILABLE", "unloaded")
        with pytest.raises(InferenceServerException) as failure:
            client.load_model(model, config='{"max_batch_size": 1}')
        assert failure.value.status() == "StatusCode.INVALID_ARGUMENT"
        client.load_model(model)
        assert client.is_model_ready(model)
    assert grpc_infer(pool, model, pixels(1)).as_numpy("logits").shape[0] == 1


def test_a_taken_grpc_port_fails_start_up_with_status_3(repository: DigitsRepository, tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="server exited with 3") as failure:
            start_server(tmp_path, repository=repository.path, role="pool", grpc_port=port)
    assert "grpc port unavailable" in str(failure.value)


def test_shutdown_turns_grpc_readiness_false_and_answers_calls_in_flight(
    repository: DigitsRepository, models: dict, tmp_path
) -> None:
    """During the shutdown delay gRPC is live but not ready; a call still queued when the delay ends
    is drained and answered before the gRPC server stops, and the exit is 0."""
    (model,) = models["pool"]
    server = start_server(
        tmp_path,
        repository=repository.path,
        role="pool",
        models=repository.global_backbone.name,
        grpc_port=free_port(),
        shutdown_delay_s=2,
        max_queue_delay_ms=6000,
        # A fixed batch limit: start-up calibration could pick batch 1, and no request would wait.
        max_batch_size=8,
    )
    answers: queue.Queue = queue.Queue()
    try:
        prime_batch_of_two(server.url, model)  # the next lone request waits the whole queue delay
        tensor = triton_grpc.InferInput("pixel_values", [1, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(pixels(1))
        with grpc_client(server) as client:
            client.async_infer(
                model,
                [tensor],
                callback=lambda result, error: answers.put((result, error)),
                client_timeout=60,
            )
            wait_until(
                lambda: scrape_metrics(server.url).value("vitserve_queue_depth", model=model) == 1,
                "the gRPC call queued",
            )
            server.process.send_signal(signal.SIGTERM)
            wait_until(
                lambda: not client.is_server_ready(), "gRPC ServerReady false after SIGTERM", timeout=10
            )
            assert client.is_server_live()
            assert not client.is_model_ready(model)
            result, error = answers.get(timeout=60)
        assert error is None, error
        assert result.as_numpy("logits").shape[0] == 1
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    assert '"level": "error"' not in server.log()
