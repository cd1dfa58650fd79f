"""What every attention variant shares: the q/k/v projection, and the record through which the
registry, the cost model and the export verifier ask a variant about itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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


@dataclass(frozen=True)
class MixingShape:
    """One attention layer's input as the cost model sees it."""

    grid: tuple[int, int]
    prefix: int
    dim: int
    heads: int
    partition: int

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class CostTally(Protocol):
    """The part of models.cost's tally a variant's cost function adds to."""

    params: int

    def softmax_attention(self, groups: int, length: int, heads: int, head_dim: int) -> None: ...

    def linear_attention(self, tokens: int, heads: int, head_dim: int) -> None: ...


@dataclass(frozen=True)
class AttentionVariant:
    """A token mixer as the rest of vitserve knows it.

    build: the module for an AttentionSpec. cost: adds the variant's token-mixing FLOPs and its own
    parameters (e.g. bias tables) to the tally and returns how many tokens its q/k/v and output
    projections run on (more than the input when it pads). softmax: it runs softmax attention
    through SDPA, so a fused ONNX export has one Attention node for it. prefix_tokens: it accepts
    class tokens and RoPE (only global attention does). partitioned: it pads the grid to multiples
    of `partition_size`, which buckets should avoid.
    """

    kind: str
    build: Callable[[AttentionSpec], nn.Module]
    cost: Callable[[CostTally, MixingShape], int]
    softmax: bool
    prefix_tokens: bool = False
    partitioned: bool = False


def dense_softmax_cost(tally: CostTally, shape: MixingShape) -> int:
    """Softmax attention of every token with every token: one N x N score matrix per head."""
    tally.softmax_attention(1, shape.tokens, shape.heads, shape.head_dim)
    return shape.tokens


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


__all__ = [
    "AttentionSpec",
    "AttentionVariant",
    "CostTally",
    "MixingShape",
    "MultiHeadProjection",
    "dense_softmax_cost",
]
