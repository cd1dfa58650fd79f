"""timm's model API: forward_features / forward_head compose to forward, and forward_intermediates
gives per-block (ViT) and per-stage (Swin) feature maps that agree with the final features."""

from __future__ import annotations

import pytest
import torch

from models import create_model

VIT = ("vit_tiny_patch16_224", {"depth": 3, "embed_dim": 32, "num_heads": 2, "num_classes": 4})
SWIN = (
    "swin_tiny_patch4_window7_224",
    {"embed_dim": 16, "depths": (2, 2, 2), "num_heads": (1, 2, 4), "window_size": 4, "num_classes": 4},
)


@pytest.mark.parametrize(("name", "overrides"), [VIT, SWIN])
def test_features_and_head_compose_to_forward(name: str, overrides: dict) -> None:
    model = create_model(name, **overrides)
    pixels = torch.randn(2, 3, 72, 88)
    with torch.no_grad():
        out = model(pixels)
        features = model.forward_features(pixels)
        assert torch.equal(model.forward_head(features), out.logits)
        assert torch.equal(model.forward_head(features, pre_logits=True), out.embedding)


def test_vit_intermediates_are_block_maps() -> None:
    model = create_model(VIT[0], **VIT[1])
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, maps = model.forward_intermediates(pixels, indices=2, norm=True)
        features = model.forward_features(pixels)
        every = model.forward_intermediates(pixels, intermediates_only=True)
    assert torch.equal(final, features)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 6)] * 2
    spatial = features[:, 1:].transpose(1, 2).reshape(2, 32, 4, 6)
    assert torch.allclose(maps[-1], spatial, atol=1e-6)
    assert len(every) == 3 and torch.allclose(
        model.norm(every[-1].flatten(2).transpose(1, 2)), features[:, 1:], atol=1e-6
    )


def test_swin_intermediates_are_stage_maps() -> None:
    model = create_model(SWIN[0], **SWIN[1])
    pixels = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, maps = model.forward_intermediates(pixels, norm=True)
        first_only = model.forward_intermediates(pixels, indices=[0], intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(1, 16, 16, 24), (1, 32, 8, 12), (1, 64, 4, 6)]
    assert torch.allclose(maps[-1].flatten(2).transpose(1, 2), final, atol=1e-6)
    assert torch.equal(first_only[0], maps[0])


def test_bad_indices_are_rejected() -> None:
    model = create_model(VIT[0], **VIT[1])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[5])
