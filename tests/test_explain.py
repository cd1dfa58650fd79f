"""POST /v1/explain on the trained digits models: the heat map's mass lies on the strokes, not the background.

A random or inverted heat map has as much mass per background pixel as per stroke pixel, or more;
a model that learned the digits looks at the strokes. Each held-out digit is sent as a PNG to the
digits gateway (ViT through `route=global`, Swin through `route=windowed`: the cost router may send a digit either way); the heat map,
upsampled to pixels by its cell size, must put more mass per stroke pixel than per background
pixel for most digits, and clearly so at the median. The ViT's rollout is also recomputed in
PyTorch from the trained model's own attention probabilities (ARCHITECTURE.md "Explanations").
"""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from export.repository import read_repository
from models import get_config
from service.explain import NotExplainable, check_explainable
from service.explainer import EntryExplainer
from service.settings import Settings
from support.digits import DigitsData, normalize
from support.repos import DigitsRepository
from support.server import PNG, ServerProcess, assert_error, assert_serves, encode_image

DIGITS = 48
STROKE_LEVEL = 128
# Density of heat on strokes over density on background: 1 for a uniform map. Measured on this
# suite's models: ViT median 1.8 (every digit above 1), Swin median 1.26 (88% above 1).
MIN_MEDIAN_DENSITY_RATIO = 1.15
MIN_FRACTION_ON_STROKES = 0.75


@pytest.fixture(scope="module")
def digit_pixels(digits_data: DigitsData) -> np.ndarray:
    images = digits_data.test_images[:DIGITS].permute(0, 2, 3, 1).numpy()
    return np.round(images * 255).astype(np.uint8)


async def _post_all(url: str, path: str, bodies: list[bytes], params: dict[str, str]) -> list[dict]:
    """POST every body, at most MAX_EXPLAIN_QUEUE at a time (more explanations would answer 429)."""
    limits = httpx.Limits(max_connections=Settings().max_explain_queue)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        answers = await asyncio.gather(
            *(client.post(path, params=params, content=b, headers=PNG) for b in bodies)
        )
    assert [a.status_code for a in answers] == [200] * len(bodies), answers[0].text
    return [a.json() for a in answers]


def _density_ratio(heatmap: dict, pixels: np.ndarray) -> float:
    values = np.array(heatmap["values"])
    cell = heatmap["cell_pixels"]
    per_pixel = np.kron(values, np.ones((cell, cell)))[: pixels.shape[0], : pixels.shape[1]]
    strokes = pixels[..., 0] >= STROKE_LEVEL
    return per_pixel[strokes].mean() / per_pixel[~strokes].mean()


@pytest.mark.parametrize(
    "family, params, pool, method",
    [
        ("vit", {"route": "global"}, "global", "attention_rollout"),
        ("swin", {"route": "windowed"}, "windowed", "window_rollout_from_token_similarity"),
    ],
    ids=["vit attention rollout", "swin window rollout"],
)
def test_heat_map_mass_lies_on_the_strokes(
    digits_server: ServerProcess, digit_pixels: np.ndarray, family: str, params: dict, pool: str, method: str
) -> None:
    bodies = [encode_image(p) for p in digit_pixels]
    explained = asyncio.run(_post_all(digits_server.url, "/v1/explain", bodies, params))

    for answer in explained:
        assert (answer["route"]["model"], answer["route"]["pool"]) == (f"digits_{family}", pool)
        heatmap = answer["heatmap"]
        assert heatmap["method"] == method
        assert heatmap["grid"] == [4, 4] and heatmap["cell_pixels"] == 8
        assert heatmap["box"] == [0.0, 0.0, 1.0, 1.0]
        assert np.sum(heatmap["values"]) == pytest.approx(1.0, abs=1e-4)
        assert min(min(row) for row in heatmap["values"]) >= 0.0
    ratios = np.array([_density_ratio(a["heatmap"], p) for a, p in zip(explained, digit_pixels, strict=True)])
    assert np.median(ratios) > MIN_MEDIAN_DENSITY_RATIO, ratios
    assert (ratios > 1).mean() >= MIN_FRACTION_ON_STROKES, ratios


