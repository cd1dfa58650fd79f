"""Resident memory of real vitserve gateways (`python -m service.cli serve`), read from /proc.

Three measurements, each on servers started by `bench.http.vitserve` and read from the server's
/proc/<pid>/status (VmRSS now, VmHWM its peak; idle also splits VmRSS into RssAnon, private to the
process, and RssFile, file pages such as mapped pre-packed weights, and adds Pss from
/proc/<pid>/smaps_rollup: RSS counts a file page once per mapping, so 27 sessions mapping one weight
file count it 27 times, while Pss counts each physical page once, shared among its mappings):

- `shapes`: idle memory of a pool serving several shapes of one backbone (`--model` at
  `--buckets`, exported here), once per ONNX Runtime setting (weights mapped, shared or private, CPU arena on
  or off). Idle is after readiness: every session loaded, warmed up and calibrated.
- `default` (issue 8 "Memory"): the repository `make export` builds (`--repository`), default
  settings: idle Pss (bound 1.5 GB), then the peak Pss while one 2048x2048 JPEG with `detail=full`
  is served (bound 4 GiB; sampled every `PEAK_SAMPLE_S`), and the shape that served it. The bounds
  are on Pss, not VmRSS: the default maps pre-packed weights (ORT_PREPACKED_CACHE), and 27 sessions
  mapping one weight file count it 27 times in VmRSS but once in Pss, as in a container's memory
  cgroup. VmRSS and VmHWM are reported beside them.
- `flood` (issue 10 "the byte budget gives 429 before resident memory passes the stated bound"):
  the same repository with a small `VITSERVE_MAX_QUEUE_BYTES`, `--clients` threads posting large
  JPEGs with `detail=full` and a long deadline for `--flood-seconds`. It passes when 429s appear
  and the peak stays under the bound of deploy/README.md "Memory limits", here for a gateway that
  runs its pools in-process, all in Pss: idle + what the server keeps after its first two overlapping
  requests (the heap glibc keeps from their batches; the "idle" spinning policy's second session
  is built at load, so idle holds it) + pools x MAX_QUEUE_BYTES + decode in
  flight (pools x decode threads x MAX_PIXELS x 3 bytes) + the activations of one batch at the
  flood's shape (the peak one such request adds to the idle server, measured first, times the
  entry's batch limit).

    .venv/bin/python -m bench.memory --modes shapes --model vit_small_patch16_224 --buckets 224,192x256,256x192
    .venv/bin/python -m bench.memory --modes default flood --repository model_repository
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from bench.http import Server, vitserve
from bench.machine import cores, machine_info
from bench.mixed import photo_jpeg
from bench.results import add_output_arguments, write_results
from export import ExportRequest, export_model
from export.shapes import parse_shape
from service.settings import Settings

# Stands for the mapped configuration's cache: a temporary directory of the run.
PREPACKED_CACHE = "<temporary directory>"
CONFIGS = {
    "mapped, no arena (default)": {"ort_prepacked_cache": PREPACKED_CACHE, "ort_cpu_arena": "false"},
    "shared, no arena": {"ort_prepacked_cache": "off", "ort_share_weights": "true", "ort_cpu_arena": "false"},
    "shared, arena": {"ort_prepacked_cache": "off", "ort_share_weights": "true", "ort_cpu_arena": "true"},
    "private, no arena": {
        "ort_prepacked_cache": "off",
        "ort_share_weights": "false",
        "ort_cpu_arena": "false",
    },
    "private, arena (before)": {
        "ort_prepacked_cache": "off",
        "ort_share_weights": "false",
        "ort_cpu_arena": "true",
    },
}
# Every server of this benchmark: no gRPC listener (other servers may hold its default port).
BASE_SETTINGS = {"grpc_port": 0}
STARTUP_TIMEOUT_S = 1200
IDLE_SETTLE_S = 2.0
PEAK_SAMPLE_S = 0.05
IDLE_BOUND_MIB = 1.5e9 / 2**20
PEAK_BOUND_MIB = 4096
POOLS = 2
TILE = 2048
REQUEST_TIMEOUT_S = 600
MIB = 2**20


def status_mib(pid: int) -> dict[str, float]:
    """VmRSS (resident now), VmHWM (peak resident), RssAnon and RssFile of process `pid`, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def pss_mib(pid: int) -> dict[str, float]:
    """Proportional set size of process `pid` (Pss, Pss_Anon, Pss_File), in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Pss", "Pss_Anon", "Pss_File"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def reset_peak(pid: int) -> None:
    """Restart VmHWM of `pid` from its current VmRSS (Linux 4.0+), so a later peak is that of what ran
    since, not of start-up calibration's largest batches."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _idle(server: Server) -> dict:
    time.sleep(IDLE_SETTLE_S)
    pid = server.process.pid
    return {f"idle_{k}_mib": v for k, v in (status_mib(pid) | pss_mib(pid)).items()}


