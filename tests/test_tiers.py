"""Execution tiers with real processes on 127.0.0.1.

1. A gateway whose global backbone runs on the triton runtime, pointed at a second vitserve process
   in pool mode, while its windowed backbone stays on embedded ONNX Runtime: classification,
   batching and metrics work across the two processes; stopping the pool turns the global route
   into fast 503s naming the pool (the windowed route keeps serving); restarting the pool on the
   same port recovers without restarting the gateway. Unforced requests are routed around the
   stopped pool once its endpoint is ejected.
2. Compatibility with an independent KServe v2 implementation: MLServer 1.7.1 (its own venv, made
   by `make mlserver-env`) serving the exported ONNX model through tests/support/mlserver_model.py.
   Protocol differences found, and how the triton runtime deals with them:
   - MLServer's REST endpoint has no binary tensor extension (its server metadata lists no
     extensions): a binary request is rejected with 422 and a FastAPI `{"detail": [...]}` body
     instead of the v2 `{"error": "..."}` shape. Use JSON tensors (VITSERVE_TRITON_BINARY=false) or gRPC.
   - Its gRPC endpoint does accept raw binary tensors (raw_input_contents / raw_output_contents).
   - Model names come from model-settings.json, not the folder; with no version there, calls must
     use the unversioned paths (/v2/models/NAME/infer), which is what the runtime sends.
   - Model metadata lists no inputs, outputs or platform unless model-settings.json declares them,
     so the runtime takes names and datatypes from the entry's config.pbtxt, never from the server.
   - MLServer accepts the v2 `timeout` request parameter and ignores it (vitserve pools honour it).
   - vitserve pools serve REST only; MLServer and Triton serve gRPC on a separate port.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from export import read_entry
from export.repository import ModelEntry
from service.calibration import FILE, EntryCost, write_calibration
from service.preprocess import preprocess
from service.runtimes.ort import OnnxRuntime
from service.runtimes.triton_runtime import TritonRuntime, TritonTarget
from support.digits import load_digits_images
from support.repos import build_seeded_digits_repository
from support.server import ServerProcess, free_port, start_server

BUCKET = 32
IMAGES = 8
PROJECT = Path(__file__).resolve().parents[1]
MLSERVER = PROJECT / ".venv-mlserver" / "bin" / "mlserver"
RECOVERY_WAIT_S = 60


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """Seeded digits-sized ViT (global) and Swin (windowed) backbones, exported as ONNX."""
    return build_seeded_digits_repository(tmp_path_factory.mktemp("repository"), BUCKET)


@pytest.fixture(scope="module")
def vit_entry(repository: Path) -> ModelEntry:
    return read_entry(repository / f"vit_digits_{BUCKET}")


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    """Digit images as the RGB uint8 pictures a client uploads, exactly bucket-sized."""
    data = load_digits_images(BUCKET)
    return [
        (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for image in data.test_images[:IMAGES]
    ]


def png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pixels(vit_entry: ModelEntry, pictures: list[np.ndarray]) -> np.ndarray:
    """The batch the gateway computes from the pictures."""
    return np.stack([preprocess(p, BUCKET, vit_entry.mean, vit_entry.std) for p in pictures])


@pytest.fixture(scope="module")
def reference(vit_entry: ModelEntry, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Embedded ONNX Runtime on those pixels."""
    return OnnxRuntime(vit_entry, threads=2).run(pixels)


def top5(logits: np.ndarray) -> list[list[int]]:
    return np.argsort(-logits, axis=1, kind="stable")[:, :5].tolist()


