"""Attention variants behind one interface: `forward(x, grid) -> x` with x of shape (B, N, C).

N is H*W spatial tokens in row-major order (plus prefix tokens for global attention), `grid` is
(H, W). Every softmax variant ends in `F.scaled_dot_product_attention` with its bias or mask passed
as `attn_mask`, so PyTorch picks fused kernels and ONNX export emits one `Attention` node per layer.
Masks and biases depend only on the grid, so for a fixed input size they fold into constants.

One module per variant holds its math and a builder per kind it serves (its `BUILDERS`):
global_attention (global), partitioned (window, block, grid), neighborhood (neighborhood, dilated),
linear (linear). What the cost model, configs and the export verifier ask of a kind (cost, softmax,
prefix tokens, partitions) is declared without torch in models/mixing.py (`get_variant(kind)`), so
the gateway can route by cost without importing torch; importing this package fails when the two
lists differ, and an unknown kind is an error everywhere. To add a variant, declare it in
models/mixing.py and write `models/layers/attention/<name>.py` with its module and BUILDERS, added
to `_VARIANT_MODULES`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models.layers.attention import global_attention, linear, neighborhood, partitioned
from models.layers.attention.base import AttentionSpec, MultiHeadProjection
from models.layers.attention.global_attention import GlobalAttention
from models.layers.attention.linear import LinearAttention
from models.layers.attention.neighborhood import (
    NeighborhoodAttention,
    neighborhood_mask,
    neighborhood_mask_1d,
)
from models.layers.attention.partitioned import (
    SHIFT_MASK_VALUE,
    PartitionedAttention,
    partition,
    shifted_window_mask,
    unpartition,
)
from models.layers.pos_embed import RotaryEmbedding2D
from models.mixing import ATTENTION_KINDS, VARIANTS, get_variant

_VARIANT_MODULES = (global_attention, partitioned, neighborhood, linear)
BUILDERS: dict[str, Callable[[AttentionSpec], nn.Module]] = {
    kind: build for module in _VARIANT_MODULES for kind, build in module.BUILDERS.items()
}
if set(BUILDERS) != set(VARIANTS):
    raise ImportError(
        f"attention kinds declared in models/mixing.py {sorted(VARIANTS)} differ from the kinds "
        f"models/layers/attention builds {sorted(BUILDERS)}: declare and build every variant"
    )


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
    relative_position_bias: bool = False,
) -> nn.Module:
    """Instantiate the attention variant `kind` (one of ATTENTION_KINDS)."""
    variant = get_variant(kind)
    if not variant.prefix_tokens and (num_prefix_tokens or rope is not None):
        raise ValueError(f"{kind} attention works on spatial tokens only: no class token and no RoPE")
    spec = AttentionSpec(
        dim,
        num_heads,
        qkv_bias,
        num_prefix_tokens,
        rope,
        partition_size,
        shift_size,
        kernel_size,
        dilation,
        relative_position_bias,
    )
    return BUILDERS[kind](spec)


__all__ = [
    "ATTENTION_KINDS",
    "BUILDERS",
    "SHIFT_MASK_VALUE",
    "VARIANTS",
    "AttentionSpec",
    "GlobalAttention",
    "LinearAttention",
    "MultiHeadProjection",
    "NeighborhoodAttention",
    "PartitionedAttention",
    "build_attention",
    "get_variant",
    "neighborhood_mask",
    "neighborhood_mask_1d",
    "partition",
    "shifted_window_mask",
    "unpartition",
]
