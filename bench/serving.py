"""HTTP serving against raw in-process ONNX Runtime on the same artifact, in one run (issue 8's budgets).

Baseline: the served runtime itself (`service.runtimes.ort.OnnxRuntime`) on the gateway's global
224 entry, fed preprocessed tensors, at batch 1, 4, 8, 16 and 32 with ONNX Runtime's default
spinning ("always", the fastest raw path): its best img/s, and its batch-1 latency.

Served: one `vitserve serve` process per ONNX Runtime spinning policy (`VITSERVE_ORT_SPINNING`
idle / off / run / always) and weights setting (below), answering POST /v1/classify with a 224x224 JPEG photo forced to the global
pool at 224, every request decoded, routed, preprocessed, batched and post-processed:

- concurrency 1: a sequential client (one keep-alive connection, one request at a time, see
  `bench.http`) timed in rounds interleaved with the raw cells, so both see the same machine load;
  headline p50 = median of the quietest round, as in every latency benchmark here (`bench.timing`).
- concurrency 16 and 64: `hey` for `--load-seconds` per point (it shares the cores with the server,
  so these figures include the load generator's own cost), in `--load-rounds` rounds. Each hey run
  directly follows a raw run at the best batch for `--raw-seconds`, and its ratio is taken against
  that raw rate: on a shared VM the machine's speed drifts by 20% or more within minutes, which
  comparing runs minutes apart would book against whichever configuration ran in a slow minute.
  Headline ratio per configuration = median over rounds.

Weights (`--weights`): "mapped" (the service's default) maps pre-packed weights from a cache
(`VITSERVE_ORT_PREPACKED_CACHE`, `--prepacked-cache`, default a temporary directory); "shared"
turns the cache off and shares one unpacked copy of the weights across sessions (ORT_SHARE_WEIGHTS). Every
configuration is a spinning policy with one weights setting, all served at once and timed in the
same interleaved rounds, and each has its raw baseline on the same weights: raw cells run per
weights setting, and a configuration's c1 overhead and c16/c64 ratios are taken against the raw
runtime with its weights.

    .venv/bin/python -m bench.serving            # needs `hey` (apt-get install hey)
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from statistics import median
from typing import get_args

import httpx
import numpy as np
from PIL import Image

from bench.backends import export_entry, random_batch
from bench.http import SequentialClient, hey, vitserve
from bench.machine import machine_info
from bench.results import write_results
from bench.timing import TimingPlan, add_run_arguments, noise, time_cells
from export.repository import ModelEntry, read_repository
from service.runtimes.ort import OnnxRuntime
from service.runtimes.ort_prepacked import PrepackedCache
from service.settings import Settings, SpinningPolicy

# The default repository's global backbone (Makefile GLOBAL_MODEL): the artifact users serve at 224.
GLOBAL_MODEL = "vit_small_patch16_224"
WINDOWED_MODEL = "swin_tiny_patch4_window7_224"
BATCHES = (1, 4, 8, 16, 32)
LOADS = (16, 64)
POLICIES = get_args(SpinningPolicy)
RAW_POLICY = "always"
WEIGHTS = ("shared", "mapped")
DEFAULT_POLICY = Settings.model_fields["ort_spinning"].default


def photo_jpeg(size: int) -> bytes:
    """A real photograph (scikit-image's astronaut) as a size x size JPEG, like a client would send."""
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BILINEAR).save(buffer, "JPEG")
    return buffer.getvalue()


def global_entry(root: Path, reuse: bool) -> ModelEntry:
    """The global 224 entry of the gateway's repository at `root`, exported there unless `reuse`.

    The repository holds the global backbone at 224 and a windowed backbone at 448 (never hit here).
    """
    if not reuse:
        export_entry(GLOBAL_MODEL, root, 224)
        export_entry(WINDOWED_MODEL, root, 448)
    found = [e for e in read_repository(root) if e.arch == GLOBAL_MODEL and e.bucket == 224]
    if len(found) != 1:
        raise SystemExit(f"{root} holds {len(found)} {GLOBAL_MODEL} entries at 224, expected one")
    return found[0]


def prepare(root: Path, repository: Path | None) -> tuple[Path, ModelEntry, Path]:
    """The repository (`repository`, else exported under `root`), its global 224 entry, and the
    224x224 JPEG photo every request sends, written under `root`."""
    reuse = repository is not None
    repository = repository or root / "repository"
    entry = global_entry(repository, reuse=reuse)
    body = root / "photo.jpg"
    body.write_bytes(photo_jpeg(224))
    return repository, entry, body


