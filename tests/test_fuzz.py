"""Bounded fuzzing: generated v2 requests and image headers against the real parsers, and schemathesis
over vitserve's own OpenAPI against a real server. The property is the same everywhere: a client error
(4xx with its JSON error) or a valid answer; never a 5xx, an unexpected exception or a hang.

Each run is bounded by example counts (about 30 s in all on an idle 2-core machine), derandomized so
the suite is reproducible; `HYPOTHESIS_PROFILE=long` explores further by hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export import read_repository
from export.repository import ModelEntry
from service.errors import APIError
from service.imaging import ImageError, decode_image, probe_image
from support.server import ServerProcess, encode_image

settings.register_profile(
    "suite", max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

MAX_BATCH = 4


@pytest.fixture(scope="module")
def entry(photo_repository: Path) -> ModelEntry:
    return min(read_repository(photo_repository), key=lambda e: e.bucket)


# --- v2 infer bodies, JSON and binary ---

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def infer_bodies(draw: st.DrawFn, side: int) -> tuple[bytes, str | None]:
    """Mostly near-valid v2 requests with one or more fields bent, in JSON or binary form."""
    batch = draw(st.sampled_from([0, 1, 2, MAX_BATCH + 1, 2**40]))
    shape = draw(
        st.sampled_from(
            [[batch, 3, side, side], [batch, 3, side], [1, 3, side, side + 1], [-1, 3, side, side]]
        )
        | st.lists(st.integers(-3, 2**63), max_size=5)
    )
    tensor: dict = {
        "name": draw(st.sampled_from(["pixel_values", "x", ""])),
        "shape": shape,
        "datatype": draw(st.sampled_from(["FP32", "FP16", "FP64", "INT8", "BYTES", ""])),
    }
    binary = draw(st.booleans())
    payload = b""
    if binary:
        count = draw(st.integers(0, 2 * 3 * side * side * 4 + 8))
        payload = draw(st.binary(min_size=0, max_size=64)) if count > 64 else b"\0" * count
        payload = payload if draw(st.booleans()) else np.zeros(3 * side * side, np.float32).tobytes()
        tensor["parameters"] = {"binary_data_size": draw(st.one_of(st.just(len(payload)), json_values))}
    else:
        tensor["data"] = draw(st.one_of(json_values, st.lists(st.floats(width=32), max_size=8)))
    body = {"inputs": [tensor] if draw(st.booleans()) else draw(st.lists(json_values, max_size=2))}
    if draw(st.booleans()):
        body["outputs"] = [
            {
                "name": draw(st.sampled_from(["logits", "embedding", "nope"])),
                "parameters": draw(
                    st.dictionaries(
                        st.sampled_from(["binary_data", "classification"]), json_values, max_size=2
                    )
                ),
            }
        ]
    if draw(st.booleans()):
        body["parameters"] = draw(
            st.dictionaries(st.sampled_from(["binary_data_output", "timeout"]), json_values, max_size=2)
        )
    head = json.dumps(body).encode()
    if not binary:
        return head, None
    length = draw(
        st.one_of(st.just(str(len(head))), st.integers(-5, len(head) + 10).map(str), st.text(max_size=4))
    )
    return head + payload, length


def test_v2_parser_answers_every_generated_request_with_a_client_error_or_a_batch(entry: ModelEntry) -> None:
    from service.v2_tensors import encode_infer, parse_infer

    @given(infer_bodies(entry.bucket))
    def check(request: tuple[bytes, str | None]) -> None:
        body, header_length = request
        try:
            parsed = parse_infer(body, header_length, entry, MAX_BATCH)
        except APIError as error:
            assert 400 <= error.status < 500 and error.message
            return
        assert parsed.pixels.dtype == np.float32 and 1 <= len(parsed.pixels) <= MAX_BATCH
        assert np.isfinite(parsed.pixels).all()
        rows = len(parsed.pixels)
        outputs = {"logits": np.zeros((rows, 10), np.float32), "embedding": np.zeros((rows, 4), np.float32)}
        content, head_length = encode_infer(entry, parsed, outputs)
        json.loads(content[:head_length])

    check()


# --- image headers ---

SEEDS = {
    "PNG": encode_image(np.random.default_rng(0).integers(0, 256, (24, 32, 3), np.uint8)),
    "JPEG": encode_image(np.random.default_rng(1).integers(0, 256, (24, 32, 3), np.uint8), "JPEG"),
    "GIF": encode_image(np.random.default_rng(2).integers(0, 256, (24, 32), np.uint8), "GIF"),
    "WEBP": encode_image(np.random.default_rng(3).integers(0, 256, (24, 32, 3), np.uint8), "WEBP"),
    "BMP": encode_image(np.random.default_rng(4).integers(0, 256, (24, 32, 3), np.uint8), "BMP"),
}


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid small image with bytes of its first 64 (the header) overwritten, cut or extended."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, min(63, len(data) - 1)))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.sampled_from([len(data), len(data) // 2, 40, 12]))
    return bytes(data[:cut]) + draw(st.binary(max_size=16))


@given(mutated_images())
def test_image_header_mutations_are_accepted_or_rejected_as_image_errors(data: bytes) -> None:
    try:
        header = probe_image(data, max_bytes=1 << 20, max_pixels=1 << 22)
        decoded = decode_image(header, max_bytes=1 << 20, max_pixels=1 << 22, target_side=32, mode="pad")
    except ImageError as error:
        assert error.status in (400, 413, 415)
        return
    assert decoded.pixels.ndim == 3 and decoded.pixels.shape[2] == 3


# --- schemathesis over the served OpenAPI ---


@pytest.fixture(scope="module")
def api_schema(photo_server: ServerProcess):
    return schemathesis.openapi.from_url(f"{photo_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15)
def test_openapi_operations_never_answer_5xx(case, photo_server: ServerProcess) -> None:
    response = case.call(base_url=photo_server.url, timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
    if response.status_code >= 400 and response.status_code != 405:
        assert "error" in response.json()
    assert httpx.get(f"{photo_server.url}/v2/health/live", timeout=10).status_code == 200
