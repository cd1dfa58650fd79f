"""Patch embedding: image -> (B, N, C) tokens plus the token grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (a strided conv), padding right/bottom to a patch multiple.

    Padding instead of cropping keeps every pixel of arbitrary input sizes: 512x512 with patch 14
    becomes a 37x37 grid, not 36x36.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_eps: float | None = None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if norm_eps is not None else nn.Identity()

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        height, width = pixel_values.shape[-2:]
        pad_h = (-height) % self.patch_size
        pad_w = (-width) % self.patch_size
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        x = self.proj(pixel_values)
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid
