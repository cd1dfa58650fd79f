"""Position encodings for 2D token grids.

Additive encodings (learned 1D, learned 2D, sinusoidal 2D) share one interface,
`forward(x, grid, num_prefix_tokens) -> x`, so a ViT can be built with any of them.
Rotary (2D RoPE) and relative position bias act inside attention instead.

Resolution behaviour: learned tables are interpolated to a new grid (bicubic for the 1D table
viewed as 2D, per axis and antialiased along an axis that shrinks, so a downscaled table is
low-passed rather than aliased; linear for the row/column tables); sinusoidal, rotary and relative
bias are functions of the coordinates and need no change. A relative-position-bias table follows a
window change through `resize_relative_position_bias_table` (timm's `resize_rel_pos_bias_table`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import POS_EMBED_KINDS


def resample_grid(table: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a (1, C, H, W) table to `size`, one axis at a time.

    Upscaling is plain bicubic (align_corners=False, as timm and transformers do); an axis that
    shrinks is antialiased (PyTorch's antialias=True: the kernel widened by the scale, Pillow's
    filter), which a single 2D call could not do when one axis grows while the other shrinks.
    Bicubic is separable, so two 1D passes equal one 2D pass up to rounding.
    """
    for axis, length in enumerate(size):
        current = table.shape[2 + axis]
        if current == length:
            continue
        target = list(table.shape[2:])
        target[axis] = length
        table = F.interpolate(
            table, size=tuple(target), mode="bicubic", align_corners=False, antialias=length < current
        )
    return table


