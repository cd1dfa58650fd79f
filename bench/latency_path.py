"""Where concurrency 1's milliseconds go beyond raw inference, in wall time (issue 8 item 6).

One `vitserve serve` on `--repository` with default settings, and the same global 224 entry's
runtime in this process (`service.runtimes.ort.OnnxRuntime` with ONNX Runtime's default spinning,
bench.serving's raw baseline). Each round sends `--requests` sequential POST /v1/classify requests
(a 224x224 JPEG photo forced to route=global&bucket=224, one keep-alive connection), then makes as
many raw batch-1 runs back to back; the overhead is the round's median client latency minus its
raw median. The response's own `timings` split each request's client latency:

- HTTP and framework: client latency - `total_ms` (uvicorn, the middleware, FastAPI's routing and
  dependencies, building and sending the answer, the client's own parsing);
- read, route, decode: `total_ms` - `queue_and_inference_ms` (the body, the header probe, the
  router, decode and preprocessing);
- batching and hops: `queue_and_inference_ms` - the round's raw median (the batcher, the hop to
  the batch thread and back, and how the server's run differs from this process's).

Each part is a median over the round's requests; the headline round is the quietest (least median
client latency). The parts do not sum exactly to the overhead, since medians do not add.

Cold caches: `top_predictions` (softmax and top-k of the 1000 logits) is timed right after a raw run
and then once more at once. A batch-1 run streams the weights through both cores' L2, so the first
call after it runs from cold caches: the gap between the two is what every line of the gateway's
Python pays on this path, which is why its few hundred microseconds of warm work cost milliseconds.

    .venv/bin/python -m bench.latency_path --repository model_repository
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import median

import numpy as np

from bench.http import SequentialClient, vitserve
from bench.machine import cores, machine_info
from bench.results import add_output_arguments, publish
from bench.serving import RAW_POLICY, global_entry, photo_jpeg
from bench.timing import call_until
from service.api_v1 import top_predictions
from service.runtimes.ort import OnnxRuntime

# What the gateway adds to the raw run. The first two are measured by the server itself; the last
# compares its run with this process's and is negative when the server's run was the faster one.
PARTS = ("read, route, decode", "HTTP and framework", "batching and hops")
WARMUP_REQUESTS = 30


def _round(client: SequentialClient, runtime: OnnxRuntime, pixels: np.ndarray, requests: int) -> dict:
    """`requests` classify requests back to back, then as many raw runs back to back; medians in ms.

    Blocks, not alternating pairs: a raw run right after a request (or after a pause for ONNX
    Runtime's workers to stop spinning) ran 57-66 ms against 49 ms back to back on the 2-core VM,
    which would flatter the gateway."""
    client_ms, total_ms, inference_ms, pixel_ms = [], [], [], []
    for _ in range(requests):
        start = time.perf_counter()
        timings = json.loads(client())["timings"]
        client_ms.append((time.perf_counter() - start) * 1e3)
        total_ms.append(timings["total_ms"])
        inference_ms.append(timings["queue_and_inference_ms"])
        pixel_ms.append(timings["decode_ms"] + timings["preprocess_ms"])
    raw = median(call_until(lambda: runtime.run(pixels), 0, requests)) * 1e3
    return {
        "client_ms_p50": round(median(client_ms), 3),
        "raw_ms_p50": round(raw, 3),
        "overhead_ms": round(median(client_ms) - raw, 3),
        "batching and hops": round(median(inference_ms) - raw, 3),
        "read, route, decode": round(median(t - q for t, q in zip(total_ms, inference_ms, strict=True)), 3),
        "decode and preprocess": round(median(pixel_ms), 3),
        "HTTP and framework": round(median(c - t for c, t in zip(client_ms, total_ms, strict=True)), 3),
    }


def cold_post_processing(
    runtime: OnnxRuntime, pixels: np.ndarray, labels: tuple[str, ...], runs: int
) -> dict:
    """Median ms of `top_predictions` right after a raw run and when called again at once."""
    after_run, warm = [], []
    for _ in range(runs):
        logits = runtime.run(pixels)["logits"][0]
        for samples in (after_run, warm):
            start = time.perf_counter()
            top_predictions(logits, labels, 5)
            samples.append((time.perf_counter() - start) * 1e3)
    return {
        "top_predictions_after_run_ms": round(median(after_run), 4),
        "top_predictions_warm_ms": round(median(warm), 4),
        "cold_over_warm": round(median(after_run) / median(warm), 1),
    }


def measure(repository: Path, requests: int, rounds: int) -> tuple[list[dict], dict]:
    entry = global_entry(repository, reuse=True)
    runtime = OnnxRuntime(entry, cores(), RAW_POLICY)
    pixels = np.zeros((1, *entry.input_shape), np.float32)
    rows = []
    with vitserve(repository) as server:
        client = SequentialClient(server, f"/v1/classify?route=global&bucket={entry.bucket}", photo_jpeg(224))
        for _ in range(WARMUP_REQUESTS):
            client()
        for index in range(rounds):
            row = _round(client, runtime, pixels, requests)
            rows.append(
                {"run": f"round {index + 1}, raw {row['raw_ms_p50']:.1f} ms", "requests": requests} | row
            )
        client.close()
    return rows, cold_post_processing(runtime, pixels, entry.labels, requests)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency_path", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--repository", type=Path, default=Path("model_repository"), help="holds the global backbone at 224"
    )
    parser.add_argument("--requests", type=int, default=150, help="requests (and raw runs) per round")
    parser.add_argument("--rounds", type=int, default=5)
    add_output_arguments(parser, "latency-path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info("bench.latency_path")
    rows, cold = measure(args.repository, args.requests, args.rounds)
    quietest = min(rows, key=lambda row: row["client_ms_p50"])
    summary = {
        "quietest_round": quietest["run"],
        "concurrency1_overhead_ms": quietest["overhead_ms"],
        "raw_batch1_ms_p50": quietest["raw_ms_p50"],
        "parts_ms": {part: quietest[part] for part in PARTS},
        "decode_and_preprocess_ms": quietest["decode and preprocess"],
        "overhead_ms_by_round": [row["overhead_ms"] for row in rows],
        "post_processing": cold,
        "budget_overhead_ms": 2.0,
    }
    run_settings = {
        "repository": str(args.repository),
        "requests": args.requests,
        "rounds": args.rounds,
        "raw_policy": RAW_POLICY,
        "image": "skimage astronaut resized to 224x224 JPEG, forced to route=global&bucket=224",
        "client": "sequential, one keep-alive connection",
    }
    publish(args, machine, run_settings, rows, summary, lambda png: _plot(rows, machine, png))


def _plot(rows: list[dict], machine: dict, path: Path) -> None:
    """Per round: the server-measured parts stacked, the whole overhead over the raw run as a marker."""
    from bench.plots import plt

    fig, ax = plt.subplots(figsize=(9, 1.8 + 0.6 * len(rows)))
    for index, row in enumerate(rows):
        left = 0.0
        for color, part in enumerate(PARTS[:2]):
            ax.barh(index, row[part], left=left, color=f"C{color}", label=part if index == 0 else None)
            left += row[part]
        ax.plot(row["overhead_ms"], index, "kD", label="client p50 - raw p50" if index == 0 else None)
        ax.annotate(
            f"{row['overhead_ms']:.2f} ms",
            (max(left, row["overhead_ms"]), index),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
        )
    ax.axvline(2.0, color="tab:red", linestyle="--", linewidth=1, label="budget +2 ms")
    ax.set_yticks(range(len(rows)), [row["run"] for row in rows])
    ax.set_xlim(0, max(max(r["overhead_ms"], r[PARTS[0]] + r[PARTS[1]]) for r in rows) * 1.2)
    ax.set_xlabel("ms per classify request beyond the raw batch-1 run (medians per round)")
    ax.set_title(
        f"Concurrency 1: what the gateway adds, {machine['cores']} cores, {machine['date'][:10]}", fontsize=10
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
