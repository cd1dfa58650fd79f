"""Composable building blocks shared by every backbone family."""

from models.layers.attention import (
    ATTENTION_KINDS,
    GlobalAttention,
    LinearAttention,
    NeighborhoodAttention,
    PartitionedAttention,
    build_attention,
)
from models.layers.block import Block, Mlp, init_weights
from models.layers.patch_embed import PatchEmbed
from models.layers.pos_embed import (
    POS_EMBED_KINDS,
    LearnedPosEmbed1D,
    LearnedPosEmbed2D,
    RelativePositionBias,
    RotaryEmbedding2D,
    SinCosPosEmbed2D,
    build_pos_embed,
)

__all__ = [
    "ATTENTION_KINDS",
    "POS_EMBED_KINDS",
    "Block",
    "GlobalAttention",
    "LearnedPosEmbed1D",
    "LearnedPosEmbed2D",
    "LinearAttention",
    "Mlp",
    "NeighborhoodAttention",
    "PartitionedAttention",
    "PatchEmbed",
    "RelativePositionBias",
    "RotaryEmbedding2D",
    "SinCosPosEmbed2D",
    "build_attention",
    "build_pos_embed",
    "init_weights",
]
