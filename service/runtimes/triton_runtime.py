"""Triton runtime: each bucketed batch goes to one replica of a remote KServe v2 pool through tritonclient.

The remote side is a model pool: Triton Inference Server (GPU production), `vitserve serve --role
pool`, or any other Open Inference Protocol v2 server (MLServer is tested). The entry's config.pbtxt
names everything sent: the model (entry name, latest version), the input tensor and its datatype,
and the two outputs, so the remote server must serve the same repository entry under that name.

Which replica: the pool address resolves to endpoints (`service.runtimes.endpoints`: one URL, a
`|`-joined list, `dns+grpc://` / `dns+http://` names, or a `file://` list), and each batch takes a
slot on the endpoint with the least work in flight. Protocols, chosen by each endpoint URL's scheme:
  grpc://host:port  preferred (Triton and vitserve pools both serve it): tensors as raw bytes, one
                    HTTP/2 channel per endpoint multiplexing all calls, keepalive pings while calls
                    are in flight so a vanished replica is noticed, reconnect backoff capped at a
                    second so a restarted replica is found quickly.
  http://host:port  any v2 REST server. Tensors use the binary extension unless `binary=False`
                    (servers such as MLServer accept JSON tensors only). geventhttpclient ties a
                    connection to the thread that opened it, so each worker thread keeps its own
                    client per endpoint, and with it one keep-alive connection.

Deadlines: the batcher passes the latest deadline among the batch's rows (rows already expired
were dropped before the batch formed), so a short budget never fails co-batched long ones. Every
call carries its timeout (`timeout_s`, shortened to what is left of that deadline) twice: as the
protocol's `timeout` parameter (microseconds) and as the client-side deadline. Connecting is bounded
by `connect_timeout_s`, so a dead replica fails fast.

Failures: a batch is retried once on another endpoint, within what is left of its deadline, when
the replica gave no answer: connection refused, reset or closed before the response (a replica
that restarted, or was SIGKILLed or crashed mid-batch), gRPC UNAVAILABLE, HTTP 503 draining/not
ready, 429 / RESOURCE_EXHAUSTED. A dropped connection may come after the replica computed the batch,
but nobody got the answer, and inference is read-only and idempotent: computing it again elsewhere
is safe and is what a client would do itself. Timeouts (client-side, gRPC DEADLINE_EXCEEDED, HTTP
504) are not retried: the deadline they ran into is the batch's. Failures that mean "the replica
cannot serve now" (those, timeouts, HTTP 502) raise RuntimeUnavailable naming the pool and URL when
not retried, which the gateway answers with 503, and eject the replica for a while; other server
errors raise RuntimeError (500) with the server's message.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from export.repository import ModelEntry
from export.triton_config import parse_text
from service.runtimes import RuntimeUnavailable
from service.runtimes.endpoints import Endpoint, EndpointSet, parse_address

# Status texts as tritonclient reports them: "StatusCode.X" for gRPC, the status code for HTTP.
UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED"}
UNAVAILABLE |= {"429", "502", "503", "504"}
# The replica refused the batch or its connection broke before an answer: send it to another one.
NOT_ANSWERED = {"StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED", "429", "503"}
# Overload, not a broken replica: answered 503 but the replica stays in rotation.
OVERLOADED = {"StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED", "429", "504"}
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1
RECONNECT_BACKOFF_MS = 1000
KEEPALIVE = triton_grpc.KeepAliveOptions(keepalive_time_ms=10_000, keepalive_timeout_ms=5_000)
MIN_TIMEOUT_S = 0.001


@dataclass(frozen=True)
class TritonTarget:
    """Where one entry's pool is reached (an address, see `service.runtimes.endpoints`) and how long a
    call may take."""

    url: str
    pool: str
    timeout_s: float = 30.0
    connect_timeout_s: float = 1.0
    binary: bool = True

    def __post_init__(self) -> None:
        parse_address(self.url, self.pool)


def input_datatype(entry: ModelEntry) -> str:
    """The v2 datatype of the entry's input, from its config.pbtxt (TYPE_FP32 -> FP32)."""
    config = parse_text((entry.path / "config.pbtxt").read_text())
    return mc.DataType.Name(config.input[0].data_type).removeprefix("TYPE_")


