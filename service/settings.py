"""One typed settings object for the whole service; every field reads a `VITSERVE_*` environment variable.

Command-line flags override the environment, which overrides these defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Gateway and pool configuration (env prefix VITSERVE_)."""

    model_config = SettingsConfigDict(env_prefix="VITSERVE_", extra="ignore")

    repository: Path = Field(PROJECT_ROOT / "model_repository", description="Model repository directory.")
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 picks a free port).")
    role: Literal["gateway", "pool"] = Field(
        "gateway", description="gateway: full API; pool: v2 tensors only."
    )
    routing: Path | None = Field(
        None, description="Routing/buckets YAML; defaults derive from the repository."
    )
    runtime: Literal["onnxruntime", "torch", "triton"] = Field("onnxruntime", description="Default runtime.")
    models: str = Field("", description="Comma-separated entries to serve (pool role); empty serves all.")
    intra_op_threads: int = Field(0, ge=0, description="Threads per inference session; 0 = all cores.")
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Largest accepted request body.")
    max_pixels: int = Field(64_000_000, gt=0, description="Largest accepted decoded image (width x height).")
    max_queue_size: int = Field(256, gt=0, description="Queued requests per (model, bucket) before 429.")
    max_queue_delay_ms: float | None = Field(
        None, ge=0, description="Batching delay; default from each entry's config.pbtxt."
    )
    max_batch_size: int | None = Field(None, gt=0, description="Batch cap; default from config.pbtxt.")
    max_batch_tokens: int = Field(200_000, gt=0, description="Token budget per batch for high resolutions.")
    request_timeout_ms: float = Field(30_000, gt=0, description="Default per-request deadline.")
    top_k: int = Field(5, ge=1, description="Default number of labels returned by /v1/classify.")
    drain_timeout_s: float = Field(30.0, ge=0, description="Longest wait for queued work on shutdown.")
    log_level: str = Field("warning", description="Log level (structured JSON logs on stderr).")

    def threads(self) -> int:
        return self.intra_op_threads or os.cpu_count() or 1
