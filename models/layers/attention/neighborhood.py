"""Neighborhood attention (NAT) and its dilated form (DiNAT): each token attends to its k x k
neighbours, the window shifted inward at borders (NATTEN semantics); `dilated` takes every d-th token.

It runs as SDPA with a boolean mask, exportable with no custom kernel, so its executed cost is that of
global attention (N x N scores), not the ideal N * k^2; the cost model says so. The mask depends only
on the grid: it is built once per (grid, device) and cached on the module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.layers.attention.base import (
    AttentionVariant,
    MultiHeadProjection,
    dense_softmax_cost,
)


def neighborhood_mask_1d(length: int, kernel_size: int, dilation: int) -> torch.Tensor:
    """(L, L) boolean: query i may attend key j along one axis (NATTEN semantics).

    Tokens split into `dilation` interleaved groups (i mod d); inside its group a query sees the
    kernel_size nearest members, the window shifted inward at the borders rather than truncated.
    """
    i = torch.arange(length)
    group = i % dilation
    index = i // dilation
    group_len = (length - group + dilation - 1) // dilation
    span = torch.clamp(group_len, max=kernel_size)
    start = torch.minimum(torch.clamp(index - kernel_size // 2, min=0), group_len - span)
    key_index = (i // dilation)[None, :]
    same_group = (i % dilation)[None, :] == group[:, None]
    return same_group & (key_index >= start[:, None]) & (key_index < (start + span)[:, None])


def neighborhood_mask(grid: tuple[int, int], kernel_size: int, dilation: int) -> torch.Tensor:
    """(N, N) boolean mask over a row-major grid: the product of the row and column neighbourhoods."""
    rows = neighborhood_mask_1d(grid[0], kernel_size, dilation)
    cols = neighborhood_mask_1d(grid[1], kernel_size, dilation)
    n = grid[0] * grid[1]
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(n, n)


class NeighborhoodAttention(MultiHeadProjection):
    """Neighborhood attention (NAT) and its dilated form (DiNAT) as SDPA with a boolean mask."""

    def __init__(
        self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, qkv_bias: bool = True
    ):
        super().__init__(dim, num_heads, qkv_bias)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"neighborhood kernel size must be odd and positive, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        self.kernel_size = kernel_size
        self.dilation = dilation
        self._masks: dict[tuple[tuple[int, int], torch.device], torch.Tensor] = {}

    def mask(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The (N, N) mask for `grid` on `device`, built on first use and then reused.

        Under torch.export / dynamo tracing it is built in the graph and not cached, so the cache
        never holds a tracing-time (fake) tensor; such graphs fold it into a constant anyway.
        """
        if torch.compiler.is_compiling():
            return neighborhood_mask(grid, self.kernel_size, self.dilation).to(device)
        key = (tuple(grid), torch.device(device))
        if key not in self._masks:
            self._masks[key] = neighborhood_mask(grid, self.kernel_size, self.dilation).to(device)
        return self._masks[key]

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(grid, x.device)))


VARIANTS = (
    AttentionVariant(
        "neighborhood",
        lambda spec: NeighborhoodAttention(spec.dim, spec.num_heads, spec.kernel_size, 1, spec.qkv_bias),
        dense_softmax_cost,
        softmax=True,
    ),
    AttentionVariant(
        "dilated",
        lambda spec: NeighborhoodAttention(
            spec.dim, spec.num_heads, spec.kernel_size, spec.dilation, spec.qkv_bias
        ),
        dense_softmax_cost,
        softmax=True,
    ),
)
