"""Model lifecycle (service/lifecycle.py, ARCHITECTURE.md): a new version swapped in under load with no
failed request, a corrupt version refused while the old one serves, unload answering 404, polling.

One real server (pool role, repository polling on) serves a copy of the photo repository's smallest
global entry; version 2 is that entry's ONNX graph with 1.0 added to the logits, so the answers prove
which version computed them.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.http
from onnx import helper, numpy_helper
from tritonclient.utils import InferenceServerException

from export.repository import ModelEntry, read_repository
from service.lifecycle import RuntimeSlot
from support.server import PNG, SMALL_PNG, ServerProcess, running_server, scrape_metrics, v2_infer, wait_until

POLL_S = 0.2
# The load generator's bounds: it stops by itself after this many requests per thread or seconds.
LOAD_THREADS = 2
LOAD_REQUESTS = 400
LOAD_SECONDS = 90


@dataclass
class Served:
    server: ServerProcess
    entry: ModelEntry

    @property
    def path(self) -> Path:
        return self.entry.path

    def infer(self, pixels: np.ndarray) -> httpx.Response:
        return v2_infer(self.server.url, self.entry.name, pixels)

    def control(self, action: str, name: str | None = None) -> httpx.Response:
        url = f"{self.server.url}/v2/repository/models/{name or self.entry.name}/{action}"
        return httpx.post(url, json={}, timeout=120)

    def index(self) -> list[dict]:
        response = httpx.post(f"{self.server.url}/v2/repository/index", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()


def write_version(
    entry: ModelEntry, version: int, logits_shift: float | None = None, data: bytes | None = None
):
    """Version `version` of `entry`: its version-1 graph, with `logits_shift` added to the logits, or
    `data` as the artifact. Assembled beside the entry and renamed in, as a deployment tool would."""
    staged = entry.path / f".staging-{version}"
    staged.mkdir()
    target = staged / entry.artifact.name
    if data is not None:
        target.write_bytes(data)
    else:
        model = onnx.load(str(entry.path / "1" / entry.artifact.name))
        raw = f"{entry.logits_name}_before_shift"
        for node in model.graph.node:
            node.output[:] = [raw if name == entry.logits_name else name for name in node.output]
        shift = numpy_helper.from_array(np.array(logits_shift, np.float32), "test_logits_shift")
        model.graph.initializer.append(shift)
        model.graph.node.append(helper.make_node("Add", [raw, shift.name], [entry.logits_name]))
        onnx.save(model, str(target))
    staged.rename(entry.path / str(version))


def served_version(served: Served, pixels: np.ndarray) -> str:
    response = served.infer(pixels)
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


@pytest.fixture(scope="module")
def served(photo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    entries = read_repository(photo_repository)
    smallest = min((e for e in entries if e.attention == ("global",)), key=lambda e: e.bucket)
    root = tmp_path_factory.mktemp("lifecycle_repository")
    shutil.copytree(smallest.path, root / smallest.name)
    (entry,) = read_repository(root)
    with running_server(
        tmp_path_factory.mktemp("lifecycle_server"), repository=root, role="pool", poll_s=POLL_S
    ) as s:
        yield Served(s, entry)


@pytest.fixture(scope="module")
def pixels(served: Served) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, *served.entry.input_shape)).astype(np.float32)


@dataclass(frozen=True)
class Answer:
    started: float
    status: int
    version: str
    logits: np.ndarray | None


def load_generator(served: Served, pixels: np.ndarray, stop: threading.Event, answers: list[Answer]) -> None:
    """Send requests one after another until `stop`, LOAD_REQUESTS or LOAD_SECONDS."""
    deadline = time.monotonic() + LOAD_SECONDS
    for _ in range(LOAD_REQUESTS):
        if stop.is_set() or time.monotonic() > deadline:
            return
        started = time.monotonic()
        response = served.infer(pixels)
        ok = response.status_code == 200
        body = response.json()
        logits = np.asarray(body["outputs"][0]["data"], np.float32) if ok else None
        answers.append(Answer(started, response.status_code, body.get("model_version", ""), logits))


def test_version_swap_under_load_fails_no_request(served: Served, pixels: np.ndarray) -> None:
    before = scrape_metrics(served.server.url)
    stop, answers = threading.Event(), []
    threads = [
        threading.Thread(target=load_generator, args=(served, pixels, stop, answers))
        for _ in range(LOAD_THREADS)
    ]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(answers) >= 10, "traffic on version 1", timeout=60)
        write_version(served.entry, 2, logits_shift=1.0)
        response = served.control("load")
        loaded_at = time.monotonic()
        assert response.status_code == 200, response.text
        wait_until(
            lambda: sum(a.started > loaded_at for a in answers) >= 10, "traffic after the swap", timeout=60
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(LOAD_SECONDS)
    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed during the swap: {failed[:3]}"
    assert {a.version for a in answers} == {"1", "2"}
    assert all(a.version == "2" for a in answers if a.started > loaded_at)
    v1 = next(a.logits for a in answers if a.version == "1")
    v2 = next(a.logits for a in answers if a.version == "2")
    np.testing.assert_allclose(v2 - v1, 1.0, atol=1e-4)
    name = served.entry.name
    change = scrape_metrics(served.server.url) - before
    assert change.value("vitserve_model_loads_total", model=name, outcome="loaded") == 1
    # The old session is released once its last batch has returned: exactly one release.
    wait_until(
        lambda: (
            (scrape_metrics(served.server.url) - before).value("vitserve_model_releases_total", model=name)
            == 1
        ),
        "version 1 to be released",
    )
    assert {"name": name, "version": "2", "state": "READY", "reason": ""} in served.index()


def test_corrupt_version_is_refused_and_old_keeps_serving(served: Served, pixels: np.ndarray) -> None:
    current = served_version(served, pixels)
    name = served.entry.name
    before = scrape_metrics(served.server.url)
    write_version(served.entry, 7, data=b"this is not an ONNX model")
    response = served.control("load")
    assert_v2_error(response, 400, "model_load_failed")
    assert (
        "version 7" in response.json()["error"]
        and f"version {current} keeps serving" in response.json()["error"]
    )
    assert served_version(served, pixels) == current
    rows = {(row["version"], row["state"]) for row in served.index() if row["name"] == name}
    assert rows == {(current, "READY"), ("7", "UNAVAILABLE")}
    # A version directory without its artifact is refused the same way.
    (served.path / "8").mkdir()
    assert_v2_error(served.control("load"), 400, "model_load_failed")
    assert served_version(served, pixels) == current
    change = scrape_metrics(served.server.url) - before
    assert change.value("vitserve_model_loads_total", model=name, outcome="refused") >= 2
    assert change.value("vitserve_model_loads_total", model=name, outcome="loaded") == 0
    for version in ("7", "8"):
        shutil.rmtree(served.path / version)


def assert_v2_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and len(body["error"]) > 20, body


def test_unload_answers_404_until_loaded_again(served: Served, pixels: np.ndarray) -> None:
    name = served.entry.name
    assert served.control("unload").status_code == 200
    assert_v2_error(served.infer(pixels), 404, "model_not_found")
    assert httpx.get(f"{served.server.url}/v2/models/{name}/ready", timeout=10).status_code == 404
    assert [row["reason"] for row in served.index() if row["name"] == name] == ["unloaded"]
    # The poller leaves an entry unloaded through the API alone.
    time.sleep(POLL_S * 5)
    assert_v2_error(served.infer(pixels), 404, "model_not_found")
    assert_v2_error(served.control("unload"), 404, "model_not_found")
    assert served.control("load").status_code == 200
    assert served.infer(pixels).status_code == 200


def test_tritonclient_controls_models(served: Served, pixels: np.ndarray) -> None:
    """tritonclient's own model-control calls, as against Triton."""
    client = tritonclient.http.InferenceServerClient(served.server.url.removeprefix("http://"))
    name = served.entry.name
    assert [row["name"] for row in client.get_model_repository_index()] == [name]
    client.unload_model(name)
    assert not client.is_model_ready(name)
    with pytest.raises(InferenceServerException, match="not loaded"):
        client.unload_model(name)
    client.load_model(name)
    assert client.is_model_ready(name)
    assert served.infer(pixels).status_code == 200