def _post(server: Server, path: str, body: bytes, timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request("POST", path, body, {"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _one_request(server: Server, body: bytes) -> dict:
    """One detail=full classify: its route and the server's peak while serving it (from idle)."""
    pid = server.process.pid
    reset_peak(pid)
    started = time.monotonic()
    answer: list[tuple[int, bytes]] = []
    path = f"/v1/classify?detail=full&timeout_ms={REQUEST_TIMEOUT_S * 1000}"
    request = threading.Thread(target=lambda: answer.append(_post(server, path, body)), daemon=True)
    request.start()
    peak_pss = pss_mib(pid)["Pss"]
    while request.is_alive():
        peak_pss = max(peak_pss, pss_mib(pid)["Pss"])
        request.join(PEAK_SAMPLE_S)
    if not answer:
        raise RuntimeError("the detail=full request raised; see the server's log above")
    status, payload = answer[0]
    if status != 200:
        raise RuntimeError(f"detail=full request answered {status}: {payload[:300]!r}")
    route = json.loads(payload)["route"]
    return {
        "entry": route["entry"],
        "shape": route["shape"],
        "detail": round(route["detail"], 4),
        "request_s": round(time.monotonic() - started, 2),
        "peak_VmHWM_mib": status_mib(pid)["VmHWM"],
        "peak_Pss_mib": peak_pss,
    }


def _after_overlap(server: Server, body: bytes, idle_mib: float) -> float:
    """MiB the server keeps, once settled, after its first two overlapping requests: the heap glibc
    keeps from their batches (the "idle" policy's second session is built at load, so idle holds it)."""
    threads = [
        threading.Thread(target=_post, args=(server, "/v1/classify?detail=full", body)) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    previous, settled = -1.0, pss_mib(server.process.pid)["Pss"]
    while abs(settled - previous) > 1:
        time.sleep(IDLE_SETTLE_S)
        previous, settled = settled, pss_mib(server.process.pid)["Pss"]
    return max(0.0, settled - idle_mib)


def _batch_limits(server: Server) -> dict[str, int]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", "/v1/models")
        models = json.loads(connection.getresponse().read())["models"]
    finally:
        connection.close()
    return {m["name"]: m["max_batch_size"] for m in models}


def measure_shapes(model: str, buckets: str, threads: int) -> list[dict]:
    """Idle memory of one backbone's shapes under each ONNX Runtime memory setting."""
    shapes = tuple(parse_shape(b) for b in buckets.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        repository = Path(root) / "repository"
        export_model(ExportRequest(model=model, repository=repository, buckets=shapes), log=lambda _: None)
        cache = str(Path(root) / "prepacked")
        for name, configured in CONFIGS.items():
            env = {key: cache if value == PREPACKED_CACHE else value for key, value in configured.items()}
            # One backbone cannot be routed: a pool serves every entry with the same sessions.
            settings = {**BASE_SETTINGS, **env, "intra_op_threads": threads, "role": "pool"}
            started = time.monotonic()
            with vitserve(repository, settings, STARTUP_TIMEOUT_S) as server:
                ready_s = round(time.monotonic() - started, 1)
                rows.append(
                    {
                        "measurement": "shapes",
                        "config": name,
                        **env,
                        **_idle(server),
                        "ready_s": ready_s,
                    }
                )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def measure_default(repository: Path) -> dict:
    """Idle memory of `repository` with default settings, then the peak while one 2048x2048 detail=full
    is served. The pre-packed cache is whatever the environment says (default ~/.cache/vitserve):
    `cache_warm` says whether it held this repository's models already (ready_s depends on it)."""
    cache = Settings().ort_prepacked_cache
    warm = cache is not None and any(cache.glob("*/*.onnx"))
    started = time.monotonic()
    with vitserve(repository, BASE_SETTINGS, STARTUP_TIMEOUT_S) as server:
        ready_s = round(time.monotonic() - started, 1)
        idle = _idle(server)
        tile = _one_request(server, photo_jpeg(TILE, TILE))
        entries = len(_batch_limits(server))
    return {
        "measurement": "default",
        "entries": entries,
        "ready_s": ready_s,
        "prepacked_cache": str(cache) if cache else None,
        "cache_warm": warm,
        **idle,
        "idle_within_1.5GB": idle["idle_Pss_mib"] <= IDLE_BOUND_MIB,
        "image": f"{TILE}x{TILE} JPEG, detail=full",
        **tile,
        "peak_within_4GiB": tile["peak_Pss_mib"] <= PEAK_BOUND_MIB,
    }


def _flood(server: Server, body: bytes, clients: int, seconds: float) -> tuple[Counter, float]:
    """`clients` threads posting `body` back to back for `seconds`; statuses and the largest Pss seen."""
    statuses: Counter = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    path = f"/v1/classify?detail=full&timeout_ms={REQUEST_TIMEOUT_S * 1000}"

    def client() -> None:
        while time.monotonic() < deadline:
            try:
                status, _ = _post(server, path, body, timeout=seconds + REQUEST_TIMEOUT_S)
            except OSError as exc:
                status = type(exc).__name__
            with lock:
                statuses[str(status)] += 1
            if status == 429:
                time.sleep(0.05)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    largest = 0.0
    while any(t.is_alive() for t in threads):
        largest = max(largest, pss_mib(server.process.pid)["Pss"])
        time.sleep(PEAK_SAMPLE_S)
        if time.monotonic() > deadline + REQUEST_TIMEOUT_S:
            raise RuntimeError(f"flood clients still waiting {REQUEST_TIMEOUT_S} s after the flood ended")
    return statuses, largest


def measure_flood(
    repository: Path, budget_mib: int, size: tuple[int, int], clients: int, seconds: float
) -> dict:
    """A flood of large images against a small byte budget: 429s, and the peak against the bound."""
    defaults = Settings()
    settings = {**BASE_SETTINGS, "max_queue_bytes": budget_mib * MIB}
    body = photo_jpeg(*size)
    with vitserve(repository, settings, STARTUP_TIMEOUT_S) as server:
        idle = _idle(server)
        one = _one_request(server, body)
        overlap_mib = _after_overlap(server, body, idle["idle_Pss_mib"])
        batch_limit = _batch_limits(server)[one["entry"]]
        statuses, peak = _flood(server, body, clients, seconds)
        hwm = status_mib(server.process.pid)["VmHWM"]
    decode_mib = POOLS * defaults.decoders() * defaults.max_pixels * 3 / MIB
    activations_mib = max(0.0, one["peak_Pss_mib"] - idle["idle_Pss_mib"]) * batch_limit
    bound = idle["idle_Pss_mib"] + overlap_mib + POOLS * budget_mib + decode_mib + activations_mib
    return {
        "measurement": "flood",
        "image": f"{size[0]}x{size[1]} JPEG ({len(body)} bytes), detail=full",
        "max_queue_bytes_mib": budget_mib,
        "clients": clients,
        "flood_s": seconds,
        **idle,
        "entry": one["entry"],
        "shape": one["shape"],
        "entry_batch_limit": batch_limit,
        "one_request_peak_Pss_mib": one["peak_Pss_mib"],
        "statuses": dict(statuses),
        "peak_Pss_mib": peak,
        "peak_VmHWM_mib": hwm,
        "bound_mib": round(bound, 1),
        "bound_terms_mib": {
            "idle": idle["idle_Pss_mib"],
            "kept_after_overlap": round(overlap_mib, 1),
            "queue_budget": POOLS * budget_mib,
            "decode_in_flight": round(decode_mib, 1),
            "activations": round(activations_mib, 1),
        },
        "429_before_bound": statuses.get("429", 0) > 0 and peak <= bound,
    }


def _summary(rows: list[Mapping]) -> dict:
    summary = {}
    for row in rows:
        if row["measurement"] == "default":
            summary["default_idle_pss_mib"] = row["idle_Pss_mib"]
            summary["default_idle_rss_mib"] = row["idle_VmRSS_mib"]
            summary["default_idle_within_1.5GB"] = row["idle_within_1.5GB"]
            summary["detail_full_2048_served"] = f"{row['entry']} {row['shape']}"
            summary["detail_full_2048_peak_pss_mib"] = row["peak_Pss_mib"]
            summary["detail_full_2048_peak_mib"] = row["peak_VmHWM_mib"]
            summary["detail_full_2048_within_4GiB"] = row["peak_within_4GiB"]
        elif row["measurement"] == "flood":
            summary["flood_statuses"] = row["statuses"]
            summary["flood_peak_pss_mib"] = row["peak_Pss_mib"]
            summary["flood_bound_mib"] = row["bound_mib"]
            summary["flood_429_before_bound"] = row["429_before_bound"]
        else:
            summary.setdefault("shapes_idle_pss_mib", {})[row["config"]] = row.get("idle_Pss_mib")
            summary.setdefault("shapes_idle_rss_mib", {})[row["config"]] = row.get("idle_VmRSS_mib")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=("shapes", "default", "flood"), default=["shapes"])
    parser.add_argument("--model", default="vit_small_patch16_224", help="shapes: the backbone")
    parser.add_argument("--buckets", default="224,192x256,256x192", help="shapes: its shapes")
    parser.add_argument("--threads", type=int, default=cores(), help="shapes: intra-op threads")
    parser.add_argument("--repository", type=Path, help="default, flood: the repository `make export` built")
    parser.add_argument("--flood-budget-mib", type=int, default=64, help="flood: VITSERVE_MAX_QUEUE_BYTES")
    parser.add_argument("--flood-size", default="4000x3000", help="flood: image WIDTHxHEIGHT")
    parser.add_argument("--clients", type=int, default=32, help="flood: concurrent clients")
    parser.add_argument("--flood-seconds", type=float, default=30.0)
    add_output_arguments(parser, "memory")
    args = parser.parse_args(argv)
    if {"default", "flood"} & set(args.modes) and args.repository is None:
        parser.error("--modes default and flood need --repository (the repository `make export` built)")
    machine = machine_info("bench.memory")
    rows: list[dict] = []
    if "shapes" in args.modes:
        rows += measure_shapes(args.model, args.buckets, args.threads)
    if "default" in args.modes:
        rows.append(measure_default(args.repository))
        print(json.dumps(rows[-1]), flush=True)
    if "flood" in args.modes:
        width, height = (int(side) for side in args.flood_size.split("x"))
        rows.append(
            measure_flood(
                args.repository, args.flood_budget_mib, (width, height), args.clients, args.flood_seconds
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    settings = {"modes": args.modes, "repository": str(args.repository) if args.repository else None}
    settings |= {"model": args.model, "buckets": args.buckets, "threads": args.threads}
    settings |= {"idle_bound_mib": round(IDLE_BOUND_MIB, 1), "peak_bound_mib": PEAK_BOUND_MIB}
    # The servers inherit this environment (bench.http.vitserve), e.g. a VITSERVE_ROUTING file.
    settings |= {"environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("VITSERVE_")}}
    paths = write_results(args.name, machine, settings, rows, _summary(rows), args.output_dir)
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
