"""Hierarchical neighborhood-attention transformers: NAT and DiNAT.

As in the papers (and NATTEN's reference models): an overlapping convolutional tokenizer to 1/4
resolution, four stages of pre-norm blocks whose token mixer is neighborhood attention (k x k,
NATTEN border semantics, dilated per block in DiNAT) with a relative position bias, and a 3x3
stride-2 convolution with LayerNorm between stages. Any input resolution works: the stride-2
convolutions (padding 1) map a side s to ceil(s / 2), and masks follow the grid.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import NATConfig
from models.hierarchical import HierarchicalBackbone, HierarchicalStage
from models.layers import Block, build_attention, init_weights


def _to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid[0], grid[1])


def _to_tokens(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


class ConvTokenizer(nn.Module):
    """Two 3x3 stride-2 convolutions (3 -> C/2 -> C), then LayerNorm: overlapping patches at 1/4."""

    def __init__(self, in_chans: int, dim: int, eps: float):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, grid = _to_tokens(self.proj(pixel_values))
        return self.norm(x), grid


class ConvDownsampler(nn.Module):
    """3x3 stride-2 convolution C -> 2C without bias, then LayerNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim, eps=eps)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        x, grid = _to_tokens(self.reduction(_to_map(x, grid)))
        return self.norm(x), grid


class NATStage(HierarchicalStage):
    """Neighborhood-attention blocks (each with its dilation), then an optional downsampler."""

    def __init__(self, config: NATConfig, stage: int, downsample: bool):
        super().__init__()
        dim = config.stage_dim(stage)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                build_attention(
                    "neighborhood" if config.dilation(stage, i) == 1 else "dilated",
                    dim,
                    config.num_heads[stage],
                    qkv_bias=config.qkv_bias,
                    kernel_size=config.kernel_size,
                    dilation=config.dilation(stage, i),
                    relative_position_bias=True,
                ),
                config.mlp_ratio,
                config.layer_norm_eps,
            )
            for i in range(config.depths[stage])
        )
        self.downsample = ConvDownsampler(dim, config.layer_norm_eps) if downsample else None


class NeighborhoodTransformer(HierarchicalBackbone):
    """Tokenizer -> stages -> norm -> mean pool -> head."""

    def __init__(self, config: NATConfig):
        super().__init__()
        self.config = config
        self.patch_embed = ConvTokenizer(config.in_chans, config.embed_dim, config.layer_norm_eps)
        last = len(config.depths) - 1
        self.stages = nn.ModuleList(NATStage(config, s, downsample=s < last) for s in range(last + 1))
        self.norm = nn.LayerNorm(config.num_features, eps=config.layer_norm_eps)
        self.head = (
            nn.Linear(config.num_features, config.num_classes) if config.num_classes else nn.Identity()
        )
        self.apply(init_weights)


__all__ = ["NeighborhoodTransformer"]
