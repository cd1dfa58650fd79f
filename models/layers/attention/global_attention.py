"""Global multi-head self-attention (ViT): every token attends to every token, optional 2D RoPE.

Cost (declared in models/mixing.py): one N x N softmax per head (N includes prefix tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.layers.attention.base import AttentionSpec, MultiHeadProjection
from models.layers.pos_embed import RotaryEmbedding2D


class GlobalAttention(MultiHeadProjection):
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


def _build(spec: AttentionSpec) -> GlobalAttention:
    return GlobalAttention(spec.dim, spec.num_heads, spec.qkv_bias, spec.num_prefix_tokens, spec.rope)


BUILDERS = {"global": _build}
