"""Numerical safety at high resolution: fp16 linear attention, table resizing.

fp16 runs on CPU here exactly as it would under CUDA autocast for these ops (half matmuls whose
results are stored in half), so the overflow the sum-form normalizer had above ~1,000 tokens shows
up on this machine too.
"""

from __future__ import annotations

import torch

from models import create_model

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