def _grpc_client(address: str) -> triton_grpc.InferenceServerClient:
    channel_args = [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS // 10),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS // 10),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ]
    return triton_grpc.InferenceServerClient(address, keepalive_options=KEEPALIVE, channel_args=channel_args)


@dataclass(frozen=True)
class _Failure:
    """What one failed call means for the gateway: the error to raise, and what to do about it."""

    error: RuntimeError
    outcome: str  # endpoint outcome: "unavailable" ejects the endpoint, "error" and "ok" keep it
    retry: bool


class TritonRuntime:
    """Sends each batch of one repository entry to one endpoint of its pool's KServe v2 servers."""

    def __init__(self, entry: ModelEntry, target: TritonTarget, endpoints: EndpointSet | None = None):
        self.entry = entry
        self.target = target
        self.endpoints = endpoints or EndpointSet(target.url, target.pool)
        self._datatype = input_datatype(entry)
        self._dtype = triton_to_np_dtype(self._datatype)
        self._outputs = (entry.logits_name, entry.embedding_name)
        self._grpc: dict[str, triton_grpc.InferenceServerClient] = {}
        self._grpc_lock = threading.Lock()
        self._http = threading.local()

    def _grpc_client(self, endpoint: Endpoint) -> triton_grpc.InferenceServerClient:
        with self._grpc_lock:
            client = self._grpc.get(endpoint.url)
            if client is None:
                self._drop_stale(self._grpc, lambda old: old.close())
                client = self._grpc[endpoint.url] = _grpc_client(endpoint.address)
            return client

    def _http_client(self, endpoint: Endpoint) -> triton_http.InferenceServerClient:
        clients = getattr(self._http, "clients", None)
        if clients is None:
            clients = self._http.clients = {}
        client = clients.get(endpoint.url)
        if client is None:
            self._drop_stale(clients, lambda old: old.close())
            client = clients[endpoint.url] = triton_http.InferenceServerClient(
                endpoint.address,
                connection_timeout=self.target.connect_timeout_s,
                network_timeout=self.target.timeout_s,
            )
        return client

    def _drop_stale(self, clients: dict[str, Any], close) -> None:
        """Close the clients of endpoints the pool no longer has, before opening a new one."""
        current = set(self.endpoints.urls())
        for url in [u for u in clients if u not in current]:
            close(clients.pop(url))

    def _timeout_s(self, deadline: float | None) -> float:
        """The configured timeout, shortened to what is left of the batch's deadline (at least 1 ms)."""
        if deadline is None:
            return self.target.timeout_s
        return min(self.target.timeout_s, max(deadline - time.monotonic(), MIN_TIMEOUT_S))

    def _infer(self, endpoint: Endpoint, data: np.ndarray, timeout_s: float) -> Any:
        timeout_us = int(timeout_s * 1e6)
        if endpoint.protocol == "grpc":
            tensor = triton_grpc.InferInput(self.entry.input_name, list(data.shape), self._datatype)
            tensor.set_data_from_numpy(data)
            outputs = [triton_grpc.InferRequestedOutput(name) for name in self._outputs]
            return self._grpc_client(endpoint).infer(
                self.entry.name,
                [tensor],
                outputs=outputs,
                timeout=timeout_us,
                client_timeout=timeout_s,
            )
        binary = self.target.binary
        tensor = triton_http.InferInput(self.entry.input_name, list(data.shape), self._datatype)
        tensor.set_data_from_numpy(data, binary_data=binary)
        outputs = [triton_http.InferRequestedOutput(name, binary_data=binary) for name in self._outputs]
        return self._http_client(endpoint).infer(
            self.entry.name, [tensor], outputs=outputs, timeout=timeout_us
        )

    def _where(self, endpoint: Endpoint) -> str:
        return f"pool {self.target.pool} at {endpoint.url} (model {self.entry.name})"

    def _failure(self, endpoint: Endpoint, exc: Exception) -> _Failure:
        if isinstance(exc, InferenceServerException):
            status = str(exc.status())
            if status not in UNAVAILABLE:
                error = RuntimeError(f"{self._where(endpoint)} failed: {status}: {exc.message()}")
                return _Failure(error, "error", retry=False)
            error = RuntimeUnavailable(f"{self._where(endpoint)} is unavailable: {status}: {exc.message()}")
            outcome = "error" if status in OVERLOADED else "unavailable"
            return _Failure(error, outcome, retry=status in NOT_ANSWERED)
        error = RuntimeUnavailable(f"{self._where(endpoint)} is unreachable: {type(exc).__name__}: {exc}")
        return _Failure(error, "unavailable", retry=not isinstance(exc, TimeoutError))

    def run(self, batch: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
        """Send the batch to the least busy endpoint; once more to another, before the deadline, if
        the first gave no answer."""
        timeout_s = self._timeout_s(deadline)
        call_deadline = time.monotonic() + timeout_s
        data = np.ascontiguousarray(batch, dtype=self._dtype)
        tried: frozenset[str] = frozenset()
        while True:
            endpoint = self.endpoints.acquire(call_deadline, exclude=tried)
            try:
                result = self._infer(endpoint, data, max(call_deadline - time.monotonic(), MIN_TIMEOUT_S))
            except (InferenceServerException, OSError, HTTPException) as exc:
                failure = self._failure(endpoint, exc)
                self.endpoints.release(endpoint, failure.outcome)
                others = set(self.endpoints.urls()) - tried - {endpoint.url}
                if failure.retry and not tried and others and time.monotonic() < call_deadline:
                    tried = frozenset({endpoint.url})
                    self.endpoints.metrics.retries.labels(self.target.pool).inc()
                    continue
                raise failure.error from exc
            self.endpoints.release(endpoint, "ok")
            return self._outputs_of(endpoint, result)

    def _outputs_of(self, endpoint: Endpoint, result: Any) -> dict[str, np.ndarray]:
        logits, embedding = (result.as_numpy(name) for name in self._outputs)
        if logits is None or embedding is None:
            raise RuntimeError(f"{self._where(endpoint)} did not return the outputs {list(self._outputs)}")
        return {
            "logits": np.asarray(logits, dtype=np.float32),
            "embedding": np.asarray(embedding, dtype=np.float32),
        }

    def describe(self) -> str:
        urls = self.endpoints.urls()
        protocols = sorted({url.split(":", 1)[0] for url in urls}) or ["none"]
        where = urls[0].split("://", 1)[1] if len(urls) == 1 else self.target.url
        return f"triton {'/'.join(protocols)} {where} (pool {self.target.pool})"
