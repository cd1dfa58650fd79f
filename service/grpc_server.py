"""KServe v2 over gRPC (`GRPCInferenceService`, Triton's protocol), served on `grpc_port` in both roles.

The servicer is tritonclient's own generated one, so `tritonclient.grpc` (and the gateway's triton
runtime) talks to vitserve as to Triton. It runs on the HTTP server's event loop (started and stopped
by `service.server`) and serves the same `ServingState`: ServerLive, ServerReady, ServerMetadata,
ModelReady, ModelMetadata, ModelConfig (the entry's config.pbtxt) and ModelInfer go through the
operations HTTP uses (`service.v2_core`, `service.v2_tensors` via `service.grpc_tensors`), so
requests are checked, admitted, batched with /v1 traffic, deadlined and drained identically;
RepositoryIndex, RepositoryModelLoad and RepositoryModelUnload call the same `service.lifecycle` as
/v2/repository. Other RPCs (statistics, shared memory, trace, log, streaming) answer UNIMPLEMENTED.

Deadline of an infer: the server's `request_timeout_ms`, shortened by the call's gRPC deadline and by
the v2 `timeout` parameter (microseconds, which tritonclient's `timeout=` sends). A call the client
cancels, or whose gRPC deadline passes, withdraws its queued rows.

Errors: the HTTP status the same failure gets (`service.errors.to_api_error`) maps to a gRPC code
(`GRPC_CODES`); the details are the HTTP error's message, and the trailing metadata carry
`vitserve-code` (the stable error code) and `retry-after` for 429. 413 never arises from a handler:
a message over `max_body_bytes` is refused by gRPC itself with RESOURCE_EXHAUSTED, the code 413 maps
to. Every call is counted in `requests_total` / `request_duration_seconds` under the `grpc_*`
endpoint labels with the HTTP status it corresponds to (200, 400, ..., 499 for a cancelled call).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc.service_pb2_grpc import (
    GRPCInferenceServiceServicer,
    add_GRPCInferenceServiceServicer_to_server,
)

from export.triton_config import parse_text
from service import v2_core
from service.accounting import RequestRecord, record_response
from service.api_repository import refuse_overrides
from service.dependencies import require_ready
from service.errors import CLIENT_CLOSED_REQUEST, to_api_error
from service.grpc_tensors import model_infer_response, parse_model_infer
from service.lifecycle import ModelLifecycle
from service.settings import Settings
from service.state import ServingState

log = logging.getLogger("vitserve.grpc")
T = TypeVar("T")
Code = grpc.StatusCode
GRPC_CODES = {
    400: Code.INVALID_ARGUMENT,
    404: Code.NOT_FOUND,
    408: Code.DEADLINE_EXCEEDED,
    413: Code.RESOURCE_EXHAUSTED,
    422: Code.INVALID_ARGUMENT,
    429: Code.RESOURCE_EXHAUSTED,
    CLIENT_CLOSED_REQUEST: Code.CANCELLED,
    501: Code.UNIMPLEMENTED,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}
# Client keepalive pings are welcome (the gateway's triton runtime sends one every 10 s while calls
# are in flight) and never answered with GOAWAY "too_many_pings"; the server pings idle clients too,
# so connections to vanished clients close.
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
)


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel options of the server: keepalive, and messages up to the HTTP body limit."""
    return [
        *KEEPALIVE_OPTIONS,
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),
    ]


