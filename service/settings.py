"""One typed settings object for the whole service; every field reads a `VITSERVE_*` environment variable.

Command-line flags override the environment, which overrides these defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RuntimeKind = Literal["onnxruntime", "torch", "triton"]
SpinningPolicy = Literal["idle", "off", "run", "always"]
# What turns an optional directory setting off from the environment, where None cannot be written.
OFF = ("", "off", "none")


class Settings(BaseSettings):
    """Gateway and pool configuration (env prefix VITSERVE_)."""

    model_config = SettingsConfigDict(env_prefix="VITSERVE_", extra="ignore")

    repository: Path = Field(PROJECT_ROOT / "model_repository", description="Model repository directory.")
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 picks a free port).")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the KServe v2 gRPC service (GRPCInferenceService); 0 turns it off.",
    )
    role: Literal["gateway", "pool"] = Field(
        "gateway", description="gateway: full API; pool: v2 tensors only."
    )
    routing: Path | None = Field(
        None, description="Routing/buckets YAML; defaults derive from the repository."
    )
    routing_policy: Literal["cost", "square"] = Field(
        "cost",
        description="cost: most detail within the latency budget by calibrated cost and live queues; "
        "square: the former square-bucket policy (benchmark baseline).",
    )
    target_latency_ms: float = Field(
        1000.0, gt=0, description="Latency budget of requests without timeout_ms / X-Request-Timeout-Ms."
    )
    calibration: Path | None = Field(
        None,
        description="YAML {entry: {batch: seconds}} used instead of measuring those entries at start-up.",
    )
    calibration_out: Path | None = Field(
        None, description="Write the costs used at start-up to this YAML file."
    )
    calibration_mode: Literal["startup", "background"] = Field(
        "startup",
        description="startup: measure each local entry's cost before the server reports ready; "
        "background: ready at once on the calibration file or FLOP estimates, then measure each "
        "entry and re-plan its batch limit and the routes (what `make serve` uses).",
    )
    calibration_max_run_s: float = Field(
        0.25,
        gt=0,
        description="Start-up calibration stops doubling an entry's batch once one run takes this long.",
    )
    runtime: RuntimeKind = Field("onnxruntime", description="Default runtime.")
    runtimes: str = Field(
        "",
        description="Per-model runtime overriding `runtime`: ENTRY_OR_BACKBONE=KIND,... "
        "(e.g. 'vit_base=torch,swin_tiny_448=triton').",
    )
    triton_urls: str = Field(
        "",
        description="KServe v2 servers of each pool, backbone or entry on the triton runtime: KEY=ADDRESS,... "
        "An ADDRESS is grpc://HOST:PORT or http://HOST:PORT (the scheme picks the protocol), several "
        "joined by '|', dns+grpc://NAME:PORT / dns+http://NAME:PORT (every address of a headless "
        "Service), or file:///PATH (one URL per line); dns and file are re-read every endpoint_refresh_s.",
    )
    endpoint_concurrency: int = Field(
        4, ge=1, description="Batches in flight per pool endpoint (replica) from this gateway."
    )
    endpoint_refresh_s: float = Field(
        5.0, gt=0, description="Seconds between re-resolving dns+ and file:// pool addresses."
    )
    endpoint_eject_s: float = Field(
        5.0, ge=0, description="Seconds a pool endpoint that failed as unavailable gets no batches."
    )
    triton_timeout_ms: float | None = Field(
        None,
        gt=0,
        description="Timeout of one call to a pool, sent as the v2 timeout; default request_timeout_ms.",
    )
    triton_connect_timeout_ms: float = Field(
        1000, gt=0, description="Connect timeout to a pool, so a dead pool fails fast (503)."
    )
    triton_binary: bool = Field(
        True, description="HTTP pools: binary tensor extension; false sends JSON tensors (e.g. for MLServer)."
    )
    torch_device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch runtime device.")
    torch_precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="torch runtime CUDA autocast dtype; auto: fp16 on CUDA, fp32 on CPU."
    )
    torch_compile: Literal["off", "on", "cuda-graphs"] = Field(
        "off", description="torch.compile the torch runtime's models; cuda-graphs also captures CUDA graphs."
    )
    ort_spinning: SpinningPolicy = Field(
        "idle",
        description="ONNX Runtime intra-op threads: idle (spin only while a batch is all the work in "
        "flight), off (never spin), run (spin between operators only while a batch runs), always (also "
        "between batches, starving decoding under load).",
    )
    ort_share_weights: bool = Field(
        True,
        description="One unpacked copy of each backbone's weights for all its ONNX Runtime sessions "
        "(shapes), where ORT_PREPACKED_CACHE is off or cannot be used.",
    )
    ort_prepacked_cache: Path | None = Field(
        default_factory=lambda: user_cache_dir() / "prepacked",
        description="Directory for optimized ONNX Runtime models with their pre-packed weights, written "
        "once per artifact and CPU and mapped by every session: weights shared (by content, across shapes "
        "and processes, from the page cache) and pre-packed. Overrides ORT_SHARE_WEIGHTS; 'off' (or empty) "
        "turns it off; a directory that cannot be written falls back to ORT_SHARE_WEIGHTS with a warning.",
    )
    ort_cpu_arena: bool = Field(
        False, description="ONNX Runtime CPU memory arena per session (keeps each session's peak for good)."
    )
    ort_mem_pattern: bool = Field(
        False,
        description="ONNX Runtime memory pattern (one pre-planned block per run); off measured as fast at "
        "ViT 224, faster on Swin and lower at native 2048 (bench/results/mem-pattern.json).",
    )
    malloc_mmap_threshold_kib: int | None = Field(
        None,
        ge=4,
        le=32768,
        description="Fixed glibc mmap threshold: allocations from this size are unmapped when freed (lower "
        "peaks at native resolutions, slower mid-size shapes); unset: glibc's dynamic threshold.",
    )
    max_remote_batches: int = Field(
        64,
        ge=1,
        description="Ceiling on batches in flight per pool on the triton runtime, whatever the endpoints' "
        "budget (endpoint_concurrency x endpoints) allows.",
    )
    models: str = Field("", description="Comma-separated entries to serve (pool role); empty serves all.")
    intra_op_threads: int = Field(0, ge=0, description="Threads per inference session; 0 = all cores.")
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Largest accepted request body.")
    max_pixels: int = Field(64_000_000, gt=0, description="Largest accepted decoded image (width x height).")
    max_queue_size: int = Field(256, gt=0, description="Queued requests per (model, bucket) before 429.")
    max_queue_bytes: int = Field(
        1 << 30,
        gt=0,
        description="Bytes of preprocessed images a pool's admitted, unanswered requests may hold before "
        "429 (per pool; size the pod's memory limit from it).",
    )
    decode_threads: int = Field(
        0,
        ge=0,
        description="Image decode threads per pool, so large images cannot starve small ones; 0 = cores.",
    )
    max_queue_delay_ms: float | None = Field(
        None, ge=0, description="Batching delay; default from each entry's config.pbtxt."
    )
    max_batch_size: int | None = Field(None, gt=0, description="Batch cap; default from config.pbtxt.")
    max_batch_tokens: int = Field(200_000, gt=0, description="Token budget per batch for high resolutions.")
    request_timeout_ms: float = Field(30_000, gt=0, description="Default per-request deadline.")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Request headers not complete this long after a connection opens or a request "
        "starts get 408 and the connection is closed (slow clients cannot hold connections).",
    )
    top_k: int = Field(5, ge=1, description="Default number of labels returned by /v1/classify.")
    max_explain_queue: int = Field(
        4, ge=1, description="/v1/explain requests waiting for the explain thread before 429."
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="Longest wait for queued work on shutdown.")
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        description="After SIGTERM, keep serving this long (readiness 503, every response with "
        "Connection: close) before closing, so load balancers move the traffic elsewhere first.",
    )
    poll_s: float = Field(
        0.0,
        ge=0,
        description="Seconds between repository scans that load new versions and entries and unload "
        "removed ones; 0 = off (the repository API, /v2/repository, still loads and unloads).",
    )
    log_level: str = Field("warning", description="Log level (structured JSON logs on stderr).")

    def threads(self) -> int:
        return self.intra_op_threads or os.cpu_count() or 1

    def decoders(self) -> int:
        return self.decode_threads or os.cpu_count() or 1

    @field_validator("ort_prepacked_cache", mode="before")
    @classmethod
    def _off_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in OFF else value

    @field_validator("runtimes", "triton_urls")
    @classmethod
    def _check_mapping(cls, value: str, info: ValidationInfo) -> str:
        mapping = parse_mapping(value, info.field_name)
        if info.field_name == "runtimes":
            kinds = get_args(RuntimeKind)
            unknown = {kind for kind in mapping.values() if kind not in kinds}
            if unknown:
                raise ValueError(f"runtimes names {sorted(unknown)}; choose from {', '.join(kinds)}")
        return value

    def runtime_for(self, *names: str) -> str:
        """The runtime of the first of `names` (entry, then backbone) listed in `runtimes`, else `runtime`."""
        return _first(parse_mapping(self.runtimes, "runtimes"), names) or self.runtime

    def triton_url_for(self, *names: str) -> str | None:
        """The pool URL of the first of `names` (entry, backbone, pool) listed in `triton_urls`."""
        return _first(parse_mapping(self.triton_urls, "triton_urls"), names)


def user_cache_dir() -> Path:
    """vitserve's per-user cache: $XDG_CACHE_HOME/vitserve, else ~/.cache/vitserve (outside any repository)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitserve"


def parse_mapping(text: str, field: str) -> dict[str, str]:
    """'a=1,b=2' -> {'a': '1', 'b': '2'}; ValueError naming the field for a malformed item."""
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(
                f"{field}: {item!r} is not NAME=VALUE; write e.g. 'global=http://127.0.0.1:8001'"
            )
        mapping[key] = value
    return mapping


def _first(mapping: dict[str, str], names: tuple[str, ...]) -> str | None:
    return next((mapping[name] for name in names if name in mapping), None)
