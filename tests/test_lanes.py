"""Lanes (service/runtimes/lanes.py): a pool's local batches run side by side under load.

A batch that starts alone takes the wide session (every intra-op thread); one that starts beside
another takes the entry's narrow session, built on first need. Both compute the same outputs, and
a server under concurrent load answers every request as it does one at a time.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from export.repository import read_entry
from service.runtimes.lanes import PoolLanes
from service.runtimes.ort import OnnxRuntime
from service.settings import Settings
from support.server import ServerProcess, scrape_metrics, wait_until


def test_only_a_batch_that_starts_while_none_runs_is_alone() -> None:
    beside: list[None] = []
    lanes = PoolLanes(2, lambda: beside.append(None))
    with lanes.batch() as first:
        with lanes.batch() as second:
            assert (first, second) == (True, False)
        with lanes.batch() as third:
            assert third is False
    with lanes.batch() as later:
        assert later is True
    assert len(beside) == 2
    with pytest.raises(ValueError, match="at least 1"):
        PoolLanes(0)


@pytest.mark.parametrize(
    ("threads", "ort_lanes", "lanes"),
    [(2, 0, min(2, os.cpu_count() or 1)), (2, 1, 1), (1, 4, 1), (8, 4, 4), (8, 16, 8)],
)
def test_lanes_default_to_one_per_core_and_never_exceed_the_threads(
    threads: int, ort_lanes: int, lanes: int
) -> None:
    assert Settings(intra_op_threads=threads, ort_lanes=ort_lanes).lanes() == lanes


def test_the_narrow_session_is_built_on_first_need_and_computes_what_the_wide_one_does(
    photo_repository: Path,
) -> None:
    entry = read_entry(photo_repository / "swin_windowed_448")
    lanes = PoolLanes(2)
    runtime = OnnxRuntime(entry, threads=2, lanes=lanes)
    image = np.random.default_rng(0).standard_normal((2, *entry.input_shape), dtype=np.float32)
    alone = runtime.run(image)
    for _ in range(3):
        runtime.run(image)
    assert not runtime.narrow_ready, "lone batches built a narrow session"

    with lanes.batch():
        runtime.run(image)
        wait_until(lambda: runtime.narrow_ready, "the narrow session to be built", timeout=120)
        beside = runtime.run(image)
    for role in ("logits", "embedding"):
        np.testing.assert_allclose(beside[role], alone[role], rtol=1e-5, atol=1e-5)


def test_concurrent_requests_run_batches_side_by_side_and_get_their_own_answers(
    photo_server: ServerProcess,
) -> None:
    rng = np.random.default_rng(1)
    images = []
    for _ in range(8):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    url = f"{photo_server.url}/v1/embed"
    params = {"route": "global", "bucket": 224}

    def embed(body: bytes) -> np.ndarray:
        response = httpx.post(
            url, params=params, content=body, headers={"content-type": "image/png"}, timeout=60
        )
        assert response.status_code == 200, response.text
        return np.asarray(response.json()["embedding"])

    one_at_a_time = [embed(body) for body in images]
    before = scrape_metrics(photo_server.url)
    lock = threading.Lock()
    answers: dict[int, list[np.ndarray]] = {i: [] for i in range(len(images))}

    def client(index: int) -> None:
        vector = embed(images[index])
        with lock:
            answers[index].append(vector)

    with ThreadPoolExecutor(16) as clients:
        list(clients.map(client, [i % len(images) for i in range(96)]))
    beside = (scrape_metrics(photo_server.url) - before).value("vitserve_batches_beside_total", pool="global")
    assert beside > 0, "16 concurrent clients never ran two batches at once"
    for index, vectors in answers.items():
        assert len(vectors) == 96 // len(images)
        for vector in vectors:
            np.testing.assert_allclose(vector, one_at_a_time[index], rtol=1e-4, atol=1e-4)
