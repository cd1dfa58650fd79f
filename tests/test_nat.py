"""Hierarchical NAT and DiNAT: sizes as published, neighbourhood attention with relative position
bias checked against a per-query reference inside a real stage, and export with fused attention."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_attention import axis_neighbours

from export import ExportRequest, export_model
from models import create_model

# Published parameter counts (NAT paper Table 1, DiNAT paper Table 2): both tiny models 28M.
PAPER_PARAMS = {"nat_tiny_224": 28e6, "dinat_tiny_224": 28e6}
SMALL = {"embed_dim": 16, "depths": (1, 2, 1), "num_heads": (1, 2, 4), "kernel_size": 3, "num_classes": 5}
SMALL_DILATIONS = ((1,), (1, 2), (1,))


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_count_matches_the_paper(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01, params


def test_dinat_dilates_per_stage() -> None:
    model = create_model("dinat_tiny_224")
    dilations = [[block.attn.dilation for block in stage.blocks] for stage in model.stages]
    assert dilations == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
    nat = create_model("nat_tiny_224")
    assert {block.attn.dilation for stage in nat.stages for block in stage.blocks} == {1}


def reference_neighbourhood_attention(
    attn: torch.nn.Module, x: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Per query: attend to the NATTEN neighbours along each axis, score + rpb[dy + k - 1, dx + k - 1]."""
    batch, _, dim = x.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(batch, -1, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    kernel, dilation = attn.kernel_size, attn.dilation
    out = torch.zeros(batch, grid[0] * grid[1], heads, head_dim, dtype=x.dtype)
    for i in range(grid[0]):
        for j in range(grid[1]):
            keys, bias = [], []
            for r in axis_neighbours(i, grid[0], kernel, dilation):
                for c in axis_neighbours(j, grid[1], kernel, dilation):
                    keys.append(r * grid[1] + c)
                    dy, dx = r // dilation - i // dilation, c // dilation - j // dilation
                    bias.append(attn.rpb[:, dy + kernel - 1, dx + kernel - 1])
            query = i * grid[1] + j
            scores = torch.einsum("bhd,bkhd->bhk", q[:, query], k[:, keys]) / math.sqrt(head_dim)
            weights = (scores + torch.stack(bias, dim=-1)).softmax(dim=-1)
            out[:, query] = torch.einsum("bhk,bkhd->bhd", weights, v[:, keys])
    return out.reshape(batch, -1, dim) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("block", [0, 1], ids=["neighborhood", "dilated"])
def test_neighbourhood_matches_reference_inside_a_hierarchical_stage(block: int) -> None:
    torch.manual_seed(0)
    model = create_model("dinat_tiny_224", **SMALL, dilations=SMALL_DILATIONS).double()
    pixels = torch.randn(1, 3, 44, 60, dtype=torch.float64)
    with torch.no_grad():
        maps = model.forward_intermediates(pixels, intermediates_only=True)
        grid = tuple(maps[1].shape[-2:])
        assert grid == (6, 8)  # 44x60 -> tokenizer 11x15 -> downsampler 6x8
        attn = model.stages[1].blocks[block].attn
        attn.rpb.normal_(std=1.0)  # large enough that a misplaced bias entry shows
        x = torch.randn(2, grid[0] * grid[1], attn.qkv.in_features, dtype=torch.float64)
        torch.testing.assert_close(
            attn(x, grid), reference_neighbourhood_attention(attn, x, grid), atol=1e-10, rtol=0
        )


def test_dinat_exports_with_one_fused_attention_per_layer(tmp_path: Path) -> None:
    request = ExportRequest(
        model="dinat_tiny_224",
        repository=tmp_path,
        buckets=(64,),
        overrides={**SMALL, "dilations": SMALL_DILATIONS},
    )
    (entry,) = export_model(request, log=lambda _: None)
    assert entry.config.family == "nat" and entry.attention == ("neighborhood", "dilated")
