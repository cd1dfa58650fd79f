"""Attention inside P x P partitions with a relative position bias: Swin windows (`window`, cyclic
shift on alternate layers), MaxViT `block` (unshifted windows) and `grid` (a P x P lattice spread
over the whole image).

Cost (declared in models/mixing.py): the grid is padded to partition multiples; q/k/v, the
(P^2 x P^2) softmax of every partition and the output projection run on the padded tokens; each
layer owns a (2P-1)^2 x heads bias table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.layers.attention.base import AttentionSpec, MultiHeadProjection
from models.layers.pos_embed import RelativePositionBias

SHIFT_MASK_VALUE = -100.0


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


def padding_key_mask(height: int, width: int, size: int, device: torch.device) -> torch.Tensor:
    """Additive mask (groups, 1, 1, P*P) that hides grid-partition padding from every query.

    A grid group samples the whole padded map, so padding lands inside groups of real tokens
    (unlike windows, where Swin's reference lets padded tokens take part); every group keeps at
    least its first row and column of real tokens, so no query is left with nothing to attend to.
    """
    rows = torch.arange(height + (-height) % size, device=device) < height
    cols = torch.arange(width + (-width) % size, device=device) < width
    valid = (rows[:, None] & cols[None, :]).to(torch.float32)
    valid = partition(valid[None, :, :, None], size, "grid").squeeze(-1)
    return torch.zeros_like(valid).masked_fill(valid == 0, float("-inf"))[:, None, None, :]


def masked_bias(bias: torch.Tensor, mask: torch.Tensor, batch: int) -> torch.Tensor:
    """The position bias (1, heads, L, L) plus a per-group mask (groups, 1, ., L), as one attention
    mask for the batch's (batch * groups) partitions.

    The sum is taken after broadcasting the bias to the batch, which the input decides: ONNX Runtime's
    constant folding then keeps the bias and the mask apart (L x L per head, and per group) instead of
    storing their groups x heads product in every session, about 70 MiB per Swin-T 896x896 session.
    """
    groups = mask.shape[0]
    expanded = bias.unsqueeze(0).expand(batch, groups, *bias.shape[1:])
    return (expanded + mask.to(bias.dtype).unsqueeze(0)).reshape(-1, *bias.shape[1:])


class PartitionedAttention(MultiHeadProjection):
    """Attention inside partitions of P x P tokens with a relative position bias (Swin, MaxViT block/grid).

    The feature map is zero-padded (after the block's norm) to a multiple of P, as the reference
    Swin does; in `grid` mode the padded keys are masked out (`padding_key_mask`). The cyclic shift applies only in `window` mode and only when the grid is larger than
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
            bias = masked_bias(bias, shifted_window_mask(padded_h, padded_w, size, shift, x.device), batch)
        elif self.mode == "grid" and (pad_h or pad_w):
            bias = masked_bias(bias, padding_key_mask(height, width, size, x.device), batch)
        out = self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype)))
        x = unpartition(out, size, self.mode, padded_h, padded_w)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        if pad_h or pad_w:
            x = x[:, :height, :width]
        return x.reshape(batch, height * width, channels)


def _builder(kind: str):
    mode = "grid" if kind == "grid" else "window"

    def build(spec: AttentionSpec) -> PartitionedAttention:
        shift = spec.shift_size if kind == "window" else 0
        return PartitionedAttention(spec.dim, spec.num_heads, spec.partition_size, mode, shift, spec.qkv_bias)

    return build


BUILDERS = {kind: _builder(kind) for kind in ("window", "block", "grid")}
