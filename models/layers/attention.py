"""Attention variants behind one interface: `forward(x, grid) -> x` with x of shape (B, N, C).

N is H*W spatial tokens in row-major order (plus prefix tokens for global attention), `grid`
is (H, W). Every softmax variant ends in `F.scaled_dot_product_attention` with its bias or
mask passed as `attn_mask`, so PyTorch picks fused kernels and ONNX export emits one
`Attention` node per layer. Masks and biases depend only on the grid, so for a fixed input
size they fold into constants at export time.

Variants:
- global: every token attends to every token (ViT), optional 2D RoPE.
- window / block: non-overlapping P x P windows with relative position bias; `window` adds the
  Swin cyclic shift on alternate layers (block is the unshifted MaxViT form).
- grid: a P x P grid of tokens spread over the whole image (MaxViT), relative position bias.
- neighborhood / dilated: each token attends to its k x k neighbours, the window shifted inward at
  borders (NATTEN semantics); `dilated` takes every d-th token (DiNAT). Runs as SDPA with a boolean
  mask, so its executed cost is that of global attention, not N*k^2.
- linear: kernelized attention with the elu+1 feature map, O(N) in tokens; no softmax, no SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.pos_embed import RelativePositionBias, RotaryEmbedding2D

ATTENTION_KINDS = ("global", "window", "block", "grid", "neighborhood", "dilated", "linear")
SHIFT_MASK_VALUE = -100.0


class _MultiHeadProjection(nn.Module):
    """Fused q/k/v projection and output projection shared by every variant."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> q, k, v each (B, heads, N, head_dim)."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) -> projected (B, N, C)."""
        batch, _, tokens, _ = x.shape
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim))


class GlobalAttention(_MultiHeadProjection):
    """Full multi-head self-attention over all tokens; prefix tokens are exempt from RoPE."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        num_prefix_tokens: int = 0,
        rope: RotaryEmbedding2D | None = None,
    ):
        super().__init__(dim, num_heads, qkv_bias)
        self.num_prefix_tokens = num_prefix_tokens
        self.rope = rope

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(grid, x.device)
            p = self.num_prefix_tokens
            q = torch.cat((q[:, :, :p], self.rope.rotate(q[:, :, p:], cos, sin)), dim=2)
            k = torch.cat((k[:, :, :p], self.rope.rotate(k[:, :, p:], cos, sin)), dim=2)
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v))


def partition(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `size` -> (B * groups, size * size, C).

    `window`: each group is a contiguous size x size window. `grid`: each group is a size x size
    lattice of tokens spaced H/size apart, covering the whole image.
    """
    batch, height, width, channels = x.shape
    if mode == "window":
        x = x.view(batch, height // size, size, width // size, size, channels).permute(0, 1, 3, 2, 4, 5)
    else:
        x = x.view(batch, size, height // size, size, width // size, channels).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, size * size, channels)


def unpartition(groups: torch.Tensor, size: int, mode: str, height: int, width: int) -> torch.Tensor:
    """Inverse of `partition`: (B * groups, size * size, C) -> (B, H, W, C)."""
    channels = groups.shape[-1]
    if mode == "window":
        x = groups.view(-1, height // size, width // size, size, size, channels).permute(0, 1, 3, 2, 4, 5)
    else:
        x = groups.view(-1, height // size, width // size, size, size, channels).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, height, width, channels)


def shifted_window_mask(height: int, width: int, size: int, shift: int, device: torch.device) -> torch.Tensor:
    """Additive mask (windows, 1, P, P) that keeps tokens from attending across the seams of a cyclic shift.

    After rolling by -shift, the last window row/column mixes tokens from opposite image edges;
    positions carry a region id (3 per axis) and pairs from different regions get SHIFT_MASK_VALUE.
    """
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    row_region = (rows >= height - size).long() + (rows >= height - shift).long()
    col_region = (cols >= width - size).long() + (cols >= width - shift).long()
    region = (row_region[:, None] * 3 + col_region[None, :]).to(torch.float32)
    region = partition(region[None, :, :, None], size, "window").squeeze(-1)
    differs = region[:, None, :] != region[:, :, None]
    return torch.zeros_like(differs, dtype=torch.float32).masked_fill(differs, SHIFT_MASK_VALUE).unsqueeze(1)


class PartitionedAttention(_MultiHeadProjection):
    """Attention inside partitions of P x P tokens with a relative position bias (Swin, MaxViT block/grid).

    The feature map is zero-padded (after the block's norm) to a multiple of P, as the reference
    Swin does. The cyclic shift applies only in `window` mode and only when the grid is larger than
    one window; otherwise shifting would wrap a single window onto itself.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        partition_size: int,
        mode: str = "window",
        shift_size: int = 0,
        qkv_bias: bool = True,
    ):
        super().__init__(dim, num_heads, qkv_bias)
        if mode not in ("window", "grid"):
            raise ValueError(f"partition mode must be 'window' or 'grid', got {mode!r}")
        if shift_size and mode != "window":
            raise ValueError("a cyclic shift only applies to window partitions")
        if not 0 <= shift_size < partition_size:
            raise ValueError(f"shift {shift_size} must be in [0, {partition_size})")
        self.partition_size = partition_size
        self.mode = mode
        self.shift_size = shift_size
        self.relative_position_bias = RelativePositionBias(num_heads, (partition_size, partition_size))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, _, channels = x.shape
        height, width = grid
        size = self.partition_size
        x = x.view(batch, height, width, channels)
        pad_h, pad_w = (-height) % size, (-width) % size
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = height + pad_h, width + pad_w
        shift = self.shift_size if min(height, width) > size else 0
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        groups = partition(x, size, self.mode)
        q, k, v = self.split_heads(groups)
        bias = self.relative_position_bias()
        if shift:
            mask = shifted_window_mask(padded_h, padded_w, size, shift, x.device).to(bias.dtype)
            bias = (bias + mask).unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(-1, *bias.shape[1:])
        out = self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype)))
        x = unpartition(out, size, self.mode, padded_h, padded_w)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        if pad_h or pad_w:
            x = x[:, :height, :width]
        return x.reshape(batch, height * width, channels)


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


