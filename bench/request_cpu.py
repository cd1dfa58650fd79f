"""CPU time a request costs in each of the server's threads (issue 8 item 6: where concurrency 1's
milliseconds go beyond raw inference).

Against a real `vitserve serve` on `--repository`, a sequential client (one keep-alive connection)
sends `--requests` of each request in turn: `GET /v2/health/live` (the HTTP floor), `GET /v1/route`
for the photo's size (routing and the route's response), and `POST /v1/classify` with a 224x224
JPEG photo forced to the global pool at 224 (read, route, decode, batch, infer, answer). The CPU
time of every server thread is read from /proc/PID/task/TID/stat before and after each run, so the
figures are the server's own work per request, whatever else the machine runs. Threads are grouped
by what they do: the event loop (the main thread), decoding (`decode-*`), the batch thread that
calls ONNX Runtime (`infer-*`) and everything else (ONNX Runtime's intra-op workers, spinning too).

    .venv/bin/python -m bench.request_cpu --repository model_repository [--requests 400]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench.http import SequentialClient, vitserve
from bench.machine import machine_info
from bench.plots import phase_bars
from bench.results import add_output_arguments, publish
from bench.serving import photo_jpeg

GROUPS = ("event loop", "decode", "inference batch thread", "other threads")
WARMUP_REQUESTS = 20


def _group(pid: int, tid: int, name: str) -> str:
    if tid == pid:
        return "event loop"
    if name.startswith("decode-"):
        return "decode"
    if name.startswith("infer-"):
        return "inference batch thread"
    return "other threads"


def thread_cpu_s(pid: int) -> dict[str, float]:
    """User + system CPU seconds of each thread group of process `pid` so far."""
    tick = os.sysconf("SC_CLK_TCK")
    totals = dict.fromkeys(GROUPS, 0.0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except FileNotFoundError:  # the thread ended between listing and reading
            continue
        fields = stat.rsplit(")", 1)[1].split()
        totals[_group(pid, int(task.name), name)] += (int(fields[11]) + int(fields[12])) / tick
    return totals


def measure(repository: Path, requests: int) -> list[dict]:
    photo = photo_jpeg(224)
    rows = []
    with vitserve(repository) as server:
        pid = server.process.pid
        calls = {
            "GET /v2/health/live": SequentialClient(server, "/v2/health/live"),
            "GET /v1/route (224x224)": SequentialClient(server, "/v1/route?width=224&height=224"),
            "POST /v1/classify (224 JPEG, global 224)": SequentialClient(
                server, "/v1/classify?route=global&bucket=224", photo
            ),
        }
        for request, call in calls.items():
            for _ in range(WARMUP_REQUESTS):
                call()
            before = thread_cpu_s(pid)
            for _ in range(requests):
                payload = call()
            after = thread_cpu_s(pid)
            row = {"run": request, "requests": requests, "response_bytes": len(payload)}
            row |= {group: round((after[group] - before[group]) / requests * 1e3, 3) for group in GROUPS}
            rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.request_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--requests", type=int, default=400, help="timed requests of each kind")
    add_output_arguments(parser, "request-cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info("bench.request_cpu")
    rows = measure(args.repository, args.requests)
    summary = {row["run"]: {group: row[group] for group in GROUPS} for row in rows}
    run_settings = {
        "repository": str(args.repository),
        "requests": args.requests,
        "unit": "CPU ms per request, user + system, per thread group",
        "client": "sequential, one keep-alive connection",
    }

    def plot(png: Path) -> None:
        title = f"Server CPU per request by thread: {machine['cores']} cores, {machine['date'][:10]}"
        phase_bars(rows, GROUPS, title, png, xlabel="CPU ms per request (user + system)", unit="ms")

    publish(args, machine, run_settings, rows, summary, plot)


if __name__ == "__main__":
    main()