class AttentionCapture(TorchFunctionMode):
    """Record softmax(q k^T / sqrt(d)) of every scaled_dot_product_attention call, head-averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
            self.layers.append(scores.softmax(dim=-1).mean(dim=1))
        return func(*args, **kwargs)


@torch.no_grad()
def test_vit_rollout_equals_pytorch_reference(
    digits_server: ServerProcess, digits_vit: nn.Module, digit_pixels: np.ndarray
) -> None:
    """Rollout as the product of (A + I) / 2 over layers, from the class token's row, in PyTorch."""
    pixels = digit_pixels[:4]
    explained = asyncio.run(
        _post_all(digits_server.url, "/v1/explain", [encode_image(p) for p in pixels], {"route": "global"})
    )
    images = normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, digits_vit.config)

    for image, answer in zip(images, explained, strict=True):
        capture = AttentionCapture()
        with capture:
            digits_vit(image[None])
        rollout = torch.eye(capture.layers[0].shape[-1], dtype=torch.float64)
        for layer in capture.layers:
            mixing = 0.5 * layer[0].double() + 0.5 * torch.eye(layer.shape[-1], dtype=torch.float64)
            rollout = mixing @ rollout
        expected = rollout[0, 1:] / rollout[0, 1:].sum()
        np.testing.assert_allclose(np.ravel(answer["heatmap"]["values"]), expected.numpy(), atol=1e-4)


def test_heat_map_box_maps_the_grid_onto_a_padded_image(photo_server: ServerProcess) -> None:
    """A 300x200 photo padded into the global backbone's input: the grid's box on the image follows
    the route's resize (input pixels per source pixel), and the padding cells get no relevance."""
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    answer = httpx.post(
        f"{photo_server.url}/v1/explain", content=encode_image(pixels), headers=PNG, timeout=60
    ).json()
    route, heatmap = answer["route"], answer["heatmap"]
    assert (route["pool"], route["resize_mode"]) == ("global", "pad")
    rows, cols = heatmap["grid"]
    cell = heatmap["cell_pixels"]
    resized_height, resized_width = route["resized"]
    expected_box = [0.0, 0.0, cols * cell / resized_width, rows * cell / resized_height]
    assert heatmap["box"] == pytest.approx(expected_box, rel=1e-2)
    values = np.array(heatmap["values"])
    image_rows, image_cols = -(-resized_height // cell), -(-resized_width // cell)
    assert values[image_rows:].sum() == 0.0 and values[:, image_cols:].sum() == 0.0, "padding is not relevant"
    assert values.sum() == pytest.approx(1.0, abs=1e-4) and values[:image_rows, :image_cols].min() > 0
    assert set(answer["timings"]) >= {"decode_ms", "preprocess_ms", "queue_and_inference_ms", "total_ms"}


def test_explain_rejects_bad_input_and_keeps_serving(photo_server: ServerProcess) -> None:
    response = httpx.post(f"{photo_server.url}/v1/explain", content=b"not an image", headers=PNG, timeout=30)
    assert_error(response, 400, "invalid_image")
    response = httpx.post(f"{photo_server.url}/v1/explain", params={"top_k": 0}, content=b"x", headers=PNG)
    assert response.status_code == 422
    assert_serves(photo_server.url)


def test_unexplainable_entries_say_why(digits_repository: DigitsRepository) -> None:
    entry = next(e for e in read_repository(digits_repository.path) if e.backbone == "digits_vit")
    with pytest.raises(NotExplainable, match="ONNX"):
        EntryExplainer(dataclasses.replace(entry, platform="pytorch_libtorch"), threads=1)
    with pytest.raises(NotExplainable, match="linear"):
        check_explainable(get_config("linvit_tiny_patch16_224"))
    with pytest.raises(NotExplainable, match="block"):
        check_explainable(get_config("maxvit_iso_tiny_patch16_224"))
    check_explainable(get_config("dinat_iso_tiny_patch16_224"))
