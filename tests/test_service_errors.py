"""Bad requests get the status ARCHITECTURE.md "Errors" names and the JSON error body, and the server keeps serving.

400 undecodable or missing image, 404 unknown model or path, 415 unsupported type, 422 invalid
parameters: each case is sent to the shared gateway, then a normal request must still succeed.
Limits (413, 429, 504) are in test_service_limits.py, draining (503) in test_service_shutdown.py.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from support.server import PNG, SMALL_PNG, ServerProcess, assert_error, assert_serves, encode_image


def _tiff() -> bytes:
    return encode_image(np.zeros((8, 8, 3), np.uint8), "TIFF")


# id -> (method, path, request keyword arguments, status, code)
CASES = {
    "garbage bytes": (
        "POST",
        "/v1/classify",
        {"content": b"not an image at all", "headers": PNG},
        400,
        "invalid_image",
    ),
    "truncated png": (
        "POST",
        "/v1/classify",
        {"content": SMALL_PNG[:80], "headers": PNG},
        400,
        "invalid_image",
    ),
    "empty body": ("POST", "/v1/embed", {"content": b"", "headers": PNG}, 400, "invalid_image"),
    "multipart without image field": (
        "POST",
        "/v1/classify",
        {"files": {"photo": ("a.png", SMALL_PNG, "image/png")}},
        400,
        "missing_image",
    ),
    "unknown model": (
        "POST",
        "/v1/classify",
        {"params": {"model": "nope"}, "content": SMALL_PNG, "headers": PNG},
        404,
        "model_not_found",
    ),
    "unknown model in route": (
        "GET",
        "/v1/route",
        {"params": {"width": 10, "height": 10, "model": "nope"}},
        404,
        "model_not_found",
    ),
    "unknown path": ("GET", "/v1/nowhere", {}, 404, "not_found"),
    "wrong method": ("GET", "/v1/classify", {}, 405, "method_not_allowed"),
    "text content type": (
        "POST",
        "/v1/classify",
        {"content": SMALL_PNG, "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    "tiff image": (
        "POST",
        "/v1/classify",
        {"content": _tiff(), "headers": {"content-type": "image/tiff"}},
        415,
        "unsupported_media_type",
    ),
    "top_k zero": (
        "POST",
        "/v1/classify",
        {"params": {"top_k": 0}, "content": SMALL_PNG, "headers": PNG},
        422,
        "invalid_parameter",
    ),
    "unserved bucket": (
        "POST",
        "/v1/classify",
        {"params": {"bucket": 123}, "content": SMALL_PNG, "headers": PNG},
        422,
        "invalid_parameter",
    ),
    "bucket of the other backbone": (
        "POST",
        "/v1/embed",
        {"params": {"model": "vit_global", "bucket": 448}, "content": SMALL_PNG, "headers": PNG},
        422,
        "invalid_parameter",
    ),
    "unknown route": (
        "POST",
        "/v1/classify",
        {"params": {"route": "sideways"}, "content": SMALL_PNG, "headers": PNG},
        422,
        "invalid_parameter",
    ),
    "negative timeout": (
        "POST",
        "/v1/classify",
        {"params": {"timeout_ms": -5}, "content": SMALL_PNG, "headers": PNG},
        422,
        "invalid_parameter",
    ),
    "zero route width": (
        "GET",
        "/v1/route",
        {"params": {"width": 0, "height": 10}},
        422,
        "invalid_parameter",
    ),
    "missing route height": ("GET", "/v1/route", {"params": {"width": 10}}, 422, "invalid_parameter"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_its_status_and_json_error_then_the_server_serves(
    case: str, photo_server: ServerProcess
) -> None:
    method, path, kwargs, status, code = CASES[case]

    response = httpx.request(method, f"{photo_server.url}{path}", timeout=60, **kwargs)

    assert_error(response, status, code)
    assert_serves(photo_server.url)


def _v2_infer(url: str, model: str, shape: list[int]) -> httpx.Response:
    data = np.zeros(int(np.prod(shape)), np.float32).tolist()
    body = {"inputs": [{"name": "pixel_values", "shape": shape, "datatype": "FP32", "data": data}]}
    return httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=60)


@pytest.mark.parametrize(
    "model, shape, status, code, explanation",
    [
        ("nope", [1, 3, 224, 224], 404, "model_not_found", "unknown model 'nope'"),
        ("vit_global_224", [1, 3, 200, 224], 400, "invalid_request", "does not match [-1, 3, 224, 224]"),
    ],
    ids=["unknown model", "wrong shape"],
)
def test_v2_errors_use_the_kserve_error_shape(
    photo_server: ServerProcess, model: str, shape: list[int], status: int, code: str, explanation: str
) -> None:
    """The v2 protocol's error is {"error": "<message>"}; vitserve adds its code beside it."""
    response = _v2_infer(photo_server.url, model, shape)

    assert response.status_code == status
    body = response.json()
    assert body == {"error": body["error"], "code": code}
    assert explanation in body["error"]
    assert _v2_infer(photo_server.url, "vit_global_224", [1, 3, 224, 224]).status_code == 200
