"""Real vitserve processes for tests: `vitserve serve` on 127.0.0.1 with a free port, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A running server: its base URL, process handle and log file."""

    url: str
    port: int
    process: subprocess.Popen
    log_path: Path

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
    """Start `vitserve serve` with VITSERVE_* settings and wait until /v2/health/ready answers 200."""
    port = port or free_port()
    env = {**os.environ, "VITSERVE_HOST": "127.0.0.1", "VITSERVE_PORT": str(port), "VITSERVE_LOG_LEVEL": "info"}
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
    server = ServerProcess(f"http://127.0.0.1:{port}", port, process, log_path)
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
