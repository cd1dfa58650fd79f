"""The trained digits models, exported and served: accuracy over HTTP equals PyTorch's on the same images.

Random weights cannot tell a faithful serving pipeline from one that scrambles pixels; a model that
has learned the digits can. Each held-out digit is quantized to uint8 RGB (as any image file is),
sent as a PNG, decoded, routed, preprocessed and batched by the gateway; PyTorch classifies the very
same uint8 images after the same normalization. Predictions must be identical, scores equal.
Each backbone is reached with the `route=global` / `route=windowed` override (automatic routing picks
the cheaper by measured cost, since both serve a digit at full detail).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from support.digits import DigitsData, normalize
from support.repos import DIGITS_MAX_GLOBAL_TOKENS, DigitsRepository
from support.server import ServerProcess, encode_image

CONCURRENCY = 16


@pytest.fixture(scope="module")
def digit_pixels(digits_data: DigitsData) -> np.ndarray:
    """Held-out digits as (N, H, W, 3) uint8: what an image file can carry."""
    images = digits_data.test_images.permute(0, 2, 3, 1).numpy()
    return np.round(images * 255).astype(np.uint8)


@torch.no_grad()
def _pytorch_probabilities(model: nn.Module, pixels: np.ndarray) -> np.ndarray:
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return torch.softmax(model(normalize(images, model.config)).logits, dim=1).numpy()


async def _classify_all(url: str, bodies: list[bytes], params: dict[str, str]) -> list[dict]:
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        answers = await asyncio.gather(
            *(
                client.post(
                    "/v1/classify", params=params, content=body, headers={"content-type": "image/png"}
                )
                for body in bodies
            )
        )
    assert [a.status_code for a in answers] == [200] * len(bodies)
    return [a.json() for a in answers]


@pytest.mark.parametrize(
    "family, params, pool",
    [("vit", {"route": "global"}, "global"), ("swin", {"route": "windowed"}, "windowed")],
    ids=["vit global route", "swin windowed route"],
)
def test_accuracy_over_http_equals_pytorch(
    request: pytest.FixtureRequest,
    digits_server: ServerProcess,
    digits_data: DigitsData,
    digit_pixels: np.ndarray,
    family: str,
    params: dict[str, str],
    pool: str,
) -> None:
    model: nn.Module = request.getfixturevalue(f"digits_{family}")
    expected = _pytorch_probabilities(model, digit_pixels)

    answers = asyncio.run(
        _classify_all(digits_server.url, [encode_image(p) for p in digit_pixels], {**params, "top_k": "1"})
    )

    assert {(a["route"]["model"], a["route"]["pool"], a["route"]["bucket"]) for a in answers} == {
        (f"digits_{family}", pool, digit_pixels.shape[1])
    }
    served = np.array([int(a["predictions"][0]["label"]) for a in answers])
    labels = digits_data.test_labels.numpy()
    np.testing.assert_array_equal(served, expected.argmax(axis=1))
    assert (served == labels).mean() == (expected.argmax(axis=1) == labels).mean() > 0.8
    np.testing.assert_allclose(
        [a["predictions"][0]["score"] for a in answers], expected.max(axis=1), atol=1e-4
    )


def test_route_explains_the_digits_routing_file(digits_server: ServerProcess) -> None:
    """Both backbones serve a 32x32 digit at full detail: the one measured cheaper at start-up is taken."""
    small = httpx.get(f"{digits_server.url}/v1/route", params={"width": 32, "height": 32}).json()

    assert small["image_tokens"] == DIGITS_MAX_GLOBAL_TOKENS
    assert {c["model"] for c in small["candidates"]} == {"digits_vit", "digits_swin"}
    assert [c["detail"] for c in small["candidates"]] == [1.0, 1.0]
    cheapest = min(small["candidates"], key=lambda c: c["expected_ms"])
    assert (small["entry"], small["cost_source"]) == (cheapest["entry"], "measured at start-up")
    assert small["expected_ms"] == cheapest["expected_ms"] > 0


def test_served_labels_are_the_checkpoint_labels(digits_repository: DigitsRepository) -> None:
    for backbone in ("digits_vit", "digits_swin"):
        labels = (Path(digits_repository.path) / f"{backbone}_32" / "labels.txt").read_text().split()
        assert labels == [str(d) for d in range(10)]
