"""Swin transformer: windowed attention with shifted windows and relative position bias.

Any input resolution works: the image is padded to a patch multiple, each stage pads its
feature map to a window multiple inside attention, and patch merging pads odd sizes. Layers whose
feature map fits inside one window run without the cyclic shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import SwinConfig
from models.hierarchical import HierarchicalBackbone, HierarchicalStage
from models.layers import Block, PatchEmbed, build_attention, init_weights

# The reference Swin normalizes the patch embedding and the merge input with LayerNorm's default eps.
STEM_NORM_EPS = 1e-5


class PatchMerging(nn.Module):
    """Halve the grid and double the width: concat each 2x2 neighbourhood, normalize, project 4C -> 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=STEM_NORM_EPS)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        batch, _, channels = x.shape
        height, width = grid
        x = x.view(batch, height, width, channels)
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat((x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]), dim=-1)
        new_grid = (x.shape[1], x.shape[2])
        x = x.reshape(batch, new_grid[0] * new_grid[1], 4 * channels)
        return self.reduction(self.norm(x)), new_grid


class SwinStage(HierarchicalStage):
    """Blocks alternating plain and shifted windows, then an optional patch merge."""

    def __init__(self, config: SwinConfig, stage: int, downsample: bool):
        super().__init__()
        dim = config.stage_dim(stage)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                build_attention(
                    "window",
                    dim,
                    config.num_heads[stage],
                    qkv_bias=config.qkv_bias,
                    partition_size=config.window_size,
                    shift_size=0 if i % 2 == 0 else config.window_size // 2,
                ),
                config.mlp_ratio,
                config.layer_norm_eps,
            )
            for i in range(config.depths[stage])
        )
        self.downsample = PatchMerging(dim) if downsample else None


class SwinTransformer(HierarchicalBackbone):
    """Patch embedding (+norm) -> stages -> norm -> mean pool -> head."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(
            config.patch_size, config.in_chans, config.embed_dim, norm_eps=STEM_NORM_EPS
        )
        last = len(config.depths) - 1
        self.stages = nn.ModuleList(SwinStage(config, s, downsample=s < last) for s in range(last + 1))
        self.norm = nn.LayerNorm(config.num_features, eps=config.layer_norm_eps)
        self.head = (
            nn.Linear(config.num_features, config.num_classes) if config.num_classes else nn.Identity()
        )
        self.apply(init_weights)
