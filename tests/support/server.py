"""Real vitserve processes for tests: `vitserve serve` on 127.0.0.1 with a free port, stopped with SIGTERM.

Also what tests need to talk to one: image encoding for request bodies, and /metrics parsed with
prometheus_client's own parser into samples that can be summed and subtracted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

STARTUP_TIMEOUT_S = 180


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A running server: its base URL, process handle, log file and gRPC HOST:PORT (None without gRPC)."""

    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    grpc_address: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(log_dir: Path, port: int | None = None, **settings: object) -> ServerProcess:
    """Start `vitserve serve` with VITSERVE_* settings and wait until /v2/health/ready answers 200.

    The gRPC service is off unless `grpc_port` is given (e.g. `free_port()`).

    `host` may be any 127.0.0.0/8 address, so several servers can stand for pods with their own IPs.
    """
    host = str(settings.get("host", "127.0.0.1"))
    port = port or free_port(host)
    env = {
        **os.environ,
        "VITSERVE_HOST": "127.0.0.1",
        "VITSERVE_PORT": str(port),
        "VITSERVE_LOG_LEVEL": "info",
        # Off unless a test asks for a port: concurrent servers would all bind the default 8001.
        "VITSERVE_GRPC_PORT": "0",
    }
    env.update({f"VITSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
    grpc_port = int(str(settings.get("grpc_port", 0)))
    grpc_address = f"{host}:{grpc_port}" if grpc_port else None
    server = ServerProcess(f"http://{host}:{port}", port, process, log_path, grpc_address)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{server.log()}")


@contextmanager
def running_server(log_dir: Path, **settings: object) -> Iterator[ServerProcess]:
    server = start_server(log_dir, **settings)
    try:
        yield server
    finally:
        server.stop()


def encode_image(pixels: np.ndarray, fmt: str = "PNG", **options: object) -> bytes:
    """Encode (H, W, 3) or (H, W) uint8 pixels as an image file of Pillow format `fmt`."""
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


Labels = tuple[tuple[str, str], ...]


def labels(**values: str) -> Labels:
    """A label set as `MetricSamples` keys it."""
    return tuple(sorted(values.items()))


@dataclass(frozen=True)
class MetricSamples:
    """Every sample of one /metrics scrape, keyed by (sample name, sorted labels)."""

    samples: dict[tuple[str, Labels], float]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= set(ls))

    def series(self, name: str) -> dict[Labels, float]:
        """The nonzero samples called `name`, by their sorted labels (see `labels`)."""
        return {ls: v for (n, ls), v in self.samples.items() if n == name and v}

    def __sub__(self, earlier: MetricSamples) -> MetricSamples:
        """The change since `earlier`: what a sequence of requests added to counters and histograms."""
        keys = self.samples.keys() | earlier.samples.keys()
        return MetricSamples({k: self.samples.get(k, 0.0) - earlier.samples.get(k, 0.0) for k in keys})


def scrape_metrics(url: str) -> MetricSamples:
    """GET {url}/metrics and parse it with prometheus_client's text parser."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    response.raise_for_status()
    families = text_string_to_metric_families(response.text)
    return MetricSamples(
        {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}
    )


def write_endpoints(path: Path, servers: Iterable[ServerProcess]) -> None:
    """Publish `servers` as a gateway's `file://` endpoint list, one URL per line, in one rename: the
    local stand-in for an EndpointSlice, so a gateway re-reading it never sees half a list."""
    staged = path.with_suffix(".tmp")
    staged.write_text("".join(f"{server.url}\n" for server in servers))
    os.replace(staged, path)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30, interval: float = 0.02) -> None:
    """Poll `condition` until it holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


SMALL_PNG = encode_image(np.full((64, 48, 3), 90, np.uint8))
PNG = {"content-type": "image/png"}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    """`response` is `status` with exactly {"error": {"code": code, "message": <explanation>}}."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert len(body["error"]["message"]) > 10, body


def assert_serves(url: str) -> None:
    """A normal classification request (SMALL_PNG) succeeds."""
    response = httpx.post(f"{url}/v1/classify", content=SMALL_PNG, headers=PNG, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 5


def v2_infer(url: str, entry: str, pixels: np.ndarray) -> httpx.Response:
    """POST float32 `pixels` (B, 3, H, W) to /v2/models/{entry}/infer with the binary tensor extension."""
    tensor = {
        "name": "pixel_values",
        "shape": list(pixels.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": pixels.nbytes},
    }
    head = json.dumps({"inputs": [tensor]}).encode()
    return httpx.post(
        f"{url}/v2/models/{entry}/infer",
        content=head + pixels.astype(np.float32).tobytes(),
        headers={"inference-header-content-length": str(len(head))},
        timeout=60,
    )


def prime_batch_of_two(url: str, entry: str) -> None:
    """Run one batch of two rows (a two-row v2 request) on `entry`.

    The batcher starts a lone request at once only after a batch of one, so from now until its next
    batch of one, every request to `entry` waits the whole max_queue_delay in the queue: with a long
    delay, tests can fill the queue, let deadlines pass or hang up without racing the model.
    """
    side = int(entry.rsplit("_", 1)[1])
    before = scrape_metrics(url)
    response = v2_infer(url, entry, np.zeros((2, 3, side, side), np.float32))
    assert response.status_code == 200, response.text
    delta = scrape_metrics(url) - before
    assert delta.value("vitserve_batch_size_count", model=entry) == 1
    assert delta.value("vitserve_batch_size_sum", model=entry) == 2


class Background:
    """One /v1/classify request of SMALL_PNG sent from a thread; `result()` waits for its answer."""

    def __init__(self, url: str, **params: object) -> None:
        self._response: httpx.Response | None = None
        self._thread = threading.Thread(target=self._send, args=(url, params))
        self._thread.start()

    def _send(self, url: str, params: dict) -> None:
        self._response = httpx.post(
            f"{url}/v1/classify", params=params, content=SMALL_PNG, headers=PNG, timeout=60
        )

    def result(self) -> httpx.Response:
        self._thread.join(60)
        assert self._response is not None, "the background request got no answer"
        return self._response
