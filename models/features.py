"""timm's feature API shared by the backbones: which intermediate outputs to take, and their layout.

`forward_intermediates(x, indices)` returns per-block (ViT) or per-stage (Swin) feature maps as
(B, C, H, W), so a served model can hand out embeddings or dense features, not only logits. As in
timm, `indices` is an int n (the last n) or a sequence of positions (negative counts from the end).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def feature_indices(indices: int | Sequence[int] | None, count: int) -> list[int]:
    """The sorted positions to return out of `count`; every one when `indices` is None."""
    if indices is None:
        return list(range(count))
    chosen = list(range(count - indices, count)) if isinstance(indices, int) else [i % count for i in indices]
    if isinstance(indices, int) and not 0 < indices <= count:
        raise ValueError(f"indices={indices} must be between 1 and the {count} available")
    if not isinstance(indices, int) and any(not -count <= i < count for i in indices):
        raise ValueError(f"indices {list(indices)} out of range for {count} outputs")
    return sorted(set(chosen))


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) row-major spatial tokens -> (B, C, H, W)."""
    batch, _, channels = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, channels, grid[0], grid[1])


__all__ = ["feature_indices", "tokens_to_map"]
