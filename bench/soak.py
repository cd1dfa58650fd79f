"""Soak: at least ten minutes of mixed traffic with bad inputs interleaved against a real `vitserve serve`.

Worker threads send, in a fixed rotation, valid requests for both pools (small and large images,
JPEG and PNG, raw and multipart, v2 binary tensors, classification-extension requests) interleaved
with hostile ones (garbage, truncated and wrong-type bodies, a decompression-bomb header,
a body declared far over the byte limit, malformed v2 tensors, unknown models, clients that hang
up mid-upload). Every few seconds the server's resident memory, open file descriptors and threads
are read from /proc. The run passes when there is no 5xx and, after the warm-up, memory and
descriptors stay within the stated bounds of their warm-up maxima.

    python -m bench.soak --repository DIR [--duration-s 600] [--workers 4]

Writes bench/results/soak.json, soak.csv and soak.png; exits 1 when a bound or the 5xx rule fails.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.machine import machine_info
from bench.results import RESULTS_DIR, write_results

WARMUP_S = 60.0
SAMPLE_EVERY_S = 5.0
# Bounds over the warm-up maxima: memory may grow by this factor (allocator caches, histogram
# children), descriptors by this many (connections in flight); a leak per request exceeds both.
RSS_GROWTH_BOUND = 1.25
FD_GROWTH_BOUND = 32
STARTUP_TIMEOUT_S = 300


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares `width` x `height`: refused from the header, never decoded."""
    small = _encode(np.zeros((8, 8, 3), np.uint8), "PNG")
    ihdr = bytearray(small[:33])
    ihdr[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    crc = zlib.crc32(bytes(ihdr[12:29])).to_bytes(4, "big")
    return bytes(ihdr[:29]) + crc + small[33:]


class Traffic:
    """The request rotation; each call returns the HTTP status (or 499 for a hang-up)."""

    def __init__(self, url: str, port: int, models: list[dict]) -> None:
        rng = np.random.default_rng(0)
        self.url, self.port = url, port
        self.small_jpeg = _encode(rng.integers(0, 256, (180, 240, 3), np.uint8), "JPEG")
        self.large_png = _encode(rng.integers(0, 256, (900, 1200, 3), np.uint8), "PNG")
        self.bomb = _bomb_png(30000, 30000)
        entry = min((m for m in models if m["pool"] == "global"), key=lambda m: m["bucket"])
        self.entry, side = entry["name"], entry["bucket"]
        self.row = rng.standard_normal((1, 3, side, side)).astype(np.float32)
        self.side = side

    def _v2(self, client: httpx.Client, head: dict, payload: bytes) -> int:
        encoded = json.dumps(head).encode()
        return client.post(
            f"/v2/models/{self.entry}/infer",
            content=encoded + payload,
            headers={"inference-header-content-length": str(len(encoded))},
        ).status_code

    def _tensor(self, size: int) -> dict:
        return {
            "name": "pixel_values",
            "shape": list(self.row.shape),
            "datatype": "FP32",
            "parameters": {"binary_data_size": size},
        }

    def hang_up(self) -> int:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: soak\r\nContent-Type: image/jpeg\r\n"
                + f"Content-Length: {len(self.small_jpeg)}\r\n\r\n".encode()
                + self.small_jpeg[:100]
            )
        return 499

    def oversized(self) -> int:
        """A body declared far over the byte limit: refused before it is read."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: soak\r\nContent-Type: image/png\r\n"
                b"Content-Length: 10000000000\r\n\r\n"
            )
            answer = sock.recv(64)
        return int(answer.split()[1])

    def rotation(self, client: httpx.Client) -> list[tuple[str, Callable[[], int]]]:
        jpeg, png = {"content-type": "image/jpeg"}, {"content-type": "image/png"}
        payload = self.row.tobytes()
        return [
            (
                "small_jpeg",
                lambda: client.post("/v1/classify", content=self.small_jpeg, headers=jpeg).status_code,
            ),
            ("large_png", lambda: client.post("/v1/embed", content=self.large_png, headers=png).status_code),
            (
                "garbage",
                lambda: client.post("/v1/classify", content=b"\x89PNG garbage", headers=png).status_code,
            ),
            (
                "multipart",
                lambda: (
                    client.post(
                        "/v1/classify", files={"image": ("a.jpg", self.small_jpeg, "image/jpeg")}
                    ).status_code
                ),
            ),
            ("v2_binary", lambda: self._v2(client, {"inputs": [self._tensor(len(payload))]}, payload)),
            (
                "truncated",
                lambda: client.post("/v1/classify", content=self.small_jpeg[:300], headers=jpeg).status_code,
            ),
            (
                "v2_classification",
                lambda: self._v2(
                    client,
                    {
                        "inputs": [self._tensor(len(payload))],
                        "outputs": [{"name": "logits", "parameters": {"classification": 3}}],
                    },
                    payload,
                ),
            ),
            ("bomb_header", lambda: client.post("/v1/classify", content=self.bomb, headers=png).status_code),
            ("v2_bad_size", lambda: self._v2(client, {"inputs": [self._tensor(len(payload) - 3)]}, payload)),
            (
                "wrong_type",
                lambda: (
                    client.post(
                        "/v1/classify", content=self.small_jpeg, headers={"content-type": "text/plain"}
                    ).status_code
                ),
            ),
            (
                "v2_bad_json",
                lambda: (
                    client.post(
                        f"/v2/models/{self.entry}/infer", content=b'{"inputs": [{"data": [{}]}]}'
                    ).status_code
                ),
            ),
            (
                "unknown_model",
                lambda: (
                    client.post(
                        "/v1/classify", params={"model": "nope"}, content=self.small_jpeg, headers=jpeg
                    ).status_code
                ),
            ),
            ("hang_up", self.hang_up),
            ("oversized", self.oversized),
            ("route", lambda: client.get("/v1/route", params={"width": 4000, "height": 3000}).status_code),
        ]


def _proc_sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
    }


def _start(repository: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "VITSERVE_REPOSITORY": str(repository), "VITSERVE_PORT": str(port)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log, stderr=log
        )
    give_up = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < give_up:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server was not ready within {STARTUP_TIMEOUT_S} s; see {log_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="model repository to serve")
    parser.add_argument(
        "--duration-s", type=float, default=600.0, help="traffic duration (>= 600 for the record)"
    )
    parser.add_argument("--workers", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = Path(f"/tmp/vitserve-soak-{port}.log")
    process = _start(args.repository, port, log_path)
    url = f"http://127.0.0.1:{port}"
    models = httpx.get(f"{url}/v1/models").json()["models"]
    traffic = Traffic(url, port, models)
    statuses: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()
    started = time.monotonic()
    stop_at = started + args.duration_s
    sent = itertools.count()

    def worker(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            rotation = traffic.rotation(client)
            for step in itertools.count(offset):
                if time.monotonic() >= stop_at or next(sent) >= args.max_requests:
                    return
                name, send = rotation[step % len(rotation)]
                try:
                    status = send()
                except httpx.HTTPError as error:
                    status = -1
                    print(f"{name}: {type(error).__name__}: {error}", file=sys.stderr)
                with lock:
                    statuses[name, status] += 1

    threads = [threading.Thread(target=worker, args=(i * 3,)) for i in range(args.workers)]
    for thread in threads:
        thread.start()
    samples = []
    while any(t.is_alive() for t in threads):
        samples.append({"t_s": round(time.monotonic() - started, 1), **_proc_sample(process.pid)})
        time.sleep(SAMPLE_EVERY_S)
    for thread in threads:
        thread.join()
    samples.append({"t_s": round(time.monotonic() - started, 1), **_proc_sample(process.pid)})
    process.send_signal(signal.SIGTERM)
    exit_code = process.wait(120)

    warm = [s for s in samples if s["t_s"] <= WARMUP_S] or samples[:1]
    after = [s for s in samples if s["t_s"] > WARMUP_S] or samples[-1:]
    warm_rss, warm_fds = max(s["rss_mib"] for s in warm), max(s["fds"] for s in warm)
    by_status = Counter()
    for (_, status), n in statuses.items():
        by_status[status] += n
    summary = {
        "duration_s": round(samples[-1]["t_s"], 1),
        "requests": sum(statuses.values()),
        "by_status": {str(k): v for k, v in sorted(by_status.items())},
        "by_kind": {f"{name} {status}": n for (name, status), n in sorted(statuses.items())},
        "server_errors_5xx": sum(n for s, n in by_status.items() if s >= 500),
        "transport_errors": by_status.get(-1, 0),
        "warmup_s": WARMUP_S,
        "rss_mib_warmup_max": warm_rss,
        "rss_mib_after_max": max(s["rss_mib"] for s in after),
        "rss_bound_mib": round(warm_rss * RSS_GROWTH_BOUND, 1),
        "fds_warmup_max": warm_fds,
        "fds_after_max": max(s["fds"] for s in after),
        "fds_bound": warm_fds + FD_GROWTH_BOUND,
        "threads_max": max(s["threads"] for s in samples),
        "exit_code": exit_code,
    }
    summary["passed"] = (
        summary["server_errors_5xx"] == 0
        and summary["transport_errors"] == 0
        and summary["rss_mib_after_max"] <= summary["rss_bound_mib"]
        and summary["fds_after_max"] <= summary["fds_bound"]
    )
    settings = {"repository": str(args.repository), "duration_s": args.duration_s, "workers": args.workers}
    write_results("soak", machine_info("bench.soak"), settings, samples, summary, args.output)
    _plot(samples, summary, args.output / "soak.png")
    print(json.dumps(summary, indent=2))
    sys.exit(0 if summary["passed"] else 1)


def _plot(samples: list[dict], summary: dict, path: Path) -> None:
    from bench.plots import plt

    times = [s["t_s"] / 60 for s in samples]
    fig, (memory, fds) = plt.subplots(1, 2, figsize=(12, 4.5))
    memory.plot(times, [s["rss_mib"] for s in samples], "-", label="resident memory")
    memory.axhline(summary["rss_bound_mib"], color="C3", linestyle="--", label="bound")
    memory.set_xlabel("minutes")
    memory.set_ylabel("MiB")
    memory.legend()
    fds.plot(times, [s["fds"] for s in samples], "-", label="open file descriptors")
    fds.plot(times, [s["threads"] for s in samples], "-", label="threads")
    fds.axhline(summary["fds_bound"], color="C3", linestyle="--", label="descriptor bound")
    fds.set_xlabel("minutes")
    fds.legend()
    fig.suptitle(
        f"soak: {summary['requests']} requests, {summary['server_errors_5xx']} 5xx, statuses {summary['by_status']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
