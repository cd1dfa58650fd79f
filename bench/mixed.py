"""Mixed-resolution traffic, open loop, against real vitserve servers: cost routing vs the square baseline.

The workload (`CLASSES`): what an image service receives from phones, scanners and tiling jobs,
every image a JPEG of scikit-image's astronaut resized to the class's size:

| class | sizes (width x height) | why |
|---|---|---|
| thumbnail | 256x192, 160x160 | previews, avatars: should stay on the cheap global backbone |
| phone_4_3 | 2048x1536 (3.1 MP), 4000x3000 (12 MP), 3000x4000 (12 MP portrait) | phone cameras |
| phone_16_9 | 2560x1440 (3.7 MP), 4608x2592 (11.9 MP), 1440x2560 (portrait) | phone video stills, wide mode |
| document | 1240x1754 (A4 at 150 dpi), 2480x3508 (A4 at 300 dpi) | scans, 1:1.41 |
| panorama | 4000x1000, 6000x1200 | 4:1 and 5:1 strips |
| tile | 2048x2048 | slides, satellite and map tiles |

Arrivals are a Poisson process at a fixed rate (open loop: a slow answer does not slow the next
arrival), each request a random class (weights in `CLASSES`) and a random size of it, with the
same seeded sequence for every policy. The rates are multiples (`--loads`, default 0.5x and
1.5x) of the baseline's capacity, measured first: one sequential pass over every size on the
baseline server, capacity = 1 / (mix-weighted mean service time). Each policy
(`VITSERVE_ROUTING_POLICY`: `cost`, and `square`, the old square-bucket policy, as baseline) runs in
its own server on the same repository, one after the other, in the same run.

Per class, policy and load, from each response's `route` object (`shape` [H, W] served, `resized`
[h, w] content before padding, `scale`, `degraded`): answered req/s, p50/p99 latency (client
side, all answers), budget attainment (200 within `--budget-ms`, sent as `timeout_ms`), mean
detail (content pixels / image pixels, capped at 1), mean padding (fraction of served pixels),
upscaled count (scale > 1.05), degraded fraction, and every non-200 status.

    .venv/bin/python -m bench.mixed --repository model_repository   # `make export` builds it
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

from bench.http import SequentialClient, vitserve
from bench.machine import machine_info
from bench.results import add_output_arguments, write_results
from service.settings import Settings


@dataclass(frozen=True)
class SizeClass:
    name: str
    weight: float
    sizes: tuple[tuple[int, int], ...]


CLASSES = (
    SizeClass("thumbnail", 0.30, ((256, 192), (160, 160))),
    SizeClass("phone_4_3", 0.25, ((2048, 1536), (4000, 3000), (3000, 4000))),
    SizeClass("phone_16_9", 0.15, ((2560, 1440), (4608, 2592), (1440, 2560))),
    SizeClass("document", 0.10, ((1240, 1754), (2480, 3508))),
    SizeClass("panorama", 0.10, ((4000, 1000), (6000, 1200))),
    SizeClass("tile", 0.10, ((2048, 2048),)),
)
POLICIES = ("cost", "square")
BASELINE = "square"
UPSCALE_LIMIT = 1.05
MAX_IN_FLIGHT = 256
SEQUENTIAL_TIMEOUT_MS = 120_000


def photo_jpeg(width: int, height: int) -> bytes:
    """The same photograph (scikit-image's astronaut) resized to width x height, as a quality-90 JPEG."""
    from skimage import data

    buffer = io.BytesIO()
    photo = Image.fromarray(data.astronaut())
    photo.resize((width, height), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _jpegs() -> dict[tuple[int, int], bytes]:
    """Every workload size as a JPEG of the same photograph."""
    return {size: photo_jpeg(*size) for size_class in CLASSES for size in size_class.sizes}


def _arrivals(rate: float, seconds: float, seed: int) -> list[tuple[float, str, tuple[int, int]]]:
    """(offset s, class, size) of a Poisson process at `rate` req/s for `seconds`, seeded."""
    rng = random.Random(seed)
    weights = [c.weight for c in CLASSES]
    arrivals, at = [], rng.expovariate(rate)
    while at < seconds:
        size_class = rng.choices(CLASSES, weights)[0]
        arrivals.append((at, size_class.name, rng.choice(size_class.sizes)))
        at += rng.expovariate(rate)
    return arrivals


def _route_numbers(route: dict, width: int, height: int) -> dict:
    """Detail and padding from what was served: `shape` [H, W] and `resized` [h, w] content."""
    shape = route.get("shape") or [route["bucket"], route["bucket"]]
    resized_h, resized_w = route["resized"]
    content = min(resized_h, shape[0]) * min(resized_w, shape[1])
    return {
        "detail": min(1.0, content / (width * height)),
        "padding": 1 - content / (shape[0] * shape[1]),
        "upscaled": route["scale"] > UPSCALE_LIMIT,
        "degraded": bool(route.get("degraded", False)),
        "shape": f"{shape[0]}x{shape[1]}",
        "pool": route["pool"],
    }


async def _one(client: httpx.AsyncClient, url: str, body: bytes, budget_ms: float) -> tuple[int, float, dict]:
    started = time.perf_counter()
    response = await client.post(
        url, params={"timeout_ms": budget_ms}, content=body, headers={"Content-Type": "image/jpeg"}
    )
    seconds = time.perf_counter() - started
    return response.status_code, seconds, response.json()


async def _open_loop(
    base: str, images: dict, arrivals: list, budget_ms: float, grace_s: float
) -> tuple[list[dict], float]:
    """Send every arrival at its offset without waiting for earlier answers; wait for the stragglers
    at most `grace_s` after the last arrival (still unanswered: status 0)."""
    url = f"{base}/v1/classify"
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
    timeout = httpx.Timeout(budget_ms / 1000 + grace_s + 30)
    results: list[dict] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()

        async def fire(offset: float, name: str, size: tuple[int, int]) -> None:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            row = {"class": name, "width": size[0], "height": size[1]}
            try:
                status, seconds, payload = await _one(client, url, images[size], budget_ms)
            except httpx.HTTPError as exc:
                results.append({**row, "status": 0, "error": type(exc).__name__})
                return
            except asyncio.CancelledError:
                results.append({**row, "status": 0, "error": "no answer within the grace period"})
                raise
            row.update(status=status, ms=seconds * 1e3)
            if status == 200:
                row.update(_route_numbers(payload["route"], *size))
            else:
                row["error"] = payload.get("error", {}).get("code", str(payload)[:80])
            results.append(row)

        tasks = [asyncio.ensure_future(fire(*arrival)) for arrival in arrivals]
        last = arrivals[-1][0] if arrivals else 0.0
        _, pending = await asyncio.wait(tasks, timeout=last + grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - start
    return results, elapsed


def _sequential_ms(server, images: dict) -> dict[str, float]:
    """Mean ms per class of one request at a time, each size called once to warm up, then timed once.

    On the baseline this gives the capacity; on every policy's server it is the warm-up before
    the open loop (first calls of a shape pay for its arena and kernel selection).
    """
    service_ms: dict[str, float] = {}
    for size_class in CLASSES:
        times = []
        for size in size_class.sizes:
            client = SequentialClient(
                server, f"/v1/classify?timeout_ms={SEQUENTIAL_TIMEOUT_MS}", images[size]
            )
            client()
            started = time.perf_counter()
            client()
            times.append(time.perf_counter() - started)
            client.close()
        service_ms[size_class.name] = round(statistics.mean(times) * 1e3, 1)
    return service_ms


def _capacity(service_ms: dict[str, float]) -> float:
    """Mix-weighted capacity in req/s of a server answering one request at a time in `service_ms`."""
    mean_ms = sum(c.weight * service_ms[c.name] for c in CLASSES) / sum(c.weight for c in CLASSES)
    return 1e3 / mean_ms


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _aggregate(results: list[dict], elapsed: float, budget_ms: float) -> list[dict]:
    """One row per size class (and `all`): the figures issue 8 asks for."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[r["class"]].append(r)
        groups["all"].append(r)
    rows = []
    for name, items in groups.items():
        ok = [r for r in items if r["status"] == 200]
        latencies = [r["ms"] for r in items if "ms" in r]
        rows.append(
            {
                "class": name,
                "sent": len(items),
                "answered_200": len(ok),
                "throughput_req_per_s": round(len(ok) / elapsed, 3),
                "ms_p50": _quantile(latencies, 0.5),
                "ms_p99": _quantile(latencies, 0.99),
                "budget_attainment": round(sum(r["ms"] <= budget_ms for r in ok) / len(items), 3),
                "mean_detail": round(statistics.mean(r["detail"] for r in ok), 3) if ok else None,
                "mean_padding": round(statistics.mean(r["padding"] for r in ok), 3) if ok else None,
                "upscaled": sum(r["upscaled"] for r in ok),
                "degraded_fraction": round(sum(r["degraded"] for r in ok) / len(ok), 3) if ok else None,
                "statuses": dict(Counter(str(r["status"]) for r in items)),
                "shapes": dict(Counter(r["shape"] for r in ok)),
            }
        )
    order = [c.name for c in CLASSES] + ["all"]
    return sorted(rows, key=lambda r: order.index(r["class"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Settings().repository)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--loads", default="0.5,1.5", help="offered rates as multiples of the baseline capacity"
    )
    parser.add_argument("--seconds", type=float, default=40, help="arrival window per (policy, load)")
    parser.add_argument(
        "--grace", type=float, default=20, help="longest wait for answers after the last arrival"
    )
    parser.add_argument("--budget-ms", type=float, default=3000, help="latency budget, sent as timeout_ms")
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)
    args = parser.parse_args()
    if BASELINE not in args.policies.split(","):
        sys.exit(
            f"--policies must include the baseline {BASELINE!r}: the offered rates are multiples of its capacity"
        )
    if not any(args.repository.glob("*/config.pbtxt")):
        sys.exit(f"{args.repository} holds no model entries: run `make export` (or pass --repository)")
    policies = tuple(args.policies.split(","))
    loads = tuple(float(x) for x in args.loads.split(","))
    machine = machine_info("bench.mixed")
    images = _jpegs()
    sequential: dict[str, dict[str, float]] = {}
    rows: list[dict] = []
    runs = [p for p in policies if p == BASELINE] + [p for p in policies if p != BASELINE]
    capacity = None
    for policy in runs:
        with vitserve(args.repository, {"routing_policy": policy}) as server:
            sequential[policy] = _sequential_ms(server, images)
            capacity = capacity or _capacity(sequential[BASELINE])
            print(
                f"{policy}: sequential ms {sequential[policy]}; capacity {capacity:.3f} req/s",
                file=sys.stderr,
            )
            for load in loads:
                arrivals = _arrivals(load * capacity, args.seconds, args.seed)
                print(f"{policy} at {load}x capacity: {len(arrivals)} requests", file=sys.stderr)
                results, elapsed = asyncio.run(
                    _open_loop(server.url, images, arrivals, args.budget_ms, args.grace)
                )
                rate = round(load * capacity, 3)
                rows += [
                    {"policy": policy, "load": load, "rate_req_per_s": rate, **row}
                    for row in _aggregate(results, elapsed, args.budget_ms)
                ]
    summary = {
        "baseline_capacity_req_per_s": round(capacity, 3),
        "sequential_ms_per_class": sequential,
        "all": {
            f"{r['policy']} {r['load']}x": {
                k: r[k]
                for k in ("budget_attainment", "mean_detail", "mean_padding", "upscaled", "degraded_fraction")
            }
            for r in rows
            if r["class"] == "all"
        },
    }
    settings = {
        "repository": str(args.repository),
        "classes": [{"name": c.name, "weight": c.weight, "sizes": c.sizes} for c in CLASSES],
        "policies": policies,
        "baseline": BASELINE,
        "loads": loads,
        "seconds": args.seconds,
        "grace": args.grace,
        "budget_ms": args.budget_ms,
        "seed": args.seed,
        "upscale_limit": UPSCALE_LIMIT,
    }
    csv_rows = [{**r, "statuses": json.dumps(r["statuses"]), "shapes": json.dumps(r["shapes"])} for r in rows]
    for path in write_results("mixed", machine, settings, csv_rows, summary, args.output_dir):
        print(f"wrote {path}", file=sys.stderr)
    _plot(rows, policies, loads, args.output_dir / "mixed.png")
    print(json.dumps(summary, indent=2))


def _plot(rows: list[dict], policies: tuple[str, ...], loads: tuple[float, ...], path: Path) -> None:
    from bench.plots import plt

    names = [c.name for c in CLASSES]
    metrics = (
        ("budget_attainment", "budget attainment"),
        ("ms_p99", "p99 ms"),
        ("mean_detail", "mean detail"),
    )
    fig, axes = plt.subplots(len(loads), len(metrics), figsize=(15, 3.6 * len(loads)), squeeze=False)
    width = 0.8 / len(policies)
    for i, load in enumerate(loads):
        for j, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            for k, policy in enumerate(policies):
                value = {r["class"]: r[key] for r in rows if r["policy"] == policy and r["load"] == load}
                xs = [n + (k - (len(policies) - 1) / 2) * width for n in range(len(names))]
                ax.bar(xs, [value.get(n) or 0 for n in names], width, label=policy)
            ax.set_xticks(range(len(names)), names, fontsize=7, rotation=20)
            ax.set_title(f"{label} at {load}x baseline capacity", fontsize=9)
            ax.legend(fontsize=7)
    title = " vs ".join(f"{p} routing" for p in policies)
    fig.suptitle(f"mixed-resolution open-loop traffic: {title} (one run)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
