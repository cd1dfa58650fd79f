"""Cost model: tokens, FLOPs, attention memory and parameters of a backbone at an input size.

The router decides per request from these numbers and the benchmarks report them beside measured
speed, so they count what the modules in models/ actually execute, not an idealized architecture:

- FLOPs are 2 per multiply-add, for convolutions, Linear layers and attention matmuls, as
  `torch.utils.flop_counter.FlopCounterMode` counts them; norms, activations, softmax and
  position encodings are elementwise and left out, as there.
- The input is padded to a patch multiple (`ceil(H/p) x ceil(W/p)` tokens).
- Token mixing is costed by each attention variant's own `cost` (declared in models/mixing.py,
  without torch; an unknown kind is an error): partitioned attention (Swin windows, MaxViT
  block/grid) pads the feature map to a partition multiple and the padded tokens go through qkv,
  attention and the output projection; neighborhood and dilated attention run as full SDPA with a
  boolean mask, so their executed attention FLOPs and score memory equal global attention's (N^2),
  not the ideal N * k^2; linear attention computes phi(K)^T V, phi(Q) (phi(K)^T V) and the
  normalizer, 4 N d^2 + 2 N d per head, and materializes no score matrix.
- Class tokens take part in the qkv, attention and MLP cost of ViT (not in `tokens`).
- Swin patch merging pads odd grids before halving them.

Estimates are cached per (config, size, batch): they are pure functions of frozen configs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from models.config import BackboneConfig, NATConfig, SwinConfig, ViTConfig
from models.mixing import MixingShape, get_variant, padded_grid
from models.registry import get_config

FP32_BYTES = 4


@dataclass(frozen=True)
class Cost:
    """Executed cost of one forward pass at a given input size and batch.

    tokens: patch tokens of the first stage (padded grid, class tokens excluded).
    tokens_per_stage: spatial tokens entering each stage (one entry for isotropic models).
    attention_flops: token-mixing matmuls (QK^T and AV, or linear attention's kernel products).
    flops: everything counted: patch conv, Linear layers, attention matmuls, patch merging, head.
    attention_bytes: the largest fp32 score tensor one attention layer materializes for the batch
        (batch * groups * heads * L * S * 4) when SDPA does not fuse it away; 0 for linear attention.
    activation_bytes: the largest fp32 output of one conv or Linear layer for the batch.
    params: trainable parameters (independent of the input size).
    """

    tokens: int
    tokens_per_stage: tuple[int, ...]
    attention_flops: int
    flops: int
    attention_bytes: int
    activation_bytes: int
    params: int

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def estimate_cost(model: str | BackboneConfig, height: int, width: int, batch: int = 1) -> Cost:
    """Cost of `model` (registry name or config) on a batch of `height` x `width` inputs."""
    for name, value in (("height", height), ("width", width), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    config = get_config(model) if isinstance(model, str) else model
    return _estimate(config, height, width, batch)


@functools.lru_cache(maxsize=4096)
def _estimate(config: BackboneConfig, height: int, width: int, batch: int) -> Cost:
    if isinstance(config, ViTConfig):
        return _vit_cost(config, height, width, batch)
    if isinstance(config, SwinConfig):
        return _swin_cost(config, height, width, batch)
    if isinstance(config, NATConfig):
        return _nat_cost(config, height, width, batch)
    raise TypeError(f"no cost model for config family {config.family!r}; expected a ViT, Swin or NAT config")


class _Tally:
    """Accumulates FLOPs, memory peaks and parameters layer by layer (each layer runs once)."""

    def __init__(self, batch: int):
        self.batch = batch
        self.flops = 0
        self.attention_flops = 0
        self.attention_bytes = 0
        self.activation_bytes = 0
        self.params = 0

    def dense(self, tokens: int, fan_in: int, fan_out: int, bias: bool = True) -> None:
        """A Linear layer, or a patch conv seen as one (fan_in = channels * kernel area)."""
        self.flops += 2 * self.batch * tokens * fan_in * fan_out
        self.activation_bytes = max(self.activation_bytes, self.batch * tokens * fan_out * FP32_BYTES)
        self.params += fan_in * fan_out + (fan_out if bias else 0)

    def norm(self, dim: int) -> None:
        self.params += 2 * dim

    def softmax_attention(self, groups: int, length: int, heads: int, head_dim: int) -> None:
        """SDPA over `groups` independent sequences of `length` tokens: QK^T and AV."""
        scores = self.batch * groups * heads * length * length
        flops = 2 * 2 * scores * head_dim
        self.flops += flops
        self.attention_flops += flops
        self.attention_bytes = max(self.attention_bytes, scores * FP32_BYTES)

    def linear_attention(self, tokens: int, heads: int, head_dim: int) -> None:
        flops = self.batch * heads * (4 * tokens * head_dim * head_dim + 2 * tokens * head_dim)
        self.flops += flops
        self.attention_flops += flops


def _block(
    tally: _Tally,
    kind: str,
    grid: tuple[int, int],
    prefix: int,
    dim: int,
    heads: int,
    mlp_ratio: float,
    qkv_bias: bool,
    partition: int,
) -> None:
    """One pre-norm transformer block (models.layers.block.Block) around attention `kind`; the
    variant's own cost (models/mixing.py) counts its token mixing."""
    tokens = prefix + grid[0] * grid[1]
    mixed = get_variant(kind).cost(tally, MixingShape(grid, prefix, dim, heads, partition))
    tally.norm(dim)
    tally.dense(mixed, dim, 3 * dim, qkv_bias)
    tally.dense(mixed, dim, dim)
    tally.norm(dim)
    hidden = int(dim * mlp_ratio)
    tally.dense(tokens, dim, hidden)
    tally.dense(tokens, hidden, dim)


def _head(tally: _Tally, config: BackboneConfig, dim: int) -> None:
    tally.norm(dim)
    if config.num_classes:
        tally.dense(1, dim, config.num_classes)


def _finish(tally: _Tally, tokens_per_stage: tuple[int, ...]) -> Cost:
    return Cost(
        tokens=tokens_per_stage[0],
        tokens_per_stage=tokens_per_stage,
        attention_flops=tally.attention_flops,
        flops=tally.flops,
        attention_bytes=tally.attention_bytes,
        activation_bytes=tally.activation_bytes,
        params=tally.params,
    )


def _pos_embed_params(config: ViTConfig, prefix: int) -> int:
    rows, cols = config.base_grid
    if config.pos_embed == "learned_1d":
        return (prefix + rows * cols) * config.embed_dim
    if config.pos_embed == "learned_2d":
        return (rows + cols) * config.embed_dim
    return 0


def _vit_cost(config: ViTConfig, height: int, width: int, batch: int) -> Cost:
    tally = _Tally(batch)
    dim = config.embed_dim
    prefix = 1 if config.class_token else 0
    grid = padded_grid(height, width, config.patch_size)
    tokens = grid[0] * grid[1]
    tally.dense(tokens, config.in_chans * config.patch_size**2, dim)
    tally.params += prefix * dim + _pos_embed_params(config, prefix)
    for kind in config.attention_kinds:
        _block(
            tally,
            kind,
            grid,
            prefix,
            dim,
            config.num_heads,
            config.mlp_ratio,
            config.qkv_bias,
            config.partition_size,
        )
    _head(tally, config, dim)
    return _finish(tally, (tokens,))


def _swin_cost(config: SwinConfig, height: int, width: int, batch: int) -> Cost:
    tally = _Tally(batch)
    grid = padded_grid(height, width, config.patch_size)
    tally.dense(grid[0] * grid[1], config.in_chans * config.patch_size**2, config.embed_dim)
    tally.norm(config.embed_dim)
    stage_tokens = []
    last = len(config.depths) - 1
    for stage, (depth, heads) in enumerate(zip(config.depths, config.num_heads, strict=True)):
        dim = config.stage_dim(stage)
        stage_tokens.append(grid[0] * grid[1])
        for _ in range(depth):
            _block(
                tally, "window", grid, 0, dim, heads, config.mlp_ratio, config.qkv_bias, config.window_size
            )
        if stage < last:
            grid = padded_grid(grid[0], grid[1], 2)
            tally.norm(4 * dim)
            tally.dense(grid[0] * grid[1], 4 * dim, 2 * dim, bias=False)
    _head(tally, config, config.num_features)
    return _finish(tally, tuple(stage_tokens))


def _halved(grid: tuple[int, int]) -> tuple[int, int]:
    """A 3x3 stride-2 convolution with padding 1 maps a side s to ceil(s / 2)."""
    return padded_grid(grid[0], grid[1], 2)


def _nat_cost(config: NATConfig, height: int, width: int, batch: int) -> Cost:
    """Convolutions are costed as dense layers over their output positions (fan-in = channels x 9);
    each block's neighborhood attention by its variant, plus its (2k-1)^2 x heads bias table."""
    tally = _Tally(batch)
    half = config.embed_dim // 2
    grid = _halved((height, width))
    tally.dense(grid[0] * grid[1], config.in_chans * 9, half)
    grid = _halved(grid)
    tally.dense(grid[0] * grid[1], half * 9, config.embed_dim)
    tally.norm(config.embed_dim)
    kinds = iter(config.attention_kinds)
    stage_tokens = []
    last = len(config.depths) - 1
    for stage, (depth, heads) in enumerate(zip(config.depths, config.num_heads, strict=True)):
        dim = config.stage_dim(stage)
        stage_tokens.append(grid[0] * grid[1])
        for _ in range(depth):
            _block(tally, next(kinds), grid, 0, dim, heads, config.mlp_ratio, config.qkv_bias, 0)
            tally.params += heads * (2 * config.kernel_size - 1) ** 2
        if stage < last:
            grid = _halved(grid)
            tally.dense(grid[0] * grid[1], 9 * dim, 2 * dim, bias=False)
            tally.norm(2 * dim)
    _head(tally, config, config.num_features)
    return _finish(tally, tuple(stage_tokens))


__all__ = ["Cost", "estimate_cost"]