class Tiers:
    """The gateway and its (restartable) global pool."""

    def __init__(self, repository: Path, log_dir: Path):
        self.repository = repository
        self.log_dir = log_dir
        self.pool_port = free_port()
        self.pool = self.start_pool()
        # The remote global entry costs less than the embedded windowed one, so unforced requests go
        # to the pool while it is up (both batch up to 8); an ejected endpoint stays out for the
        # whole module, so routing around it never depends on how fast a test runs.
        calibration = log_dir / "calibration.yaml"
        write_calibration(
            calibration,
            {
                f"vit_digits_{BUCKET}": EntryCost({1: 0.001, 8: 0.004}, FILE),
                f"swin_digits_{BUCKET}": EntryCost({1: 0.05, 8: 0.2}, FILE),
            },
        )
        self.gateway = start_server(
            log_dir,
            repository=repository,
            runtimes="vit_digits=triton",
            triton_urls=f"global=http://127.0.0.1:{self.pool_port}",
            triton_connect_timeout_ms=500,
            triton_timeout_ms=10_000,
            max_queue_delay_ms=100,
            calibration=calibration,
            endpoint_eject_s=3600,
        )

    @property
    def pool_url(self) -> str:
        return f"http://127.0.0.1:{self.pool_port}"

    def start_pool(self) -> ServerProcess:
        return start_server(
            self.log_dir, port=self.pool_port, repository=self.repository, role="pool", models="vit_digits"
        )

    def classify(self, picture: np.ndarray, model: str | None = "vit_digits") -> httpx.Response:
        """POST the picture to the gateway, forced to `model` (None: routed)."""
        forced = {} if model is None else {"model": model}
        return httpx.post(
            f"{self.gateway.url}/v1/classify",
            params={**forced, "top_k": 5, "timeout_ms": 20_000},
            content=png(picture),
            headers={"Content-Type": "image/png"},
            timeout=30,
        )

    def stop(self) -> None:
        self.gateway.stop()
        self.pool.stop()


@pytest.fixture(scope="module")
def tiers(repository: Path, tmp_path_factory) -> Iterator[Tiers]:
    started = Tiers(repository, tmp_path_factory.mktemp("tier-logs"))
    yield started
    started.stop()


