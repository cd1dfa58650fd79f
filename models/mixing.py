"""The token mixers as configs, the cost model and the router know them, without PyTorch.

Each attention kind declares here what the rest of vitserve asks of it: its cost (the FLOPs of its
token mixing and the tokens its projections run on), whether it runs softmax attention through
SDPA (one fused Attention node per layer in an ONNX export), whether it accepts class tokens and
RoPE, and whether it pads the grid to partitions. The modules that compute them live in
models/layers/attention/ (one file per variant) and register a builder per kind there; an import
check keeps the two lists equal. Keeping this half free of torch lets the gateway read configs and
route by cost in a process that never imports torch (README "Memory"): serving an ONNX repository
needs neither the model code nor its 176 MiB.

To add a variant: declare it in VARIANTS below (with its cost function) and add its module, with a
builder for its kind, under models/layers/attention/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


def padded_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Token grid for an input size; sizes that do not divide by the patch are padded up (ceil)."""
    return -(-height // patch_size), -(-width // patch_size)


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

    cost: adds the variant's token-mixing FLOPs and its own parameters (e.g. bias tables) to the
    tally and returns how many tokens its q/k/v and output projections run on (more than the input
    when it pads). softmax: it runs softmax attention through SDPA, so a fused ONNX export has one
    Attention node for it. prefix_tokens: it accepts class tokens and RoPE (only global attention
    does). partitioned: it pads the grid to multiples of `partition_size`, which buckets should avoid.
    """

    kind: str
    cost: Callable[[CostTally, MixingShape], int]
    softmax: bool
    prefix_tokens: bool = False
    partitioned: bool = False


def dense_softmax_cost(tally: CostTally, shape: MixingShape) -> int:
    """Softmax attention of every token with every token: one N x N score matrix per head.

    Global attention, and neighborhood / dilated attention too: they run as full SDPA with a boolean
    mask (no custom kernel), so their executed cost is N x N scores, not the ideal N * k^2.
    """
    tally.softmax_attention(1, shape.tokens, shape.heads, shape.head_dim)
    return shape.tokens


def partitioned_cost(tally: CostTally, shape: MixingShape) -> int:
    """P x P partitions (Swin windows, MaxViT block / grid): the grid is padded to partition
    multiples, q/k/v, the (P^2 x P^2) softmax of every partition and the output projection run on the
    padded tokens, and each layer owns a (2P-1)^2 x heads bias table."""
    size = shape.partition
    rows, cols = padded_grid(shape.grid[0], shape.grid[1], size)
    mixed = rows * cols * size * size
    tally.params += (2 * size - 1) ** 2 * shape.heads
    tally.softmax_attention(mixed // size**2, size**2, shape.heads, shape.head_dim)
    return mixed


def linear_cost(tally: CostTally, shape: MixingShape) -> int:
    """Kernelized linear attention: phi(K)^T V, phi(Q) (phi(K)^T V) and the normalizer; no score matrix."""
    tally.linear_attention(shape.tokens, shape.heads, shape.head_dim)
    return shape.tokens


VARIANTS: dict[str, AttentionVariant] = {
    v.kind: v
    for v in (
        AttentionVariant("global", dense_softmax_cost, softmax=True, prefix_tokens=True),
        *(
            AttentionVariant(k, partitioned_cost, softmax=True, partitioned=True)
            for k in ("window", "block", "grid")
        ),
        AttentionVariant("neighborhood", dense_softmax_cost, softmax=True),
        AttentionVariant("dilated", dense_softmax_cost, softmax=True),
        AttentionVariant("linear", linear_cost, softmax=False),
    )
}
ATTENTION_KINDS = tuple(VARIANTS)


def get_variant(kind: str) -> AttentionVariant:
    """The declared variant `kind`; ValueError naming the known ones otherwise."""
    try:
        return VARIANTS[kind]
    except KeyError:
        raise ValueError(
            f"unknown attention kind {kind!r}; choose one of {', '.join(ATTENTION_KINDS)}"
        ) from None
