"""Isotropic vision transformers: ViT (global attention) and trunks built from other attention variants.

Any input resolution works: the patch grid follows the input (padded to a patch multiple),
learned position tables are interpolated to it, and sinusoidal/rotary encodings are computed
for it. Spatial attention variants (neighborhood, dilated, block/grid, linear) need no change
either: their masks and partitions are derived from the grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.config import ViTConfig
from models.features import feature_indices, tokens_to_map
from models.layers import Block, PatchEmbed, RotaryEmbedding2D, build_attention, build_pos_embed, init_weights
from models.output import ModelOutput


class VisionTransformer(nn.Module):
    """Patch embedding -> [class token] -> position encoding -> blocks -> norm -> pool -> head."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.num_prefix_tokens = 1 if config.class_token else 0
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if config.class_token else None
        self.pos_embed = build_pos_embed(config.pos_embed, dim, config.base_grid, self.num_prefix_tokens)
        head_dim = dim // config.num_heads
        rope = RotaryEmbedding2D(head_dim, config.rope_theta) if config.pos_embed == "rope_2d" else None
        self.blocks = nn.ModuleList(
            Block(
                dim,
                build_attention(
                    kind,
                    dim,
                    config.num_heads,
                    qkv_bias=config.qkv_bias,
                    num_prefix_tokens=self.num_prefix_tokens,
                    rope=rope,
                    partition_size=config.partition_size,
                    kernel_size=config.kernel_size,
                    dilation=config.dilation,
                ),
                config.mlp_ratio,
                config.layer_norm_eps,
            )
            for kind in config.attention_kinds
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes else nn.Identity()
        self.apply(init_weights)

    def _tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Embedded tokens with prefix and position encoding, ready for the blocks, and the grid."""
        x, grid = self.patch_embed(pixel_values)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_embed(x, grid, self.num_prefix_tokens), grid

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Final normed token sequence (B, prefix + N, C)."""
        x, grid = self._tokens(pixel_values)
        for block in self.blocks:
            x = block(x, grid)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool `forward_features` output (class token or mean of spatial tokens), then classify;
        `pre_logits=True` returns the pooled embedding."""
        if self.config.global_pool == "token":
            embedding = features[:, 0]
        else:
            embedding = features[:, self.num_prefix_tokens :].mean(dim=1)
        return embedding if pre_logits else self.head(embedding)

    def forward_intermediates(
        self,
        pixel_values: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Block outputs as (B, C, H, W) maps of the spatial tokens (timm's API; `norm` applies the
        final norm to each), and unless `intermediates_only` the `forward_features` output too."""
        take = feature_indices(indices, len(self.blocks))
        x, grid = self._tokens(pixel_values)
        maps = []
        for index, block in enumerate(self.blocks):
            x = block(x, grid)
            if index in take:
                out = self.norm(x) if norm else x
                maps.append(tokens_to_map(out[:, self.num_prefix_tokens :], grid))
        if intermediates_only:
            return maps
        return self.norm(x), maps

    def forward(self, pixel_values: torch.Tensor) -> ModelOutput:
        embedding = self.forward_head(self.forward_features(pixel_values), pre_logits=True)
        return ModelOutput(self.head(embedding), embedding)