def samples(url: str, name: str, **labels: str) -> float:
    """Sum of the samples `name` with these labels in a Prometheus text page."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def predicted(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [p["index"] for p in response.json()["predictions"]]


def test_gateway_classifies_and_batches_through_the_pool(tiers, pictures, reference):
    entry = f"vit_digits_{BUCKET}"

    def counters() -> tuple[float, float, float]:
        """Gateway batches and rows of the entry, and infer calls the pool answered."""
        return (
            samples(tiers.gateway.url, "vitserve_batch_size_count", model=entry),
            samples(tiers.gateway.url, "vitserve_batch_size_sum", model=entry),
            samples(tiers.pool.url, "vitserve_requests_total", endpoint="v2_infer", status="200"),
        )

    before = counters()
    with ThreadPoolExecutor(IMAGES) as clients:
        responses = list(clients.map(tiers.classify, pictures))
    batches, rows, pool_calls = (after - first for after, first in zip(counters(), before, strict=True))

    assert [predicted(r) for r in responses] == top5(reference["logits"])
    assert {r.json()["route"]["pool"] for r in responses} == {"global"}
    assert rows == IMAGES
    assert batches < IMAGES, "concurrent requests were not batched"
    assert pool_calls == batches, "each gateway batch is one call to the pool"

    models = {m["name"]: m for m in httpx.get(f"{tiers.gateway.url}/v1/models", timeout=10).json()["models"]}
    assert models[entry]["runtime"] == f"triton http 127.0.0.1:{tiers.pool_port} (pool global)"
    assert models[f"swin_digits_{BUCKET}"]["runtime"].startswith("onnxruntime")


def test_embeddings_through_the_pool_match_onnxruntime(tiers, pictures, reference):
    response = httpx.post(
        f"{tiers.gateway.url}/v1/embed",
        params={"model": "vit_digits"},
        content=png(pictures[0]),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["embedding"], reference["embedding"][0], rtol=1e-4, atol=1e-4)


def test_stopped_pool_gives_503_and_restart_recovers(tiers, pictures, reference):
    expected = top5(reference["logits"])[0]
    assert predicted(tiers.classify(pictures[0])) == expected

    tiers.pool.stop()
    down = tiers.classify(pictures[0])
    assert down.status_code == 503, down.text
    error = down.json()["error"]
    assert error["code"] == "runtime_unavailable"
    assert "pool global" in error["message"] and tiers.pool_url in error["message"]
    assert tiers.classify(pictures[0], model="swin_digits").status_code == 200, "windowed route is embedded"

    tiers.pool = tiers.start_pool()
    deadline = time.monotonic() + RECOVERY_WAIT_S
    response = tiers.classify(pictures[0])
    while response.status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
        response = tiers.classify(pictures[0])
    assert predicted(response) == expected


def test_unforced_requests_are_routed_around_a_pool_whose_endpoint_is_ejected(tiers, pictures, reference):
    expected = top5(reference["logits"])[0]
    assert tiers.classify(pictures[0], model=None).json()["route"]["pool"] == "global"

    tiers.pool.stop()
    # The first batch to find the pool gone ejects its endpoint and fails; its request is routed
    # again, around the pool. From then on the router leaves the pool's entry out from the start.
    for attempt, decisions in (("rerouted after the failed batch", 2), ("routed around from the start", 1)):
        before = samples(tiers.gateway.url, "vitserve_route_decisions_total")
        around = tiers.classify(pictures[0], model=None)
        assert around.status_code == 200, (attempt, around.text)
        assert len(predicted(around)) == 5
        assert samples(tiers.gateway.url, "vitserve_route_decisions_total") - before == decisions, attempt
        route = around.json()["route"]
        assert route["pool"] == "windowed" and route["detail"] == 1 and not route["degraded"], attempt
        assert {c["excluded"] for c in route["candidates"] if c["pool"] == "global"} == {
            "no ready endpoint in pool global"
        }
    assert tiers.classify(pictures[0]).status_code == 503, "a forced backbone still meets its pool's 503"

    tiers.pool = tiers.start_pool()
    deadline = time.monotonic() + RECOVERY_WAIT_S
    response = tiers.classify(pictures[0])
    while response.status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
        response = tiers.classify(pictures[0])
    assert predicted(response) == expected
    back = tiers.classify(pictures[0], model=None)
    assert back.json()["route"]["pool"] == "global", "an answered batch readmits the endpoint"


@pytest.fixture(scope="module")
def mlserver(vit_entry: ModelEntry, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """MLServer serving the exported model.onnx under the entry's name; yields (http URL, grpc URL)."""
    if not MLSERVER.exists():
        pytest.fail(f"{MLSERVER} is missing; create it with `make mlserver-env`")
    root = tmp_path_factory.mktemp("mlserver")
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "parallel_workers": 0,
    }
    (root / "settings.json").write_text(json.dumps(settings))
    model_dir = root / vit_entry.name
    model_dir.mkdir()
    model_settings = {
        "name": vit_entry.name,
        "implementation": "mlserver_model.OnnxModel",
        "parameters": {"uri": str(vit_entry.artifact)},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings))
    env = {**os.environ, "PYTHONPATH": str(PROJECT / "tests" / "support")}
    log_path = root / "mlserver.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(MLSERVER), "start", str(root)], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    http_url = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready(f"{http_url}/v2/models/{vit_entry.name}/ready", process, log_path)
        yield http_url, f"grpc://127.0.0.1:{grpc_port}"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(url: str, process: subprocess.Popen, log_path: Path, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlserver exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"mlserver not ready after {limit_s} s:\n{log_path.read_text()}")


@pytest.mark.parametrize(
    ("protocol", "binary"), [("http", False), ("grpc", True)], ids=["http-json", "grpc-binary"]
)
def test_triton_runtime_against_mlserver(mlserver, vit_entry, pixels, reference, protocol, binary):
    http_url, grpc_url = mlserver
    url = http_url if protocol == "http" else grpc_url
    outputs = TritonRuntime(vit_entry, TritonTarget(url, "global", timeout_s=30, binary=binary)).run(pixels)
    assert top5(outputs["logits"]) == top5(reference["logits"])
    np.testing.assert_allclose(outputs["embedding"], reference["embedding"], rtol=1e-4, atol=1e-4)


def test_mlserver_rest_rejects_binary_tensors(mlserver, vit_entry, pixels):
    """A documented protocol difference: a clear server error (500 for the gateway), not an outage."""
    http_url, _ = mlserver
    runtime = TritonRuntime(vit_entry, TritonTarget(http_url, "global", timeout_s=30, binary=True))
    with pytest.raises(RuntimeError, match=f"pool global at {http_url}.*failed: 422"):
        runtime.run(pixels)