def test_unknown_entry_and_unsupported_parameters(served: Served) -> None:
    assert_v2_error(served.control("load", "no_such_entry"), 404, "model_not_found")
    response = httpx.post(
        f"{served.server.url}/v2/repository/models/{served.entry.name}/load",
        json={"parameters": {"config": "{}"}},
        timeout=10,
    )
    assert_v2_error(response, 400, "unsupported_parameter")
    response = httpx.post(f"{served.server.url}/v2/repository/index", content=b'{"ready": ', timeout=10)
    assert_v2_error(response, 400, "invalid_request")


def test_polling_loads_new_versions_and_unloads_removed_entries(served: Served, pixels: np.ndarray) -> None:
    version = int(served_version(served, pixels)) + 1
    write_version(served.entry, version, logits_shift=2.0)
    wait_until(
        lambda: served_version(served, pixels) == str(version), f"the poller to serve version {version}"
    )
    shutil.rmtree(served.path)
    wait_until(lambda: served.infer(pixels).status_code == 404, "the poller to unload the removed entry")
    assert served.index() == []


class BlockingRuntime:
    """A runtime whose batches wait for `release` (to hold a batch in flight across a swap)."""

    def __init__(self, label: float) -> None:
        self.label = label
        self.release = threading.Event()
        self.started = threading.Event()

    def run(self, batch: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
        self.started.set()
        self.release.wait(30)
        return {"logits": np.full((len(batch), 1), self.label, np.float32)}


def test_slot_releases_the_old_runtime_after_its_last_batch() -> None:
    released: list[float] = []
    old, new = BlockingRuntime(1.0), BlockingRuntime(2.0)
    new.release.set()
    slot = RuntimeSlot("m", old, lambda _, runtime: released.append(runtime.label))
    results: list[float] = []
    batch = np.zeros((1, 3, 2, 2), np.float32)
    in_flight = threading.Thread(target=lambda: results.append(float(slot.run(batch)["logits"][0, 0])))
    in_flight.start()
    assert old.started.wait(30)
    slot.swap(new)
    assert float(slot.run(batch)["logits"][0, 0]) == 2.0
    assert released == []
    old.release.set()
    in_flight.join(30)
    assert results == [1.0] and released == [1.0]
    slot.swap(None)
    assert released == [1.0, 2.0]


def test_gateway_routes_to_buckets_published_while_it_serves(
    photo_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """How `make serve` answers before the export finishes: it serves the first bucket of each backbone
    and routes to the others as the background export publishes them (derived routing follows)."""
    entries = read_repository(photo_repository)
    held = max((e for e in entries if e.attention == ("global",)), key=lambda e: e.bucket)
    root = tmp_path_factory.mktemp("lazy_repository")
    for entry in entries:
        if entry is not held:
            shutil.copytree(entry.path, root / entry.name)
    url = f"/v1/classify?model={held.backbone}&bucket={held.bucket}"
    with running_server(tmp_path_factory.mktemp("lazy_server"), repository=root, poll_s=POLL_S) as server:

        def classify() -> httpx.Response:
            return httpx.post(server.url + url, content=SMALL_PNG, headers=PNG, timeout=60)

        assert classify().status_code != 200
        shutil.copytree(held.path, root / f".staging-{held.name}")
        (root / f".staging-{held.name}").rename(root / held.name)
        wait_until(lambda: classify().status_code == 200, f"the gateway to route to {held.name}")
        assert classify().json()["route"]["bucket"] == held.bucket
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        assert held.name.removeprefix(f"{held.backbone}_") in models["backbones"][held.backbone]