def _geometric_offsets(source: int, target: int) -> torch.Tensor:
    """Source offsets spaced by a geometric progression so the outermost lands near target // 2.

    The ratio is found by bisection on [1.01, 1.5] to 1e-6 and the last midpoint used, step for step
    as BEiT (and timm after it) do, so resized tables agree with theirs.
    """
    left, right = 1.01, 1.5
    ratio = left
    while right - left > 1e-6:
        ratio = (left + right) / 2.0
        if (1.0 - ratio ** (source // 2)) / (1.0 - ratio) > target // 2:
            right = ratio
        else:
            left = ratio
    offsets, current = [], 1.0
    for i in range(source // 2):
        offsets.append(current)
        current += ratio ** (i + 1)
    return torch.tensor([-o for o in reversed(offsets)] + [0.0] + offsets, dtype=torch.float64)


def _linear_weights(points: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(targets, points) weights of piecewise-linear interpolation, clamped to the end values."""
    targets = targets.clamp(float(points[0]), float(points[-1]))
    right = torch.searchsorted(points, targets).clamp(1, len(points) - 1)
    left = right - 1
    span = points[right] - points[left]
    frac = (targets - points[left]) / span
    weights = torch.zeros(len(targets), len(points), dtype=torch.float64)
    rows = torch.arange(len(targets))
    weights[rows, left] += 1.0 - frac
    weights[rows, right] += frac
    return weights


def resize_relative_position_bias_table(table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """A ((2Wh-1)(2Ww-1), heads) Swin bias table resized to another window, as timm's
    `resize_rel_pos_bias_table` does (its default, scipy-free path).

    The source offsets are laid out by `_geometric_offsets` (denser near zero, where attention is
    sharpest), the target offsets are the integers of the new table, and values are interpolated
    bilinearly on that uneven grid (computed in float64, returned in the table's dtype).
    """
    entries, heads = table.shape
    source = math.isqrt(entries)
    if source * source != entries:
        raise ValueError(f"relative position bias table with {entries} rows is not a square (2W-1)^2 table")
    target = (2 * window[0] - 1, 2 * window[1] - 1)
    if (source, source) == target:
        return table
    grids = []
    for length in target:
        half = float(length // 2)
        grids.append(torch.arange(-half, half + 0.1, 1.0, dtype=torch.float64))
    rows = _linear_weights(_geometric_offsets(source, target[0]), grids[0])
    cols = _linear_weights(_geometric_offsets(source, target[1]), grids[1])
    values = table.detach().to(torch.float64).t().reshape(heads, source, source)
    resized = rows @ values @ cols.t()
    return resized.reshape(heads, -1).t().contiguous().to(table.dtype)


class LearnedPosEmbed1D(nn.Module):
    """One learned vector per token position (ViT), including the prefix (class) token slots."""

    def __init__(self, dim: int, base_grid: tuple[int, int], num_prefix_tokens: int):
        super().__init__()
        self.base_grid = base_grid
        self.num_prefix_tokens = num_prefix_tokens
        self.weight = nn.Parameter(
            torch.randn(1, num_prefix_tokens + base_grid[0] * base_grid[1], dim) * 0.02
        )

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
        if tuple(grid) == tuple(self.base_grid):
            return x + self.weight
        prefix = self.weight[:, : self.num_prefix_tokens]
        patch = self.weight[:, self.num_prefix_tokens :]
        dim = patch.shape[-1]
        patch = patch.reshape(1, self.base_grid[0], self.base_grid[1], dim).permute(0, 3, 1, 2)
        patch = resample_grid(patch, grid)
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)
        return x + torch.cat((prefix, patch), dim=1)


class LearnedPosEmbed2D(nn.Module):
    """Separate learned row and column embeddings: pos(i, j) = row[i] + col[j], H+W vectors instead of H*W."""

    def __init__(self, dim: int, base_grid: tuple[int, int]):
        super().__init__()
        self.base_grid = base_grid
        self.row = nn.Parameter(torch.randn(base_grid[0], dim) * 0.02)
        self.col = nn.Parameter(torch.randn(base_grid[1], dim) * 0.02)

    @staticmethod
    def _resize(table: torch.Tensor, length: int) -> torch.Tensor:
        if table.shape[0] == length:
            return table
        resized = F.interpolate(table.t().unsqueeze(0), size=length, mode="linear", align_corners=False)
        return resized.squeeze(0).t()

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
        row = self._resize(self.row, grid[0])
        col = self._resize(self.col, grid[1])
        pos = (row[:, None, :] + col[None, :, :]).reshape(1, grid[0] * grid[1], -1)
        prefix, patch = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        return torch.cat((prefix, patch + pos), dim=1)


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sine-cosine table (N, dim): a quarter of the channels each for sin/cos of rows and columns."""
    if dim % 4:
        raise ValueError(f"sinusoidal 2D position encoding needs a dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32), indexing="ij"
    )
    y = ys.reshape(-1, 1) * omega
    x = xs.reshape(-1, 1) * omega
    return torch.cat((y.sin(), y.cos(), x.sin(), x.cos()), dim=1)


class SinCosPosEmbed2D(nn.Module):
    """Sinusoidal 2D encoding (MAE style); computed for whatever grid arrives."""

    def __init__(self, dim: int, temperature: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.temperature = temperature

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
        pos = sincos_2d(grid, self.dim, self.temperature).to(dtype=x.dtype, device=x.device)
        prefix, patch = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        return torch.cat((prefix, patch + pos), dim=1)


class NoPosEmbed(nn.Module):
    """No additive encoding (used with 2D RoPE, which acts on queries and keys)."""

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
        return x


def build_pos_embed(kind: str, dim: int, base_grid: tuple[int, int], num_prefix_tokens: int) -> nn.Module:
    """The additive position encoding module for `kind` (one of POS_EMBED_KINDS)."""
    if kind == "learned_1d":
        return LearnedPosEmbed1D(dim, base_grid, num_prefix_tokens)
    if kind == "learned_2d":
        return LearnedPosEmbed2D(dim, base_grid)
    if kind == "sincos_2d":
        return SinCosPosEmbed2D(dim)
    if kind in ("rope_2d", "none"):
        return NoPosEmbed()
    raise ValueError(f"unknown position encoding {kind!r}; choose one of {', '.join(POS_EMBED_KINDS)}")


class RotaryEmbedding2D(nn.Module):
    """2D rotary position embedding: half of each head's rotation pairs turn with the row, half with the column.

    Pairs use the rotate-half convention over the whole head (channel j with j + d/2); pairs starting
    in [0, d/4) turn by row angles and pairs starting in [d/4, d/2) by column angles.
    """

    def __init__(self, head_dim: int, theta: float = 100.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def cos_sin(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables of shape (N, head_dim) for a grid, N = rows * columns."""
        quarter = self.head_dim // 4
        freqs = 1.0 / self.theta ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
        ys, xs = torch.meshgrid(
            torch.arange(grid[0], dtype=torch.float32, device=device),
            torch.arange(grid[1], dtype=torch.float32, device=device),
            indexing="ij",
        )
        angles_y = ys.reshape(-1, 1) * freqs
        angles_x = xs.reshape(-1, 1) * freqs
        half = torch.cat((angles_y, angles_x), dim=1)
        angles = torch.cat((half, half), dim=1)
        return angles.cos(), angles.sin()

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Apply the rotation to x (..., N, head_dim)."""
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat((-second, first), dim=-1)
        return x * cos + rotated * sin


class RelativePositionBias(nn.Module):
    """Learned bias per head for every relative offset inside a (Ph, Pw) partition (Swin, MaxViT).

    The index buffer is derived from the partition size, so it is not part of the state dict.
    """

    def __init__(self, num_heads: int, partition: tuple[int, int]):
        super().__init__()
        self.partition = partition
        ph, pw = partition
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ph - 1) * (2 * pw - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(ph), torch.arange(pw), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        index = (rel[..., 0] + ph - 1) * (2 * pw - 1) + (rel[..., 1] + pw - 1)
        self.register_buffer("index", index.reshape(-1), persistent=False)

    def forward(self) -> torch.Tensor:
        """Bias of shape (1, heads, P, P) with P = Ph * Pw."""
        area = self.partition[0] * self.partition[1]
        bias = self.relative_position_bias_table[self.index].reshape(area, area, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)
