"""Idle resident memory of a gateway serving several shapes of one backbone, by ONNX Runtime setting.

Exports `--model` at `--buckets` into one repository, then starts `python -m service.cli serve` on it
once per configuration (weights shared or not, CPU arena on or off), waits until it is ready (every
session loaded, warmed up and calibrated), and reads the server's VmRSS and VmHWM from /proc. Idle
RSS after start-up is what a pod holds before the first request; it includes calibration's batches.

    .venv/bin/python -m bench.memory --model vit_small_patch16_224 --buckets 224,192x256,256x192
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.machine import machine_info
from export import ExportRequest, export_model
from export.shapes import parse_shape
from tests.support.server import free_port

CONFIGS = {
    "shared, no arena (default)": {"VITSERVE_ORT_SHARE_WEIGHTS": "true", "VITSERVE_ORT_CPU_ARENA": "false"},
    "shared, arena": {"VITSERVE_ORT_SHARE_WEIGHTS": "true", "VITSERVE_ORT_CPU_ARENA": "true"},
    "private, no arena": {"VITSERVE_ORT_SHARE_WEIGHTS": "false", "VITSERVE_ORT_CPU_ARENA": "false"},
    "private, arena (before)": {"VITSERVE_ORT_SHARE_WEIGHTS": "false", "VITSERVE_ORT_CPU_ARENA": "true"},
}
READY_TIMEOUT_S = 900


def _status_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def _serve_and_measure(repository: Path, env: dict[str, str], threads: int) -> dict:
    port = free_port()
    environment = {
        **os.environ,
        **env,
        "VITSERVE_REPOSITORY": str(repository),
        "VITSERVE_PORT": str(port),
        "VITSERVE_INTRA_OP_THREADS": str(threads),
        "VITSERVE_GRPC_PORT": "0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.monotonic()
    try:
        while time.monotonic() - started < READY_TIMEOUT_S:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                return {"error": f"server exited with {process.returncode}"}
            time.sleep(0.5)
        else:
            return {"error": f"not ready within {READY_TIMEOUT_S} s"}
        ready_s = round(time.monotonic() - started, 1)
        time.sleep(2)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["models"]
        return {
            **_status_mib(process.pid),
            "ready_s": ready_s,
            "batch_limits": {m["name"]: m["max_batch_size"] for m in models},
        }
    finally:
        process.terminate()
        process.wait(timeout=60)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--buckets", default="224,192x256,256x192")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", type=Path, default=Path("bench/results/memory.json"))
    args = parser.parse_args(argv)
    buckets = tuple(parse_shape(b) for b in args.buckets.split(","))
    with tempfile.TemporaryDirectory() as root:
        repository = Path(root) / "repository"
        export_model(
            ExportRequest(model=args.model, repository=repository, buckets=buckets), log=lambda _: None
        )
        rows = []
        for name, env in CONFIGS.items():
            result = _serve_and_measure(repository, env, args.threads)
            rows.append({"config": name, **env, **result})
            print(json.dumps(rows[-1]), flush=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "memory",
                "machine": machine_info("bench.memory"),
                "settings": {"model": args.model, "buckets": args.buckets, "threads": args.threads},
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
