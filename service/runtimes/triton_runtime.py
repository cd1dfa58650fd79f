"""Triton runtime: each bucketed batch goes to a remote KServe v2 server through tritonclient.

The remote side is a model pool: Triton Inference Server (GPU production), `vitserve serve --role
pool`, or any other Open Inference Protocol v2 server (MLServer is tested). The entry's config.pbtxt
names everything sent: the model (entry name, latest version), the input tensor and its datatype,
and the two outputs, so the remote server must serve the same repository entry under that name.

Protocols, chosen by the URL scheme:
  grpc://host:port  preferred for Triton (tensors as raw bytes, one HTTP/2 channel multiplexing all
                    calls, reconnect backoff capped at a second so a restarted pool is found quickly).
                    vitserve pools do not speak gRPC.
  http://host:port  vitserve pools and any v2 REST server. Tensors use the binary extension unless
                    `binary=False` (servers such as MLServer accept JSON tensors only). geventhttpclient
                    ties a connection to the thread that opened it, so each worker thread keeps its own
                    client, and with it one keep-alive connection.

Every call carries its timeout (`timeout_s`, shortened to what is left of the batch's earliest request
deadline) twice: as the protocol's `timeout` parameter (microseconds, so Triton
can drop a request that waited too long) and as the client-side deadline. Connecting is bounded by
`connect_timeout_s`, so a dead pool fails fast. Failures that mean "the pool cannot serve now"
(refused, reset or closed connections, timeouts, gRPC UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED,
HTTP 429 / 502 / 503 / 504) raise RuntimeUnavailable naming the pool and URL, which the gateway
answers with 503; other server errors raise RuntimeError (500) with the server's message.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from export.repository import ModelEntry
from export.triton_config import parse_text
from service.runtimes import RuntimeUnavailable

PROTOCOLS = ("grpc", "http")
UNAVAILABLE_GRPC = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED"}
UNAVAILABLE_HTTP = {"429", "502", "503", "504"}
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1
RECONNECT_BACKOFF_MS = 1000


MIN_TIMEOUT_S = 0.001


@dataclass(frozen=True)
class TritonTarget:
    """Where one entry's pool is reached and how long a call may take."""

    url: str
    pool: str
    timeout_s: float = 30.0
    connect_timeout_s: float = 1.0
    binary: bool = True

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in PROTOCOLS or not parts.hostname or parts.port is None:
            raise ValueError(
                f"pool {self.pool}: triton URL {self.url!r} must look like "
                "grpc://HOST:PORT or http://HOST:PORT"
            )

    @property
    def protocol(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return urlsplit(self.url).netloc


def input_datatype(entry: ModelEntry) -> str:
    """The v2 datatype of the entry's input, from its config.pbtxt (TYPE_FP32 -> FP32)."""
    config = parse_text((entry.path / "config.pbtxt").read_text())
    return mc.DataType.Name(config.input[0].data_type).removeprefix("TYPE_")


def _grpc_client(target: TritonTarget) -> triton_grpc.InferenceServerClient:
    channel_args = [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS // 10),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS // 10),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ]
    return triton_grpc.InferenceServerClient(target.address, channel_args=channel_args)


class TritonRuntime:
    """Sends each batch of one repository entry to its pool's KServe v2 server."""

    def __init__(self, entry: ModelEntry, target: TritonTarget):
        self.entry = entry
        self.target = target
        self._datatype = input_datatype(entry)
        self._dtype = triton_to_np_dtype(self._datatype)
        self._outputs = (entry.logits_name, entry.embedding_name)
        self._grpc = _grpc_client(target) if target.protocol == "grpc" else None
        self._http = threading.local()

    def _http_client(self) -> triton_http.InferenceServerClient:
        client = getattr(self._http, "client", None)
        if client is None:
            client = triton_http.InferenceServerClient(
                self.target.address,
                connection_timeout=self.target.connect_timeout_s,
                network_timeout=self.target.timeout_s,
            )
            self._http.client = client
        return client

    def _timeout_s(self, deadline: float | None) -> float:
        """The configured timeout, shortened to what is left of the batch's deadline (at least 1 ms)."""
        if deadline is None:
            return self.target.timeout_s
        return min(self.target.timeout_s, max(deadline - time.monotonic(), MIN_TIMEOUT_S))

    def _infer(self, batch: np.ndarray, deadline: float | None) -> Any:
        timeout_s = self._timeout_s(deadline)
        timeout_us = int(timeout_s * 1e6)
        data = np.ascontiguousarray(batch, dtype=self._dtype)
        if self._grpc is not None:
            tensor = triton_grpc.InferInput(self.entry.input_name, list(data.shape), self._datatype)
            tensor.set_data_from_numpy(data)
            outputs = [triton_grpc.InferRequestedOutput(name) for name in self._outputs]
            return self._grpc.infer(
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
        return self._http_client().infer(self.entry.name, [tensor], outputs=outputs, timeout=timeout_us)

    def _where(self) -> str:
        return f"pool {self.target.pool} at {self.target.url} (model {self.entry.name})"

    def run(self, batch: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
        try:
            result = self._infer(batch, deadline)
        except InferenceServerException as exc:
            status = str(exc.status())
            if status in UNAVAILABLE_GRPC or status in UNAVAILABLE_HTTP:
                raise RuntimeUnavailable(
                    f"{self._where()} is unavailable: {status}: {exc.message()}"
                ) from exc
            raise RuntimeError(f"{self._where()} failed: {status}: {exc.message()}") from exc
        except (OSError, HTTPException) as exc:
            raise RuntimeUnavailable(f"{self._where()} is unreachable: {exc}") from exc
        logits, embedding = (result.as_numpy(name) for name in self._outputs)
        if logits is None or embedding is None:
            raise RuntimeError(f"{self._where()} did not return the outputs {list(self._outputs)}")
        return {
            "logits": np.asarray(logits, dtype=np.float32),
            "embedding": np.asarray(embedding, dtype=np.float32),
        }

    def describe(self) -> str:
        return f"triton {self.target.protocol} {self.target.address} (pool {self.target.pool})"