class NeighborhoodAttention(_MultiHeadProjection):
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

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        mask = neighborhood_mask(grid, self.kernel_size, self.dilation).to(x.device)
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class LinearAttention(_MultiHeadProjection):
    """Kernelized linear attention (Katharopoulos et al.) with phi(x) = elu(x) + 1.

    out_i = phi(q_i) . sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j) + eps): cost linear in tokens.
    It is computed with means instead of sums (eps scaled alike): the same ratio, but both products
    stay of order one at any token count. The sums grow with tokens x head_dim and pass fp16's 65504
    above about a thousand tokens, which made fp16 outputs zero or NaN at 672 px and up; phi(k) is
    scaled by 1/N before the matmuls, so no fp16 intermediate holds a sum over tokens.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__(dim, num_heads, qkv_bias)
        self.eps = eps

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        q = F.elu(q) + 1.0
        tokens = k.shape[2]
        k = (F.elu(k) + 1.0) / tokens
        kv = torch.matmul(k.transpose(-2, -1), v)
        normalizer = torch.matmul(q, k.sum(dim=2, keepdim=True).transpose(-2, -1))
        return self.merge_heads(torch.matmul(q, kv) / (normalizer + self.eps / tokens))


def build_attention(
    kind: str,
    dim: int,
    num_heads: int,
    *,
    qkv_bias: bool = True,
    num_prefix_tokens: int = 0,
    rope: RotaryEmbedding2D | None = None,
    partition_size: int = 7,
    shift_size: int = 0,
    kernel_size: int = 7,
    dilation: int = 2,
) -> nn.Module:
    """Instantiate the attention variant `kind` (one of ATTENTION_KINDS)."""
    if kind != "global" and (num_prefix_tokens or rope is not None):
        raise ValueError(f"{kind} attention works on spatial tokens only: no class token and no RoPE")
    if kind == "global":
        return GlobalAttention(dim, num_heads, qkv_bias, num_prefix_tokens, rope)
    if kind in ("window", "block"):
        shift = shift_size if kind == "window" else 0
        return PartitionedAttention(dim, num_heads, partition_size, "window", shift, qkv_bias)
    if kind == "grid":
        return PartitionedAttention(dim, num_heads, partition_size, "grid", 0, qkv_bias)
    if kind == "neighborhood":
        return NeighborhoodAttention(dim, num_heads, kernel_size, 1, qkv_bias)
    if kind == "dilated":
        return NeighborhoodAttention(dim, num_heads, kernel_size, dilation, qkv_bias)
    if kind == "linear":
        return LinearAttention(dim, num_heads, qkv_bias)
    raise ValueError(f"unknown attention kind {kind!r}; choose one of {', '.join(ATTENTION_KINDS)}")
