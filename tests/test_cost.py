"""The cost model counts what the real modules execute: checked against FlopCounterMode on them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from models import create_model, get_config
from models.cost import estimate_cost

BATCH = 2


def _cpu_sdpa_flops(query, key, value, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """FlopCounterMode has no formula for the CPU flash kernel; it is the same QK^T + AV as the GPU ones."""
    return sdpa_flop_count(query, key, value)


SDPA_ON_CPU = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
ATTENTION_OPS = ("attention", "bmm")  # SDPA kernels; linear attention's 4D matmuls run as bmm


def _measure(model: nn.Module, height: int, width: int) -> tuple[int, int, int]:
    """Total FLOPs, attention FLOPs and the largest conv/Linear output in bytes of one real forward pass."""
    outputs: list[int] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel() * 4))
        for module in model.modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
    ]
    with FlopCounterMode(display=False, custom_mapping=SDPA_ON_CPU) as counter, torch.no_grad():
        model(torch.randn(BATCH, 3, height, width))
    for hook in hooks:
        hook.remove()
    by_op = counter.get_flop_counts()["Global"]
    attention = sum(flops for op, flops in by_op.items() if any(name in str(op) for name in ATTENTION_OPS))
    return counter.get_total_flops(), attention, max(outputs)


CASES = [
    ("vit_tiny_patch16_224", {}, 224, 224),
    ("vit_small_patch16_224", {"depth": 2}, 224, 224),
    ("vit_small_patch16_224", {"depth": 2}, 200, 328),
    ("vit_tiny_patch14_224", {"depth": 1}, 512, 512),
    ("vit_tiny_patch16_rope_224", {"depth": 2}, 200, 328),
    ("vit_tiny_patch16_pos2d_224", {"depth": 1}, 200, 328),
    ("swin_tiny_patch4_window7_224", {"depths": (2, 2, 2, 2)}, 224, 224),
    ("swin_tiny_patch4_window7_224", {"depths": (2, 2, 2, 2)}, 300, 400),
    ("nat_iso_tiny_patch16_224", {"depth": 2}, 200, 328),
    ("dinat_iso_tiny_patch16_224", {"depth": 2}, 224, 224),
    ("maxvit_iso_tiny_patch16_224", {"depth": 2}, 200, 328),
    ("linvit_tiny_patch16_224", {"depth": 2}, 200, 328),
    ("nat_tiny_224", {"depths": (1, 1, 2, 1)}, 96, 120),
    ("dinat_tiny_224", {"depths": (2, 1, 1, 1), "dilations": ((1, 2), (1,), (1,), (1,))}, 100, 90),
]


@pytest.mark.parametrize(("name", "overrides", "height", "width"), CASES)
def test_estimate_matches_flop_counter_on_the_real_module(name, overrides, height, width):
    model = create_model(name, **overrides)
    flops, attention_flops, activation_bytes = _measure(model, height, width)
    cost = estimate_cost(model.config, height, width, batch=BATCH)
    # Exact counts; the contract is 5%, but anything but equality means a layer is miscounted.
    assert cost.flops == flops
    assert cost.attention_flops == attention_flops > 0
    assert cost.activation_bytes == activation_bytes
    assert cost.params == sum(p.numel() for p in model.parameters())


def test_tokens_follow_the_padded_patch_grid():
    assert estimate_cost("vit_small_patch16_224", 200, 328).tokens == 13 * 21
    swin = estimate_cost("swin_tiny_patch4_window7_224", 300, 400)
    # 75x100 -> 38x50 (odd rows padded) -> 19x25 -> 10x13
    assert swin.tokens_per_stage == (75 * 100, 38 * 50, 19 * 25, 10 * 13)
    assert swin.tokens == 7500


def test_attention_bytes_is_the_largest_score_matrix():
    vit = estimate_cost("vit_tiny_patch16_224", 224, 224, batch=BATCH)
    assert vit.attention_bytes == BATCH * 3 * 197 * 197 * 4  # class token included
    swin = estimate_cost("swin_tiny_patch4_window7_224", 224, 224)
    assert swin.attention_bytes == 64 * 3 * 49 * 49 * 4  # stage 1: 8x8 windows of 49 tokens, 3 heads
    assert estimate_cost("linvit_tiny_patch16_224", 224, 224).attention_bytes == 0


def test_masked_neighborhood_attention_costs_what_global_attention_costs():
    spatial_vit = get_config("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    for name in ("nat_iso_tiny_patch16_224", "dinat_iso_tiny_patch16_224"):
        assert (
            estimate_cost(name, 448, 448).attention_flops
            == estimate_cost(spatial_vit, 448, 448).attention_flops
        )


def test_windowed_attention_grows_linearly_and_global_quadratically():
    vit = [estimate_cost("vit_tiny_patch16_224", side, side).attention_flops for side in (448, 896)]
    swin = [estimate_cost("swin_tiny_patch4_window7_224", side, side).attention_flops for side in (448, 896)]
    assert vit[1] / vit[0] == pytest.approx(16, rel=0.01)
    assert swin[1] / swin[0] == pytest.approx(4, rel=0.01)


def test_reproduces_the_patch_size_table():
    """Tokens at 224 / 512 and attention FLOPs relative to patch 32 at 224 (seeds/attention-in-vision.txt)."""
    table = {32: (49, 256, 1), 16: (196, 1024, 16), 14: (256, 1369, 27), 8: (784, 4096, 256)}

    def cost(patch: int, side: int):
        config = get_config(f"vit_base_patch{patch}_224", class_token=False, global_pool="avg")
        return estimate_cost(config, side, side)

    reference = cost(32, 224).attention_flops
    for patch, (tokens_224, tokens_512, ratio) in table.items():
        assert cost(patch, 224).tokens == tokens_224
        assert cost(patch, 512).tokens == tokens_512
        assert round(cost(patch, 224).attention_flops / reference) == ratio


def test_batch_scales_everything_but_params():
    one = estimate_cost("swin_tiny_patch4_window7_224", 384, 384)
    four = estimate_cost("swin_tiny_patch4_window7_224", 384, 384, batch=4)
    assert (four.flops, four.attention_flops, four.attention_bytes) == (
        4 * one.flops,
        4 * one.attention_flops,
        4 * one.attention_bytes,
    )
    assert four.params == one.params and four.tokens == one.tokens


@pytest.mark.parametrize(
    ("height", "width", "batch"), [(0, 224, 1), (224, -1, 1), (224, 224, 0), (22.5, 224, 1)]
)
def test_rejects_non_positive_sizes(height, width, batch):
    with pytest.raises(ValueError, match="positive integer"):
        estimate_cost("vit_tiny_patch16_224", height, width, batch)


def test_unknown_model_name_fails_with_a_hint():
    with pytest.raises(KeyError, match="list_models"):
        estimate_cost("vit_gigantic_patch16_224", 224, 224)
