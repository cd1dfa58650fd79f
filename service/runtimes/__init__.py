"""Runtimes execute one batch of one repository entry; nothing upstream knows which one runs.

Every runtime reads the same model repository entry and returns outputs keyed by role
("logits", "embedding"), whatever the artifact's own output names are.

Selection, per entry (settings, env VITSERVE_*):
  RUNTIME         default for every entry: onnxruntime (embedded), torch or triton
  RUNTIMES        overrides by entry or backbone name, e.g. "vit_base=torch,swin_tiny=triton"
  TRITON_URLS     the KServe v2 servers of each triton entry, by entry, backbone or pool name
                  (first match in that order), e.g. "global=dns+grpc://pool-g:8001,windowed=http://p:8000";
                  addresses and balancing: see endpoints
  ENDPOINT_CONCURRENCY, ENDPOINT_REFRESH_S, ENDPOINT_EJECT_S      see endpoints
  TRITON_TIMEOUT_MS, TRITON_CONNECT_TIMEOUT_MS, TRITON_BINARY    see triton_runtime
  TORCH_DEVICE, TORCH_PRECISION, TORCH_COMPILE                   see torch_runtime
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, get_args

import numpy as np

from export.repository import ModelEntry
from service.settings import RuntimeKind, Settings

if TYPE_CHECKING:
    from service.runtimes.endpoints import EndpointRegistry

RUNTIMES = get_args(RuntimeKind)


class Runtime(Protocol):
    """Blocking batch execution; called from a worker thread, never from the event loop."""

    entry: ModelEntry

    def run(self, batch: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
        """(B, 3, H, W) float32 -> {"logits": (B, C), "embedding": (B, D)}.

        `deadline` (time.monotonic()) is the batch's latest request deadline (None when a row has
        none), so one short budget never fails co-batched long ones: remote runtimes send it as the
        protocol's timeout; local ones cannot stop a started batch and ignore it.
        """
        ...

    def describe(self) -> str:
        """Runtime and device in a few words, for /v1/models."""
        ...


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot execute now (e.g. a remote pool is down); the gateway answers 503."""


def load_runtime(
    kind: str,
    entry: ModelEntry,
    threads: int,
    settings: Settings | None = None,
    pool: str = "",
    endpoints: EndpointRegistry | None = None,
    demand: Callable[[], int] | None = None,
) -> Runtime:
    """Instantiate and warm up the runtime `kind` for `entry`.

    torch reads its VITSERVE_TORCH_* options from `settings`; triton finds its address in
    `settings.triton_urls` under the entry's name, its backbone or its `pool`, in that order, and
    shares the endpoints of that address with the pool's other entries through `endpoints`;
    onnxruntime's "idle" spinning policy reads the requests in flight from `demand` (see ort).
    """
    settings = settings or Settings()
    if kind == "onnxruntime":
        from service.runtimes.ort import OnnxRuntime
        from service.runtimes.ort_prepacked import PrepackedCache

        return OnnxRuntime(
            entry,
            threads,
            spinning=settings.ort_spinning,
            share_weights=settings.ort_share_weights,
            prepacked=PrepackedCache(settings.ort_prepacked_cache) if settings.ort_prepacked_cache else None,
            cpu_arena=settings.ort_cpu_arena,
            mem_pattern=settings.ort_mem_pattern,
            demand=demand,
        )
    if kind == "torch":
        from service.runtimes.torch_runtime import TorchOptions, TorchRuntime

        options = TorchOptions(settings.torch_device, settings.torch_precision, settings.torch_compile)
        return TorchRuntime(entry, threads, options)
    if kind == "triton":
        from service.runtimes.endpoints import EndpointRegistry
        from service.runtimes.triton_runtime import TritonRuntime, TritonTarget

        url = settings.triton_url_for(entry.name, entry.backbone, pool)
        if url is None:
            raise ValueError(
                f"{entry.name} runs on the triton runtime but VITSERVE_TRITON_URLS has no URL for it, its "
                f"backbone {entry.backbone} or its pool {pool or '(none)'}; "
                f"add e.g. '{entry.backbone}=grpc://HOST:8001'"
            )
        target = TritonTarget(
            url,
            pool,
            timeout_s=(settings.triton_timeout_ms or settings.request_timeout_ms) / 1000,
            connect_timeout_s=settings.triton_connect_timeout_ms / 1000,
            binary=settings.triton_binary,
        )
        endpoints = endpoints or EndpointRegistry(
            settings.endpoint_concurrency, settings.endpoint_refresh_s, settings.endpoint_eject_s
        )
        return TritonRuntime(entry, target, endpoints.get(url, pool))
    raise ValueError(f"unknown runtime {kind!r}; choose one of {', '.join(RUNTIMES)}")
