"""Numerical safety at high resolution: fp16 linear attention, table resizing.

Table resizing is checked against float64 references written here from the algorithms' definitions:
timm's `resize_rel_pos_bias_table` (geometric source offsets, bilinear) and antialiased bicubic
downscaling (Pillow's filter), so a change in our float32 code that moves a value by more than
rounding fails.

fp16 runs on CPU here exactly as it would under CUDA autocast for these ops (half matmuls whose
results are stored in half), so the overflow the sum-form normalizer had above ~1,000 tokens shows
up on this machine too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import create_model, save_checkpoint
from models.layers.pos_embed import resize_relative_position_bias_table

HIGH_RES = 1344
FP16_TOLERANCE = 1e-2


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected).norm() / expected.norm())


def test_fp16_linear_attention_matches_fp32_at_1344px() -> None:
    torch.manual_seed(0)
    model = create_model("linvit_tiny_patch16_224", depth=2, num_classes=10)
    pixels = torch.randn(1, 3, HIGH_RES, HIGH_RES)
    with torch.no_grad():
        reference = model(pixels)
        half = model.half()(pixels.half())
    for name in ("logits", "embedding"):
        actual = getattr(half, name)
        assert torch.isfinite(actual).all(), f"fp16 {name} is not finite"
        assert _relative_error(actual, getattr(reference, name)) < FP16_TOLERANCE, name


# ---------------------------------------------------------------- relative position bias tables


def _timm_offsets(source: int, target: int) -> np.ndarray:
    """timm's `resize_rel_pos_bias_table` source offsets (its `_calc`), transcribed in float64."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if 1 * (1.0 - q ** (source // 2)) / (1.0 - q) > target // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1
    for i in range(source // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(dis)] + [0] + dis, dtype=np.float64)


def timm_resize_reference(table: np.ndarray, window: int) -> np.ndarray:
    """float64 reference of timm's resize (scipy-free path): bilinear on the uneven source grid,
    values clamped at the ends as timm's RegularGridInterpolator does; np.interp per axis."""
    source = int(round(table.shape[0] ** 0.5))
    target = 2 * window - 1
    y = x = _timm_offsets(source, target)
    t = target // 2
    grid = np.arange(-t, t + 0.1, 1.0)
    out = []
    for head in range(table.shape[1]):
        z = table[:, head].reshape(source, source)
        rows = np.stack([np.interp(grid, y, z[:, c]) for c in range(source)], axis=1)
        out.append(np.stack([np.interp(grid, x, rows[r]) for r in range(target)]).reshape(-1))
    return np.stack(out, axis=1)


@pytest.mark.parametrize(("old", "new"), [(7, 12), (12, 7), (4, 6)])
def test_bias_table_resize_matches_timm(old: int, new: int) -> None:
    table = torch.randn((2 * old - 1) ** 2, 3, generator=torch.Generator().manual_seed(old))
    resized = resize_relative_position_bias_table(table, (new, new))
    assert resized.shape == ((2 * new - 1) ** 2, 3) and resized.dtype == torch.float32
    expected = timm_resize_reference(table.double().numpy(), new)
    np.testing.assert_allclose(resized.numpy(), expected, rtol=0, atol=1e-6)


def test_swin_checkpoint_follows_a_window_change(tmp_path: Path) -> None:
    small = {"embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2), "img_size": 64, "num_classes": 3}
    trained = create_model("swin_tiny_patch4_window7_224", **small, window_size=4)
    path = save_checkpoint(trained, tmp_path / "w4.safetensors")
    moved = create_model("swin_tiny_patch4_window7_224", checkpoint=path, **small, window_size=6)
    assert moved.config.window_size == 6
    name = "stages.1.blocks.1.attn.relative_position_bias.relative_position_bias_table"
    original = trained.state_dict()[name]
    expected = timm_resize_reference(original.double().numpy(), 6)
    np.testing.assert_allclose(moved.state_dict()[name].numpy(), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- position tables


def _aa_cubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def antialiased_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """float64 (n_out, n_in) weights of an antialiased bicubic downscale (Pillow's filter, a = -0.5):
    the kernel stretched by the scale, truncated at the borders and renormalized."""
    scale = n_in / n_out
    support = 2.0 * scale
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = np.array([_aa_cubic((j - center + 0.5) / scale) for j in range(lo, hi)])
        weights[i, lo:hi] = w / w.sum()
    return weights


def _position_table(model: torch.nn.Module, grid: tuple[int, int]) -> np.ndarray:
    """The patch part of the model's learned table as resampled for `grid`, (H, W, C)."""
    dim = model.config.embed_dim
    zeros = torch.zeros(1, 1 + grid[0] * grid[1], dim)
    with torch.no_grad():
        table = model.pos_embed(zeros, grid, 1)[0, 1:]
    return table.reshape(grid[0], grid[1], dim).double().numpy()


def test_position_table_shrinks_with_antialiasing() -> None:
    model = create_model(
        "vit_tiny_patch16_224", depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=96
    )
    base = model.pos_embed.weight[0, 1:].detach().double().reshape(12, 12, 32).numpy()
    rows, cols = antialiased_bicubic_matrix(12, 5), antialiased_bicubic_matrix(12, 7)
    expected = np.einsum("ih,hwc,jw->ijc", rows, base, cols)
    np.testing.assert_allclose(_position_table(model, (5, 7)), expected, rtol=0, atol=1e-6)


def test_position_table_grows_bicubically_as_before() -> None:
    """Upscaling stays plain bicubic (what transformers' interpolate_pos_encoding does), also when the
    other axis shrinks: that axis alone is antialiased."""
    model = create_model(
        "vit_tiny_patch16_224", depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=48
    )
    base = model.pos_embed.weight[0, 1:].detach().reshape(1, 6, 6, 32).permute(0, 3, 1, 2)
    grown = F.interpolate(base, size=(9, 6), mode="bicubic", align_corners=False)
    mixed = np.einsum(
        "hwc,jw->hjc", grown[0].permute(1, 2, 0).double().numpy(), antialiased_bicubic_matrix(6, 4)
    )
    np.testing.assert_allclose(_position_table(model, (9, 6)), grown[0].permute(1, 2, 0).numpy(), atol=1e-6)
    np.testing.assert_allclose(_position_table(model, (9, 4)), mixed, rtol=0, atol=1e-6)
