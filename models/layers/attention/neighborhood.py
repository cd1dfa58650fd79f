"""Neighborhood attention (NAT) and its dilated form (DiNAT): each token attends to its k x k
neighbours, the window shifted inward at borders (NATTEN semantics); `dilated` takes every d-th token.

It runs as SDPA with a boolean mask, exportable with no custom kernel, so its executed cost is that of
global attention (N x N scores), not the ideal N * k^2; the cost model says so. The mask depends only
on the grid: it is built once per (grid, device) and cached on the module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.attention.base import AttentionSpec, MultiHeadProjection


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


def neighborhood_offsets_1d(length: int, dilation: int) -> torch.Tensor:
    """(L, L) offset of key j from query i in units of the dilation (j//d - i//d), NATTEN's bias index
    minus k - 1; only meaningful where `neighborhood_mask_1d` allows the pair."""
    index = torch.arange(length) // dilation
    return index[None, :] - index[:, None]


class NeighborhoodAttention(MultiHeadProjection):
    """Neighborhood attention (NAT) and its dilated form (DiNAT) as SDPA with a mask.

    With `relative_position_bias` (the hierarchical NAT / DiNAT), each head learns a (2k-1, 2k-1)
    table indexed by the key's offset from the query, as NATTEN's `rpb`; the additive mask is then
    that bias where the pair is a neighbour and -inf elsewhere.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        qkv_bias: bool = True,
        relative_position_bias: bool = False,
    ):
        super().__init__(dim, num_heads, qkv_bias)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"neighborhood kernel size must be odd and positive, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.rpb = (
            nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            if relative_position_bias
            else None
        )
        if self.rpb is not None:
            nn.init.trunc_normal_(self.rpb, std=0.02)
        self._masks: dict[tuple[tuple[int, int], torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _build_mask(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mask = neighborhood_mask(grid, self.kernel_size, self.dilation).to(device)
        width = 2 * self.kernel_size - 1
        rows = neighborhood_offsets_1d(grid[0], self.dilation).clamp(
            -self.kernel_size + 1, self.kernel_size - 1
        )
        cols = neighborhood_offsets_1d(grid[1], self.dilation).clamp(
            -self.kernel_size + 1, self.kernel_size - 1
        )
        index = (rows[:, None, :, None] + self.kernel_size - 1) * width + (
            cols[None, :, None, :] + self.kernel_size - 1
        )
        n = grid[0] * grid[1]
        return mask, index.reshape(n, n).to(device)

    def masks(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The (N, N) neighbour mask and bias-table index for `grid` on `device`, built on first use
        and then reused.

        Under torch.export / dynamo tracing they are built in the graph and not cached, so the cache
        never holds a tracing-time (fake) tensor; such graphs fold them into constants anyway.
        """
        if torch.compiler.is_compiling():
            return self._build_mask(grid, device)
        key = (tuple(grid), torch.device(device))
        if key not in self._masks:
            self._masks[key] = self._build_mask(grid, device)
        return self._masks[key]

    def mask(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The cached (N, N) boolean neighbour mask for `grid` on `device`."""
        return self.masks(grid, device)[0]

    def attention_mask(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """What SDPA gets: the boolean mask, or (heads, N, N) bias with -inf outside the neighbourhood."""
        mask, index = self.masks(grid, device)
        if self.rpb is None:
            return mask
        bias = self.rpb.flatten(1)[:, index]
        return bias.masked_fill(~mask, float("-inf"))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        attn_mask = self.attention_mask(grid, x.device)
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))


def _builder(dilated: bool):
    def build(spec: AttentionSpec) -> NeighborhoodAttention:
        dilation = spec.dilation if dilated else 1
        return NeighborhoodAttention(
            spec.dim, spec.num_heads, spec.kernel_size, dilation, spec.qkv_bias, spec.relative_position_bias
        )

    return build


BUILDERS = {"neighborhood": _builder(False), "dilated": _builder(True)}
