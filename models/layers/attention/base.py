"""What every attention module shares: the spec it is built from and the q/k/v projection.

What the cost model, configs and the export verifier ask of a variant (its cost, softmax, prefix
tokens, partitions) is declared without torch in models/mixing.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers.pos_embed import RotaryEmbedding2D


@dataclass(frozen=True)
class AttentionSpec:
    """Everything a variant may be built from; each variant reads the fields it needs."""

    dim: int
    num_heads: int
    qkv_bias: bool = True
    num_prefix_tokens: int = 0
    rope: RotaryEmbedding2D | None = None
    partition_size: int = 7
    shift_size: int = 0
    kernel_size: int = 7
    dilation: int = 2
    relative_position_bias: bool = False


class MultiHeadProjection(nn.Module):
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


__all__ = ["AttentionSpec", "MultiHeadProjection"]