class InferenceService(GRPCInferenceServiceServicer):
    """`GRPCInferenceService` on one `ServingState`."""

    def __init__(self, state: ServingState, version: str) -> None:
        self.state = state
        self.version = version

    async def _answer(
        self,
        endpoint: str,
        context: grpc.aio.ServicerContext,
        handle: Callable[[RequestRecord], Awaitable[T]],
    ) -> T:
        """Run `handle`, count it under `endpoint`, and turn a failure into its gRPC status."""
        metrics = self.state.metrics
        record = RequestRecord()
        status = 200
        metrics.inflight.inc()
        try:
            return await handle(record)
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST
            raise
        except Exception as exc:
            error = to_api_error(exc)
            status = error.status
        finally:
            metrics.inflight.dec()
            record_response(metrics, endpoint, record, status)
        trailing = (("vitserve-code", error.code), *((k.lower(), v) for k, v in error.headers.items()))
        await context.abort(GRPC_CODES.get(status, Code.INTERNAL), error.message, trailing_metadata=trailing)

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        budget = self.state.settings.request_timeout_ms / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        return time.monotonic() + budget

    async def ServerLive(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        async def handle(record: RequestRecord) -> Message:
            return pb.ServerLiveResponse(live=True)

        return await self._answer("grpc_live", context, handle)

    async def ServerReady(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        async def handle(record: RequestRecord) -> Message:
            return pb.ServerReadyResponse(ready=self.state.probe_ready)

        return await self._answer("grpc_ready", context, handle)

    async def ServerMetadata(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        async def handle(record: RequestRecord) -> Message:
            return pb.ServerMetadataResponse(
                name=v2_core.SERVER_NAME, version=self.version, extensions=v2_core.EXTENSIONS
            )

        return await self._answer("grpc_metadata", context, handle)

    async def ModelReady(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        async def handle(record: RequestRecord) -> Message:
            entry = v2_core.served_entry(self.state, request.name, request.version)
            return pb.ModelReadyResponse(ready=v2_core.model_ready(self.state, entry))

        return await self._answer("grpc_model_ready", context, handle)

    async def ModelMetadata(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        async def handle(record: RequestRecord) -> Message:
            metadata = v2_core.model_metadata(v2_core.served_entry(self.state, request.name, request.version))
            return pb.ModelMetadataResponse(**metadata.model_dump())

        return await self._answer("grpc_model_metadata", context, handle)

    async def ModelConfig(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        async def handle(record: RequestRecord) -> Message:
            entry = v2_core.served_entry(self.state, request.name, request.version)
            return pb.ModelConfigResponse(config=parse_text((entry.path / "config.pbtxt").read_text()))

        return await self._answer("grpc_model_config", context, handle)

    async def ModelInfer(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        """Check the request on the pool's worker threads, admit all rows at once, batch them."""

        async def handle(record: RequestRecord) -> Message:
            state = require_ready(self.state)
            entry = v2_core.served_entry(state, request.model_name, request.model_version)
            pool = state.pool_of(entry)
            record.route, record.model = pool, entry.backbone
            deadline = self._deadline(context)
            parsed = await state.decode(
                pool, parse_model_infer, request, entry, v2_core.max_request_rows(state, entry)
            )
            outputs = await v2_core.run_infer(state, entry, parsed, deadline)
            return model_infer_response(entry, parsed, outputs)

        return await self._answer("grpc_infer", context, handle)

    async def RepositoryIndex(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        async def handle(record: RequestRecord) -> Message:
            rows = require_ready(self.state).lifecycle.index(ready_only=request.ready)
            return pb.RepositoryIndexResponse(models=rows)

        return await self._answer("grpc_repository_index", context, handle)

    async def RepositoryModelLoad(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        return await self._change_repository(
            "grpc_load_model", request, context, ModelLifecycle.load, pb.RepositoryModelLoadResponse
        )

    async def RepositoryModelUnload(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        return await self._change_repository(
            "grpc_unload_model", request, context, ModelLifecycle.unload, pb.RepositoryModelUnloadResponse
        )

    async def _change_repository(
        self,
        endpoint: str,
        request: Message,
        context: grpc.aio.ServicerContext,
        change: Callable[[ModelLifecycle, str], Awaitable[object]],
        response: Callable[[], Message],
    ) -> Message:
        """Load or unload `request.model_name` as /v2/repository does (no parameter overrides)."""

        async def handle(record: RequestRecord) -> Message:
            state = require_ready(self.state)
            refuse_overrides(request.parameters)
            await change(state.lifecycle, request.model_name)
            return response()

        return await self._answer(endpoint, context, handle)


def _address(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{host}:{settings.grpc_port}"


async def start_grpc_server(state: ServingState, settings: Settings, version: str) -> grpc.aio.Server:
    """Bind `host:grpc_port` and serve on the running event loop; RuntimeError when the port is taken."""
    server = grpc.aio.server(options=grpc_options(settings))
    add_GRPCInferenceServiceServicer_to_server(InferenceService(state, version), server)
    server.add_insecure_port(_address(settings))
    await server.start()
    log.warning("grpc serving", extra={"address": _address(settings)})
    return server
