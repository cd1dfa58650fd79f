"""Kernelized linear attention (elu + 1 feature map): O(N) in tokens, no softmax, no SDPA.

Cost (declared in models/mixing.py): phi(K)^T V, phi(Q) (phi(K)^T V) and the normalizer
phi(Q) sum phi(K), 4 N d^2 + 2 N d per head; no score matrix is materialized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.layers.attention.base import AttentionSpec, MultiHeadProjection


class LinearAttention(MultiHeadProjection):
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


def _build(spec: AttentionSpec) -> LinearAttention:
    return LinearAttention(spec.dim, spec.num_heads, spec.qkv_bias)


BUILDERS = {"linear": _build}
