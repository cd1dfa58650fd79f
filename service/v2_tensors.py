"""KServe v2 infer requests checked completely before anything is queued, and their responses encoded.

HTTP bodies come in through `parse_infer`; gRPC requests are translated into the same validated
request by `service.grpc_tensors` and go through the same `check_request`, and both transports
build their responses from `output_tensors`, so HTTP and gRPC accept, refuse and answer alike.

Everything a request can get wrong is answered 400 with the reason before a row reaches a batcher:
the JSON (strict numbers, finite, see `service.schemas.V2Tensor`), the input's name, datatype and
shape (batch 1..max_batch_size, exact per-image dims), the binary extension's sizes (each input's
`binary_data_size` exactly its shape's bytes, the sizes together exactly the bytes after the JSON
header), and the requested outputs and their parameters (`binary_data` and `binary_data_output` are
booleans, `classification` a count). Parsing runs on a worker thread: the JSON tensor of one 224
image is 150,528 numbers, tens of milliseconds the event loop must not spend.

The classification extension works as in Triton, which is what tritonclient's `class_count` asks
for: the output becomes a BYTES tensor [batch, k] of "score:index:label" strings (label omitted
when the entry has none), the k highest raw output values in descending order.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from export.repository import ModelEntry
from service.errors import APIError
from service.schemas import V2InferRequest, V2RequestedOutput

DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64}
# The runtimes' output keys, in the order a request without `outputs` receives them.
OUTPUT_KEYS = ("logits", "embedding")


def _invalid(message: str) -> APIError:
    return APIError(400, "invalid_request", message)


@dataclass(frozen=True)
class WantedOutput:
    """One output of the response: its protocol name, runtime key, encoding and classification count."""

    name: str
    key: str
    binary: bool
    class_count: int


@dataclass(frozen=True)
class ParsedInfer:
    """A checked infer request: the pixel rows, the outputs to send back and the protocol timeout."""

    id: str
    pixels: np.ndarray
    outputs: tuple[WantedOutput, ...]
    timeout_us: float | None


def _flag(parameters: dict[str, Any], name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise _invalid(f"parameter {name!r} must be true or false, got {json.dumps(value)}")
    return value


def _count(parameters: dict[str, Any], name: str) -> int | None:
    value = parameters.get(name)
    if value is None and name not in parameters:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _invalid(f"parameter {name!r} must be a non-negative integer, got {json.dumps(value)}")
    return value


def _split(body: bytes, header_length: str | None) -> tuple[V2InferRequest, bytes]:
    """The validated JSON header and the binary section after it."""
    if header_length is None:
        head, binary = body, b""
    elif header_length.isdigit() and int(header_length) <= len(body):
        head, binary = body[: int(header_length)], body[int(header_length) :]
    else:
        raise _invalid(
            f"Inference-Header-Content-Length {header_length!r} must be the JSON header's byte count, "
            f"at most the body's {len(body)} bytes"
        )
    return validate_request(head), binary


def validate_request(head: bytes | dict[str, Any]) -> V2InferRequest:
    """The request as JSON bytes (HTTP) or as a dict (gRPC, see `service.grpc_tensors`), validated."""
    try:
        if isinstance(head, bytes):
            return V2InferRequest.model_validate_json(head)
        return V2InferRequest.model_validate(head)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise _invalid(f"invalid v2 infer request at {where}: {first['msg']}") from None


def _pixels(request: V2InferRequest, binary: bytes, entry: ModelEntry, max_batch_size: int) -> np.ndarray:
    """The one input as a float32 (B, *input_shape) array, from JSON data or the binary section."""
    names = [t.name for t in request.inputs]
    if names != [entry.input_name]:
        raise _invalid(f"model {entry.name} takes exactly one input {entry.input_name!r}, got {names}")
    tensor = request.inputs[0]
    if tensor.datatype not in DTYPES:
        raise _invalid(f"input datatype {tensor.datatype!r} unsupported; send one of {', '.join(DTYPES)}")
    expected = list(entry.input_shape)
    if len(tensor.shape) != 1 + len(expected) or tensor.shape[1:] != expected:
        raise _invalid(f"input shape {tensor.shape} does not match [-1, {', '.join(map(str, expected))}]")
    if not 1 <= tensor.shape[0] <= max_batch_size:
        raise _invalid(f"batch of {tensor.shape[0]} rows; model {entry.name} takes 1 to {max_batch_size}")
    dtype = np.dtype(DTYPES[tensor.datatype])
    count = tensor.shape[0] * int(np.prod(expected))
    size = _count(tensor.parameters, "binary_data_size")
    if tensor.data is not None:
        if size is not None or binary:
            raise _invalid(
                "input has data values and binary data (raw_input_contents over gRPC); send one of them"
            )
        if len(tensor.data) != count:
            raise _invalid(f"input has {len(tensor.data)} values, shape {tensor.shape} needs {count}")
        array = np.asarray(tensor.data, dtype=dtype)
    else:
        if size is None:
            raise _invalid(
                "input has neither 'data' nor parameters.binary_data_size "
                "(over gRPC: neither contents nor raw_input_contents)"
            )
        if size != count * dtype.itemsize:
            raise _invalid(
                f"binary data (binary_data_size, or raw_input_contents over gRPC) is {size} bytes, shape "
                f"{tensor.shape} of {tensor.datatype} needs "
                f"{count * dtype.itemsize}"
            )
        if size != len(binary):
            raise _invalid(
                f"binary inputs declare {size} bytes, the body carries {len(binary)} after the header"
            )
        array = np.frombuffer(binary, dtype=dtype)
    array = np.ascontiguousarray(array.reshape(tensor.shape), dtype=np.float32)
    if not np.isfinite(array).all():
        raise _invalid("input holds NaN or infinite values (after conversion to FP32); send finite values")
    return array


def _outputs(request: V2InferRequest, entry: ModelEntry) -> tuple[WantedOutput, ...]:
    keys = dict(zip((entry.logits_name, entry.embedding_name), OUTPUT_KEYS, strict=True))
    default_binary = _flag(request.parameters, "binary_data_output", False)
    wanted = request.outputs or [V2RequestedOutput(name=name) for name in keys]
    outputs = []
    for output in wanted:
        if output.name not in keys:
            raise _invalid(f"model {entry.name} has no output {output.name!r}; outputs: {list(keys)}")
        outputs.append(
            WantedOutput(
                name=output.name,
                key=keys[output.name],
                binary=_flag(output.parameters, "binary_data", default_binary),
                class_count=_count(output.parameters, "classification") or 0,
            )
        )
    return tuple(outputs)


def _timeout_us(request: V2InferRequest) -> float | None:
    """The v2 `timeout` parameter (microseconds, as tritonclient and Triton use it)."""
    value = request.parameters.get("timeout")
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise _invalid(
            f"parameter 'timeout' must be a positive number of microseconds, got {json.dumps(value)}"
        )
    return float(value)


def parse_infer(
    body: bytes, header_length: str | None, entry: ModelEntry, max_batch_size: int
) -> ParsedInfer:
    """Check a whole infer request (see the module docstring); APIError 400 naming the first problem."""
    request, binary = _split(body, header_length)
    return check_request(request, binary, entry, max_batch_size)


def check_request(
    request: V2InferRequest, binary: bytes, entry: ModelEntry, max_batch_size: int
) -> ParsedInfer:
    """Check a validated request whose binary inputs, if any, are `binary` in input order (each
    input's `binary_data_size` bytes); shared by HTTP and gRPC so both refuse the same requests."""
    outputs = _outputs(request, entry)
    timeout_us = _timeout_us(request)
    return ParsedInfer(request.id or "", _pixels(request, binary, entry, max_batch_size), outputs, timeout_us)


def _classify(values: np.ndarray, k: int, labels: tuple[str, ...]) -> np.ndarray:
    """Triton's classification strings per row: the k highest values as "score:index[:label]"."""
    k = min(k, values.shape[1])
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return np.array(
        [
            [f"{values[row, i]:f}:{i}" + (f":{labels[i]}" if i < len(labels) else "") for i in order[row]]
            for row in range(values.shape[0])
        ],
        dtype=object,
    )


def _bytes_tensor(strings: np.ndarray) -> bytes:
    """The binary extension's BYTES layout: each element as a 4-byte little-endian length and its bytes."""
    parts = []
    for text in strings.ravel():
        data = text.encode()
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


@dataclass(frozen=True)
class OutputTensor:
    """One response tensor: FP32 values, or the classification extension's BYTES strings."""

    name: str
    datatype: str
    values: np.ndarray
    binary: bool

    def raw(self) -> bytes:
        """The tensor in the binary layout (HTTP binary extension, gRPC raw_output_contents)."""
        return _bytes_tensor(self.values) if self.datatype == "BYTES" else self.values.tobytes()


def output_tensors(
    entry: ModelEntry, parsed: ParsedInfer, outputs: dict[str, np.ndarray]
) -> list[OutputTensor]:
    """The requested outputs of a batch's results; 500 when the model produced NaN or infinities,
    whichever way they would travel."""
    tensors = []
    for output in parsed.outputs:
        values = np.ascontiguousarray(outputs[output.key], dtype=np.float32)
        if not np.isfinite(values).all():
            raise APIError(
                500,
                "non_finite_output",
                f"model {entry.name} produced NaN or infinite outputs for finite input",
            )
        if output.class_count:
            strings = _classify(values, output.class_count, entry.labels)
            tensors.append(OutputTensor(output.name, "BYTES", strings, output.binary))
        else:
            tensors.append(OutputTensor(output.name, "FP32", values, output.binary))
    return tensors


def encode_infer(entry: ModelEntry, parsed: ParsedInfer, outputs: dict[str, np.ndarray]) -> tuple[bytes, int]:
    """The HTTP response body and the length of its JSON header (the body's, without binary outputs)."""
    described, blobs = [], []
    for tensor in output_tensors(entry, parsed, outputs):
        item: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.values.shape),
        }
        if tensor.binary:
            blob = tensor.raw()
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = tensor.values.ravel().tolist()
        described.append(item)
    response = {
        "model_name": entry.name,
        "model_version": str(entry.version),
        "id": parsed.id,
        "outputs": described,
    }
    head = json.dumps(response).encode()
    return head + b"".join(blobs), len(head)
