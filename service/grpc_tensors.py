"""KServe v2 gRPC infer messages to and from the checked requests HTTP uses (`service.v2_tensors`).

A `ModelInferRequest` becomes the same validated request an HTTP body does: parameters become their
plain values (bool, int, float or string, whichever the `InferParameter` holds), typed `contents`
become the tensor's `data`, and `raw_input_contents` become the binary section with each input's
`binary_data_size` set to its raw entry's length. `check_request` then refuses exactly what it
refuses over HTTP, with the same messages. Outputs always travel as `raw_output_contents`, as
Triton sends them (the classification extension's BYTES tensors as 4-byte-length-prefixed strings).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as pb

from export.repository import ModelEntry
from service.errors import APIError
from service.v2_tensors import ParsedInfer, check_request, output_tensors, validate_request

# The typed contents field that carries each datatype the models take (FP16 travels raw only).
TYPED_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}


def _invalid(message: str) -> APIError:
    return APIError(400, "invalid_request", message)


def _parameters(parameters: Any) -> dict[str, Any]:
    """A protobuf map of InferParameter as plain values (an unset parameter is None)."""
    return {
        name: None if (kind := p.WhichOneof("parameter_choice")) is None else getattr(p, kind)
        for name, p in parameters.items()
    }


def _data(tensor: Message) -> list[float] | None:
    """The tensor's typed contents, None when it has none; 400 for contents of another datatype."""
    filled = [field.name for field, _ in tensor.contents.ListFields()]
    if not filled:
        return None
    wanted = TYPED_CONTENTS.get(tensor.datatype)
    if filled != [wanted]:
        allowed = f"contents.{wanted} or raw_input_contents" if wanted else "raw_input_contents"
        raise _invalid(
            f"input {tensor.name!r} of {tensor.datatype} carries contents {filled}; send {allowed}"
        )
    return list(getattr(tensor.contents, wanted))


def parse_model_infer(request: Message, entry: ModelEntry, max_batch_size: int) -> ParsedInfer:
    """Check a whole `ModelInferRequest` as `service.v2_tensors.parse_infer` checks an HTTP body."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise _invalid(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input"
        )
    inputs = []
    for index, tensor in enumerate(request.inputs):
        item: dict[str, Any] = {
            "name": tensor.name,
            "shape": list(tensor.shape),
            "datatype": tensor.datatype,
            "parameters": _parameters(tensor.parameters),
        }
        data = _data(tensor)
        if data is not None:
            item["data"] = data
        if raw:
            item["parameters"]["binary_data_size"] = len(raw[index])
        inputs.append(item)
    head: dict[str, Any] = {
        "id": request.id,
        "parameters": _parameters(request.parameters),
        "inputs": inputs,
    }
    if request.outputs:
        head["outputs"] = [
            {"name": output.name, "parameters": _parameters(output.parameters)} for output in request.outputs
        ]
    return check_request(validate_request(head), b"".join(raw), entry, max_batch_size)


def model_infer_response(
    entry: ModelEntry, parsed: ParsedInfer, outputs: dict[str, np.ndarray]
) -> pb.ModelInferResponse:
    """The response to a checked request: every requested output as raw_output_contents."""
    response = pb.ModelInferResponse(model_name=entry.name, model_version=str(entry.version), id=parsed.id)
    for tensor in output_tensors(entry, parsed, outputs):
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.values.shape)
        response.raw_output_contents.append(tensor.raw())
    return response
