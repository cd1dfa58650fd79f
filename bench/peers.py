"""vitserve against peer serving frameworks on the same ONNX file, same image, same load, one run.

Peers (each in its own virtual environment under .venv-peers/, made by `make bench-peers` with
pinned versions from PyPI; servers in bench/peer_servers/): LitServe with its batching, BentoML
with a batchable API, Ray Serve with `@serve.batch`. Each decodes the upload with Pillow, resizes
to 224, normalizes and runs ONNX Runtime on the very artifact vitserve serves (the global 224
entry of bench.serving's repository), batches of at most 8 with a 2 ms wait. vitserve serves the
same request at /v1/classify with its defaults.

Every server gets the identical multipart request (field `image`, a 224x224 JPEG photo), at
concurrency 1 and then 16 with `hey` for `--seconds` each, one server running at a time. `--rounds`
rounds start and measure every server in turn, each round opening with raw in-process ONNX Runtime
at batch 1 on the same artifact: this VM's speed drifts by 10% or more within minutes, which a single
pass would book against whichever server ran in a slow minute. Headline per server and load: the
median over rounds. The servers are not kept up side by side, because idle ones take CPU from the
one measured: 20 s with all four up cost LitServe's workers about 15% of a core, Ray's 10% and
vitserve's 5% (`ps` CPU times), which favours whichever polls busiest.

    make bench-peers          # builds the three environments, then runs this
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import numpy as np

from bench.http import PROJECT_ROOT, Server, answers_200, free_port, hey, vitserve
from bench.machine import cores, machine_info
from bench.results import add_output_arguments, write_results
from bench.serving import RAW_POLICY, global_entry, photo_jpeg, raw_rate
from service.runtimes.ort import OnnxRuntime

PEERS_DIR = PROJECT_ROOT / ".venv-peers"
LOADS = (1, 16)
RAW = "raw onnxruntime, batch 1"
BOUNDARY = "vitserve-bench-boundary"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
STARTUP_TIMEOUT_S = 300


@dataclass(frozen=True)
class Peer:
    name: str
    package: str
    path: str
    command: tuple[str, ...]

    @property
    def python(self) -> Path:
        return PEERS_DIR / self.name / "bin" / "python"


PEERS = (
    Peer("litserve", "litserve", "/predict", ("-m", "bench.peer_servers.litserve_app")),
    Peer(
        "bentoml",
        "bentoml",
        "/classify",
        ("-m", "bentoml", "serve", "bench.peer_servers.bentoml_service:Classifier", "--host", "127.0.0.1"),
    ),
    Peer("ray", "ray", "/classify", ("-m", "bench.peer_servers.ray_app")),
)


def multipart(image: bytes) -> bytes:
    """One multipart/form-data body with the file field `image`, as every server receives it."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + image + f"\r\n--{BOUNDARY}--\r\n".encode()


