"""Real vitserve processes and the clients that drive them, for the serving benchmarks.

A server is `python -m service.cli serve` from this checkout, configured through `VITSERVE_*`
variables exactly as a user would, on a free 127.0.0.1 port, stopped with SIGTERM. Two ways to
load it:

- `SequentialClient`: one keep-alive connection, one request at a time. Latency at concurrency 1
  measured this way costs the cores almost nothing while the server works, unlike a load
  generator that keeps its own threads busy beside the server.
- `hey`: closed-loop load at a fixed concurrency (throughput), parsed from its summary.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Server:
    """A running vitserve process."""

    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def answers_200(
    port: int,
    method: str = "GET",
    path: str = "/v2/health/ready",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 2,
) -> bool:
    """Whether a server on 127.0.0.1:`port` answers the request with 200 (False while it is not up)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body, dict(headers or {}))
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


@contextmanager
def vitserve(
    repository: Path,
    settings: Mapping[str, object] | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[Server]:
    """`vitserve serve` on `repository` with `settings` as VITSERVE_* variables, until the block ends.

    `startup_timeout_s` bounds loading, warming up and calibrating every entry (a large
    repository on a busy machine takes minutes)."""
    port = free_port()
    # gRPC off: benchmarks run several servers at once, which would all bind the default port 8001.
    env = {**os.environ, "VITSERVE_HOST": "127.0.0.1", "VITSERVE_PORT": str(port), "VITSERVE_GRPC_PORT": "0"}
    env["VITSERVE_REPOSITORY"] = str(repository)
    env.update({f"VITSERVE_{key.upper()}": str(value) for key, value in (settings or {}).items()})
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not answers_200(port):
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(
                    f"vitserve exited with {process.returncode}: {log.read().decode()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"vitserve was not ready within {startup_timeout_s:.0f} s")
            time.sleep(0.3)
        yield Server(port, process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


class SequentialClient:
    """POST one body (GET without one) at a time over one keep-alive connection; every answer must be 200."""

    def __init__(
        self, server: Server, path: str, body: bytes | None = None, content_type: str = "image/jpeg"
    ):
        self._connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        self._method = "GET" if body is None else "POST"
        self._path = path
        self._body = body
        self._headers = (
            {} if body is None else {"Content-Type": content_type, "Content-Length": str(len(body))}
        )

    def __call__(self) -> bytes:
        try:
            self._connection.request(self._method, self._path, self._body, self._headers)
            response = self._connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closed the idle connection (keep-alive timeout) while other cells ran;
            # the warm-up calls of each visit take this reconnection, not the timed ones.
            self._connection.close()
            self._connection.request(self._method, self._path, self._body, self._headers)
            response = self._connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"{self._path} answered {response.status}: {payload[:300]!r}")
        return payload

    def close(self) -> None:
        self._connection.close()


def hey(url: str, body: Path, concurrency: int, seconds: float, content_type: str = "image/jpeg") -> dict:
    """Closed-loop load with `hey` for `seconds`: requests/s and latency percentiles, all answers 200."""
    out = subprocess.run(
        [
            "hey",
            "-z",
            f"{seconds}s",
            "-c",
            str(concurrency),
            "-m",
            "POST",
            "-T",
            content_type,
            "-D",
            str(body),
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    statuses = dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", out))
    if set(statuses) != {"200"}:
        raise RuntimeError(f"non-200 responses under load: {statuses}\n{out}")
    percentile = dict(re.findall(r"\s(\d+)% in ([\d.]+) secs", out))
    return {
        "concurrency": concurrency,
        "img_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "ms_p50": float(percentile["50"]) * 1e3,
        "ms_p95": float(percentile["95"]) * 1e3 if "95" in percentile else None,
        "requests": int(statuses["200"]),
    }