def raw_rate(run, batch: int, seconds: float) -> float:
    """Images per second of back-to-back `run()` calls of `batch` images for `seconds`."""
    run()
    start = time.perf_counter()
    calls = 0
    while (elapsed := time.perf_counter() - start) < seconds:
        run()
        calls += 1
    return calls * batch / elapsed


def _raw_runner(runtime: OnnxRuntime, batch: int):
    pixels = np.ascontiguousarray(random_batch(batch, 224))
    return lambda: runtime.run(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, rounds=4, seconds=8.0, name="serving")
    parser.add_argument("--load-seconds", type=float, default=10, help="duration of each hey run")
    parser.add_argument(
        "--load-rounds", type=int, default=3, help="rounds of hey runs per configuration and load"
    )
    parser.add_argument("--raw-seconds", type=float, default=4, help="raw run before each hey run")
    parser.add_argument("--policies", default=",".join(POLICIES), help="spinning policies served")
    parser.add_argument(
        "--repository", type=Path, help="reuse a repository an earlier run exported (default: export one)"
    )
    parser.add_argument(
        "--weights",
        default="mapped",
        help=f"weights settings served: {','.join(WEIGHTS)} (default: the service's)",
    )
    parser.add_argument(
        "--prepacked-cache", type=Path, help="the mapped weights' cache (default: a temporary directory)"
    )
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("hey is not installed: apt-get install hey")
    weights = args.weights.split(",")
    if unknown := set(weights) - set(WEIGHTS):
        sys.exit(f"unknown --weights {sorted(unknown)}: choose from {','.join(WEIGHTS)}")
    configs = {
        f"{policy}-{w}": {"ort_spinning": policy, "weights": w}
        for w in weights
        for policy in args.policies.split(",")
    }
    machine = machine_info("bench.serving")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repository, entry, body = prepare(root, args.repository)
        cache_dir = args.prepacked_cache or root / "prepacked"
        server_weights = {
            "shared": {"ort_prepacked_cache": "off"},
            "mapped": {"ort_prepacked_cache": cache_dir},
        }
        raws = {
            w: OnnxRuntime(
                entry,
                args.threads,
                RAW_POLICY,
                prepacked=PrepackedCache(cache_dir) if w == "mapped" else None,
            )
            for w in weights
        }
        cells = {("raw", w, b): _raw_runner(raw, b) for w, raw in raws.items() for b in BATCHES}
        path = f"/v1/classify?route=global&bucket={entry.bucket}"
        settings = {"intra_op_threads": args.threads}
        with ExitStack() as stack:
            servers = {
                name: stack.enter_context(
                    vitserve(
                        repository,
                        {
                            **settings,
                            "ort_spinning": values["ort_spinning"],
                            **server_weights[values["weights"]],
                        },
                    )
                )
                for name, values in configs.items()
            }
            batch_limits = {name: _batch_limit(server, entry.name) for name, server in servers.items()}
            clients = {
                name: SequentialClient(server, path, body.read_bytes()) for name, server in servers.items()
            }
            cells.update({("http", name, 1): client for name, client in clients.items()})
            timings = time_cells(cells, TimingPlan(rounds=args.rounds, seconds=args.seconds))
            for client in clients.values():
                client.close()
            best = {
                w: max(BATCHES, key=lambda b, w=w: timings["raw", w, b].summary(b)["img_per_s"])
                for w in weights
            }
            loads = []
            for load_round in range(args.load_rounds):
                for name, server in servers.items():
                    w = configs[name]["weights"]
                    for c in LOADS:
                        raw_img_per_s = raw_rate(cells["raw", w, best[w]], best[w], args.raw_seconds)
                        loaded = hey(server.url + path, body, c, args.load_seconds)
                        loads.append(
                            {"path": "http", "config": name, "round": load_round, **loaded}
                            | {"raw_batch": best[w], "raw_img_per_s": round(raw_img_per_s, 2)}
                            | {"over_raw": round(loaded["img_per_s"] / raw_img_per_s, 3)}
                        )
    rows = [
        {"path": kind, "config": config, "batch": batch, **timings[kind, config, batch].summary(batch)}
        for kind, config, batch in cells
    ] + loads
    summary = _summary(rows, configs)
    for name, limit in batch_limits.items():
        summary["configs"][name]["batch_limit"] = limit
    run_settings = {
        "model": GLOBAL_MODEL,
        "bucket": 224,
        "batches": BATCHES,
        "loads": LOADS,
        "configs": configs,
        "default_policy": DEFAULT_POLICY,
        "raw_policy": RAW_POLICY,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "load_seconds": args.load_seconds,
        "load_rounds": args.load_rounds,
        "raw_seconds": args.raw_seconds,
        "threads": args.threads,
        "weights": weights,
        "image": "skimage astronaut resized to 224x224 JPEG, forced to route=global&bucket=224",
    }
    for written in write_results(args.name, machine, run_settings, rows, summary, args.output_dir):
        print(f"wrote {written}", file=sys.stderr)
    _plot(rows, configs, args.output_dir / f"{args.name}.png")
    print(summary)