@contextmanager
def peer_server(peer: Peer, onnx: Path, body: bytes, log: Path) -> Iterator[Server]:
    """Start `peer` in its environment and wait until it answers the benchmark request with 200."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "PEER_ONNX": str(onnx),
        "PEER_PORT": str(port),
        "PEER_THREADS": str(cores()),
        "PEER_MAX_BATCH": "8",
        "PEER_MAX_DELAY_MS": "2",
    }
    command = [str(peer.python), *peer.command]
    if peer.name == "bentoml":
        command += ["--port", str(port)]
    with log.open("wb") as handle:
        # Run from the log's folder: LitServe writes a sample client.py into its working directory.
        process = subprocess.Popen(
            command,
            env=env,
            cwd=log.parent,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not answers_200(port, "POST", peer.path, body, MULTIPART, timeout=30):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{peer.name} did not come up (exit {process.poll()}):\n{log.read_text()[-3000:]}"
                )
            time.sleep(1)
        yield Server(port, process)
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def _version(peer: Peer) -> str:
    out = subprocess.run(
        [str(peer.python), "-c", f"import importlib.metadata as m; print(m.version('{peer.package}'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def _load(name: str, url: str, body_file: Path, seconds: float) -> list[dict]:
    hey(url, body_file, 4, 3, MULTIPART["Content-Type"])
    return [{"server": name, **hey(url, body_file, c, seconds, MULTIPART["Content-Type"])} for c in LOADS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="duration of each hey run")
    parser.add_argument("--repository", type=Path, help="reuse bench.serving's exported repository")
    parser.add_argument("--peers", default=",".join(p.name for p in PEERS))
    parser.add_argument("--rounds", type=int, default=3, help="rounds visiting every server in turn")
    add_output_arguments(parser)
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("hey is not installed: apt-get install hey")
    peers = [p for p in PEERS if p.name in args.peers.split(",")]
    missing = [p.name for p in peers if not p.python.exists()]
    if missing:
        sys.exit(f"no environment for {missing} under {PEERS_DIR}: run `make bench-peers`")
    machine = machine_info("bench.peers")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repository = args.repository or root / "repository"
        entry = global_entry(repository, reuse=args.repository is not None)
        body = multipart(photo_jpeg(224))
        body_file = root / "body"
        body_file.write_bytes(body)
        # name -> (start the server, its path); each one is started anew in every round
        servers = {"vitserve": (lambda: vitserve(repository), "/v1/classify")} | {
            peer.name: (
                lambda peer=peer: peer_server(peer, entry.artifact, body, root / f"{peer.name}.log"),
                peer.path,
            )
            for peer in peers
        }
        runtime = OnnxRuntime(entry, cores(), RAW_POLICY)
        pixels = np.zeros((1, *entry.input_shape), np.float32)
        rows = []
        for round_index in range(args.rounds):
            raw = raw_rate(lambda: runtime.run(pixels), 1, args.seconds / 2)
            rows.append({"server": RAW, "round": round_index, "concurrency": 1, "img_per_s": round(raw, 2)})
            for name, (start, path) in servers.items():
                print(f"round {round_index + 1}: {name}", file=sys.stderr)
                with start() as server:
                    loads = _load(name, f"{server.url}{path}", body_file, args.seconds)
                rows += [{**row, "round": round_index} for row in loads]
    versions = {p.name: _version(p) for p in peers}
    summary = {
        f"{server} c{load}": {
            key: round(median(r[key] for r in cells), 2) for key in ("img_per_s", "ms_p50") if key in cells[0]
        }
        for (server, load), cells in _cells(rows).items()
    }
    settings = {
        "model": entry.arch,
        "bucket": 224,
        "loads": LOADS,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "peer_versions": versions,
        "peer_batching": {"max_batch_size": 8, "max_delay_ms": 2},
        "image": "skimage astronaut 224x224 JPEG, multipart field `image`",
    }
    for path in write_results("peers", machine, settings, rows, summary, args.output_dir):
        print(f"wrote {path}", file=sys.stderr)
    _plot(rows, args.output_dir / "peers.png")
    print(summary)


def _cells(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """Rows of every (server, concurrency), rounds in order."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["server"], row["concurrency"]), []).append(row)
    return cells


def _plot(rows: list[dict], path: Path) -> None:
    from bench.plots import label_bar, plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    cells = _cells(rows)
    servers = list(dict.fromkeys(r["server"] for r in rows if r["server"] != RAW))
    raw = median(r["img_per_s"] for r in cells[RAW, 1])
    width = 0.8 / len(LOADS)
    for index, load in enumerate(LOADS):
        values = [median(r["img_per_s"] for r in cells[s, load]) for s in servers]
        xs = [n + (index - (len(LOADS) - 1) / 2) * width for n in range(len(servers))]
        bars = ax.bar(xs, values, width, label=f"concurrency {load}")
        for bar, value in zip(bars, values, strict=True):
            label_bar(ax, bar, f"{value:.0f}", fontsize=10)
    ax.set_xticks(range(len(servers)), servers)
    ax.axhline(
        raw,
        color="tab:gray",
        linestyle="--",
        linewidth=1,
        label=f"raw batch 1, vitserve's runtime class ({raw:.1f})",
    )
    ax.set_ylabel("images / s (median of rounds)")
    ax.set_title("same ONNX file, same image and load: vitserve vs peers (one run, rounds)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
