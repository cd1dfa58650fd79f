"""HTTP serving against raw in-process ONNX Runtime on the same model, in one run (ARCHITECTURE.md "Performance budget").

Baseline: an InferenceSession on the gateway's own `vit_global_224` artifact, fed preprocessed
tensors, at batch 1, 8, 16 and 32 (best img/s) and at batch 1 (single-image latency).
Served: `vitserve serve` (real uvicorn process, embedded ONNX Runtime) answering POST /v1/classify
with a 224x224 JPEG photo, driven by `hey` at concurrency 1 (p50 latency) and at high concurrency
(throughput). Every HTTP request is decoded, routed, preprocessed, batched and post-processed.

The load generator runs on the same 2 cores as the server, so the HTTP figures include its cost.

    .venv/bin/python -m bench.serving            # needs `hey` (apt-get install hey)
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench.backends import export_entry, ort_runner, ort_session, random_batch
from bench.machine import cores, machine_info
from bench.results import RESULTS_DIR, write_results
from bench.timing import TimingPlan, time_cells
from export.repository import ModelEntry

GLOBAL_MODEL = "vit_tiny_patch16_224"
WINDOWED_MODEL = "swin_tiny_patch4_window7_224"
BATCHES = (1, 8, 16, 32)
CONCURRENCY = (1, 16, 64)


def _photo_jpeg(size: int) -> bytes:
    """A real photograph (scikit-image's astronaut) as a size x size JPEG, like a client would send."""
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BILINEAR).save(buffer, "JPEG")
    return buffer.getvalue()


def _repository(root: Path) -> ModelEntry:
    """The gateway's repository: the global backbone at 224 and a windowed backbone (never hit here)."""
    global_entry = export_entry(GLOBAL_MODEL, root, 224)
    export_entry(WINDOWED_MODEL, root, 448)
    return global_entry


def _raw_rows(entry: ModelEntry) -> list[dict]:
    session = ort_session(entry.artifact, cores())
    cells = {b: ort_runner(session, entry, random_batch(b, 224)) for b in BATCHES}
    timings = time_cells(cells, TimingPlan(rounds=3, seconds=6.0))
    rows = []
    for batch, timing in timings.items():
        seconds = timing.median
        rows.append(
            {"path": "raw onnxruntime", "batch": batch, "ms_p50": seconds * 1e3, "img_per_s": batch / seconds}
        )
    return rows


def _hey(url: str, body: Path, concurrency: int, seconds: int) -> dict:
    """Run hey and read its summary: requests/s and the latency percentiles, all responses 200."""
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
            "image/jpeg",
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
    percentile = dict(re.findall(r"\s(\d+)%% in ([\d.]+) secs".replace("%%", "%"), out))
    return {
        "path": "http /v1/classify",
        "concurrency": concurrency,
        "img_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "ms_p50": float(percentile["50"]) * 1e3,
        "ms_p95": float(percentile["95"]) * 1e3,
        "requests": int(statuses["200"]),
    }


def _serve(repository: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--repository", str(repository), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        probe = subprocess.run(
            ["curl", "-sf", f"http://127.0.0.1:{port}/v2/health/ready"], capture_output=True, check=False
        )
        if probe.returncode == 0:
            return process
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("vitserve did not become ready within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20, help="duration of each hey run")
    parser.add_argument("--port", type=int, default=18321)
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("hey is not installed: apt-get install hey")
    machine = machine_info("bench.serving")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        entry = _repository(root / "repository")
        raw = _raw_rows(entry)
        body = root / "photo.jpg"
        body.write_bytes(_photo_jpeg(224))
        server = _serve(root / "repository", args.port)
        try:
            url = f"http://127.0.0.1:{args.port}/v1/classify"
            _hey(url, body, 8, 3)
            http = [_hey(url, body, c, args.seconds) for c in CONCURRENCY]
        finally:
            server.terminate()
            server.wait(60)
    best = max(raw, key=lambda row: row["img_per_s"])
    single = next(row for row in raw if row["batch"] == 1)
    top = max(http, key=lambda row: row["img_per_s"])
    alone = next(row for row in http if row["concurrency"] == 1)
    summary = {
        "raw_best": {"batch": best["batch"], "img_per_s": round(best["img_per_s"], 1)},
        "http_best": {"concurrency": top["concurrency"], "img_per_s": round(top["img_per_s"], 1)},
        "http_over_raw_throughput": round(top["img_per_s"] / best["img_per_s"], 3),
        "raw_single_ms_p50": round(single["ms_p50"], 2),
        "http_concurrency1_ms_p50": round(alone["ms_p50"], 2),
        "http_concurrency1_overhead_ms": round(alone["ms_p50"] - single["ms_p50"], 2),
    }
    settings = {
        "model": GLOBAL_MODEL,
        "bucket": 224,
        "batches": BATCHES,
        "concurrency": CONCURRENCY,
        "hey_seconds": args.seconds,
        "image": "skimage astronaut resized to 224x224 JPEG",
    }
    for path in write_results("serving", machine, settings, raw + http, summary):
        print(f"wrote {path}", file=sys.stderr)
    _plot(raw, http, RESULTS_DIR / "serving.png")
    print(summary)


def _plot(raw: list[dict], http: list[dict], path: Path) -> None:
    from bench.plots import plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"raw ORT\nbatch {r['batch']}" for r in raw] + [f"HTTP\nc={r['concurrency']}" for r in http]
    values = [r["img_per_s"] for r in raw] + [r["img_per_s"] for r in http]
    colors = ["tab:gray"] * len(raw) + ["tab:blue"] * len(http)
    bars = ax.bar(range(len(values)), values, color=colors)
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
        )
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel("images / s")
    ax.set_title(f"{GLOBAL_MODEL} at 224: HTTP /v1/classify vs raw ONNX Runtime (same run, {cores()} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
