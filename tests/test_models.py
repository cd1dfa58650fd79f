"""Registry and backbone behaviour: names, overrides, errors, any input size, position tables, batch independence."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from models import ModelOutput, create_model, get_config, list_models
from models.layers import GlobalAttention, LinearAttention, NeighborhoodAttention, PartitionedAttention

NUM_CLASSES = 7
# One registered name per family, shrunk in depth so every test stays fast; native size is the name's.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("vit_tiny_patch16_224", {"depth": 2}),
    "vit_rope": ("vit_tiny_patch16_rope_224", {"depth": 2}),
    "vit_sincos": ("vit_tiny_patch16_sincos_224", {"depth": 2}),
    "vit_pos2d": ("vit_tiny_patch16_pos2d_224", {"depth": 2}),
    "nat": ("nat_iso_tiny_patch16_224", {"depth": 2}),
    "dinat": ("dinat_iso_tiny_patch16_224", {"depth": 2}),
    "maxvit_iso": ("maxvit_iso_tiny_patch16_224", {"depth": 2}),
    "linvit": ("linvit_tiny_patch16_224", {"depth": 2}),
    "swin_224": ("swin_tiny_patch4_window7_224", {"depths": (2, 2, 2, 2)}),
    "swin_384": ("swin_tiny_patch4_window12_384", {"depths": (2, 1, 1, 1), "embed_dim": 48}),
}
# Attention module layer by layer (depth 2) for each isotropic family, with the detail its name promises.
EXPECTED_MIXERS = {
    "vit_tiny_patch16_224": [(GlobalAttention, "no rope")] * 2,
    "vit_tiny_patch16_rope_224": [(GlobalAttention, "rope")] * 2,
    "nat_iso_tiny_patch16_224": [(NeighborhoodAttention, 1)] * 2,
    "dinat_iso_tiny_patch16_224": [(NeighborhoodAttention, 1), (NeighborhoodAttention, 2)],
    "maxvit_iso_tiny_patch16_224": [(PartitionedAttention, "window"), (PartitionedAttention, "grid")],
    "linvit_tiny_patch16_224": [(LinearAttention, None)] * 2,
}


def small_model(family: str) -> torch.nn.Module:
    name, overrides = FAMILIES[family]
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, **overrides)


def test_registry_lists_the_timm_named_vits_and_swins() -> None:
    names = set(list_models())
    for size in ("tiny", "small", "base", "large"):
        for patch in (8, 14, 16, 32):
            for res in (224, 384):
                assert f"vit_{size}_patch{patch}_{res}" in names
    for size in ("tiny", "small", "base"):
        assert f"swin_{size}_patch4_window7_224" in names
        assert f"swin_{size}_patch4_window12_384" in names


@pytest.mark.parametrize(
    "stem", ["nat_iso_", "dinat_iso_", "maxvit_iso_", "linvit_", "vit_*_rope", "vit_*_sincos", "vit_*_pos2d"]
)
def test_registry_lists_composed_families(stem: str) -> None:
    assert list_models(f"{stem}*"), f"no registered model matches {stem}*"


def test_list_models_filters_by_pattern() -> None:
    swins = list_models("swin_*")
    assert swins == sorted(swins)
    assert len(swins) == 6
    assert all(name.startswith("swin_") for name in swins)


def test_registered_configs_carry_the_sizes_in_their_names() -> None:
    vit = get_config("vit_base_patch32_384")
    assert (vit.embed_dim, vit.depth, vit.num_heads, vit.patch_size, vit.img_size) == (768, 12, 12, 32, 384)
    swin = get_config("swin_small_patch4_window12_384")
    assert (swin.embed_dim, swin.depths, swin.window_size, swin.img_size) == (96, (2, 2, 18, 2), 12, 384)


@pytest.mark.parametrize(("name", "expected"), EXPECTED_MIXERS.items())
def test_composed_families_use_their_attention_variant(name: str, expected: list[tuple[type, Any]]) -> None:
    model = create_model(name, depth=2)
    for block, (cls, detail) in zip(model.blocks, expected, strict=True):
        assert type(block.attn) is cls
        if cls is NeighborhoodAttention:
            assert block.attn.dilation == detail
        if cls is PartitionedAttention:
            assert (block.attn.mode, block.attn.shift_size) == (detail, 0)
        if cls is GlobalAttention:
            assert ("rope" if block.attn.rope is not None else "no rope") == detail


def test_create_model_applies_overrides_without_touching_the_registry() -> None:
    model = create_model("vit_small_patch16_224", depth=2, num_classes=5, labels=list("abcde"))
    assert len(model.blocks) == 2
    assert model.head.out_features == 5
    assert model.config.labels == tuple("abcde")
    assert get_config("vit_small_patch16_224").depth == 12
    swin = create_model("swin_tiny_patch4_window7_224", depths=[1, 1], num_heads=[3, 6], num_classes=0)
    assert [len(stage.blocks) for stage in swin.stages] == [1, 1]
    assert swin.config.depths == (1, 1)
    out = swin(torch.zeros(1, 3, 64, 64))
    assert torch.equal(out.logits, out.embedding)


def test_unknown_model_name_says_where_to_look() -> None:
    with pytest.raises(KeyError) as raised:
        create_model("vit_tiny_patch16_225")
    message = str(raised.value)
    assert "unknown model 'vit_tiny_patch16_225'" in message
    assert "list_models()" in message
    assert "vit_tiny_patch16_224" in message


def test_unknown_config_field_lists_the_valid_ones() -> None:
    with pytest.raises(TypeError) as raised:
        create_model("vit_tiny_patch16_224", depht=2)
    message = str(raised.value)
    assert "['depht']" in message
    assert "valid fields" in message and "'depth'" in message


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("vit_tiny_patch16_224", {"attention": ("window",)}, "must be a non-empty cycle of"),
        ("vit_tiny_patch16_224", {"attention": ("neighborhood",)}, "need class_token=False"),
        ("vit_tiny_patch16_224", {"pos_embed": "alibi"}, "unknown pos_embed 'alibi'"),
        ("vit_tiny_patch16_224", {"num_heads": 5}, "embed_dim 192 is not divisible by num_heads 5"),
        ("swin_tiny_patch4_window7_224", {"depths": (2, 2)}, "one entry per stage"),
        (
            "swin_tiny_patch4_window7_224",
            {"num_classes": 2, "labels": ("a",)},
            "1 labels given for 2 classes",
        ),
    ],
)
def test_invalid_overrides_are_rejected_with_the_reason(
    name: str, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        create_model(name, **overrides)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", ["native", (200, 300)])
def test_every_family_runs_at_native_and_odd_sizes(family: str, size: Any) -> None:
    model = small_model(family)
    height, width = (model.config.img_size,) * 2 if size == "native" else size
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, NUM_CLASSES)
    assert out.embedding.shape == (2, model.config.num_features)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.embedding).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_in_a_batch_do_not_affect_each_other(family: str) -> None:
    model = small_model(family)
    torch.manual_seed(1)
    images = torch.randn(3, 3, 70, 100)
    with torch.no_grad():
        batched = model(images)
        for i in range(3):
            alone = model(images[i : i + 1])
            torch.testing.assert_close(batched.logits[i : i + 1], alone.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(batched.embedding[i : i + 1], alone.embedding, atol=1e-5, rtol=0)


def interpolated_pos_embed(
    weight: torch.Tensor, base: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """The class slot unchanged, the patch table resized as a (C, H, W) image with bicubic interpolation."""
    dim = weight.shape[-1]
    table = weight[0, 1:].reshape(base[0], base[1], dim).permute(2, 0, 1).unsqueeze(0)
    resized = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
    return torch.cat((weight[:, :1], resized[0].permute(1, 2, 0).reshape(1, grid[0] * grid[1], dim)), dim=1)


def test_vit_interpolates_learned_position_table_bicubically() -> None:
    model = small_model("vit")
    weight = model.pos_embed.weight.detach()
    grid = (16, 19)  # 250 x 300 padded to patch multiples; shrinking is antialiased (test_numerics.py)
    expected = interpolated_pos_embed(weight, (14, 14), grid)
    assert not torch.allclose(expected[:, 1:14], weight[:, 1:14])
    pixels = torch.randn(2, 3, 250, 300)
    with torch.no_grad():
        tokens, seen_grid = model.patch_embed(pixels)
        x = torch.cat((model.cls_token.expand(2, -1, -1), tokens), dim=1) + expected
        for block in model.blocks:
            x = block(x, seen_grid)
        embedding = model.norm(x)[:, 0]
        out = model(pixels)
    assert seen_grid == grid
    torch.testing.assert_close(out.embedding, embedding, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, model.head(embedding), atol=1e-5, rtol=0)


def test_vit_uses_its_position_table_unchanged_at_native_size() -> None:
    model = small_model("vit")
    x = torch.zeros(1, 1 + 14 * 14, model.config.embed_dim)
    assert torch.equal(model.pos_embed(x, (14, 14), 1), model.pos_embed.weight.detach())