def _batch_limit(server, entry: str) -> int:
    """The batch limit start-up calibration gave `entry` (GET /v1/models): it drives c16 and c64."""
    models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["models"]
    return next(m["max_batch_size"] for m in models if m["name"] == entry)


def _raw(rows: list[dict], weights: str) -> list[dict]:
    return [r for r in rows if r["path"] == "raw" and r["config"] == weights]


def _alone(rows: list[dict], config: str) -> dict:
    return next(r for r in rows if r["path"] == "http" and r["config"] == config and r.get("batch") == 1)


def _summary(rows: list[dict], configs: dict[str, dict]) -> dict:
    raw = {}
    for w in dict.fromkeys(values["weights"] for values in configs.values()):
        cells = _raw(rows, w)
        best = max(cells, key=lambda r: r["img_per_s"])
        single = next(r for r in cells if r["batch"] == 1)
        raw[w] = {
            "best": {"batch": best["batch"], "img_per_s": best["img_per_s"]},
            "batch1_ms_p50": single["ms_p50"],
        }
    per_config = {}
    for config, values in configs.items():
        alone = _alone(rows, config)
        loaded = {c: _loaded(rows, config, c) for c in LOADS}
        per_config[config] = {
            "concurrency1_ms_p50": alone["ms_p50"],
            "concurrency1_overhead_ms": round(alone["ms_p50"] - raw[values["weights"]]["batch1_ms_p50"], 2),
            **{f"c{c}_img_per_s": round(median(r["img_per_s"] for r in loaded[c]), 2) for c in LOADS},
            **{f"c{c}_over_raw_best": round(median(r["over_raw"] for r in loaded[c]), 3) for c in LOADS},
        }
    return {
        "raw": raw,
        "configs": per_config,
        "default_policy": DEFAULT_POLICY,
        "noise": noise([r for r in rows if "round_spread" in r]),
        "budgets": {"throughput_over_raw_best": 0.9, "concurrency1_overhead_ms": 2.0},
    }


def _loaded(rows: list[dict], config: str, concurrency: int) -> list[dict]:
    return [r for r in rows if r.get("config") == config and r.get("concurrency") == concurrency]


def _plot(rows: list[dict], configs: dict[str, dict], path: Path) -> None:
    """Left: c16/c64 over raw per configuration; right: c1 p50 against raw batch 1 on its weights."""
    from bench.plots import label_bar, plt

    fig, (throughput, latency) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels, values, colors = [], [], []
    for index, config in enumerate(configs):
        for c in LOADS:
            labels.append(f"c{c}\n{config}")
            values.append(median(r["over_raw"] for r in _loaded(rows, config, c)))
            colors.append(f"C{index}")
    bars = throughput.bar(range(len(values)), values, color=colors)
    for bar, value in zip(bars, values, strict=True):
        label_bar(throughput, bar, f"{value:.2f}", fontsize=7)
    throughput.axhline(0.9, color="tab:red", linestyle="--", linewidth=1, label="budget 0.9")
    throughput.set_xticks(range(len(values)), labels, fontsize=7)
    throughput.set_ylabel("HTTP img/s / raw best batch img/s just before (median of rounds)")
    throughput.legend(fontsize=8)
    weights = list(dict.fromkeys(v["weights"] for v in configs.values()))
    singles = {w: next(r["ms_p50"] for r in _raw(rows, w) if r["batch"] == 1) for w in weights}
    names = [*(f"raw batch 1\n{w}" for w in weights), *(f"HTTP c1\n{c}" for c in configs)]
    alone = [*singles.values(), *(_alone(rows, c)["ms_p50"] for c in configs)]
    colors = ["tab:gray"] * len(weights) + [f"C{i}" for i in range(len(configs))]
    bars = latency.bar(range(len(alone)), alone, color=colors)
    for bar, value in zip(bars, alone, strict=True):
        label_bar(latency, bar, f"{value:.1f}")
    for (w, single), style in zip(singles.items(), ("--", ":"), strict=False):
        latency.axhline(single + 2, color="tab:red", linestyle=style, linewidth=1, label=f"raw {w} + 2 ms")
    latency.set_xticks(range(len(alone)), names, fontsize=8)
    latency.set_ylabel("ms p50 (quietest round)")
    latency.legend(fontsize=8)
    fig.suptitle(
        f"{GLOBAL_MODEL} at 224: HTTP /v1/classify vs raw ONNX Runtime, by spinning policy and weights (one run)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
