"""What Swin and NAT share: a stem, stages that each end in an optional downsample, a final norm,
mean pooling and a head, with timm's feature API on top (features, head, per-stage maps)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.features import feature_indices, tokens_to_map
from models.output import ModelOutput


class HierarchicalStage(nn.Module):
    """Subclasses set `blocks` (each `(x, grid) -> x`) and `downsample` (`(x, grid) -> (x, grid)`, or
    None for the last stage)."""

    blocks: nn.ModuleList
    downsample: nn.Module | None

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
        """(downsampled tokens, their grid, the stage's own output before downsampling)."""
        for block in self.blocks:
            x = block(x, grid)
        if self.downsample is None:
            return x, grid, x
        merged, merged_grid = self.downsample(x, grid)
        return merged, merged_grid, x


class HierarchicalBackbone(nn.Module):
    """Subclasses set `patch_embed` ((B, 3, H, W) -> tokens, grid), `stages` (each `(x, grid) ->
    (next x, next grid, own output)`), `norm` and `head`."""

    patch_embed: nn.Module
    stages: nn.ModuleList
    norm: nn.Module
    head: nn.Module

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Final normed tokens of the last stage (B, N, C)."""
        x, grid = self.patch_embed(pixel_values)
        for stage in self.stages:
            x, grid, _ = stage(x, grid)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mean-pool `forward_features` output, then classify; `pre_logits=True` returns the embedding."""
        embedding = features.mean(dim=1)
        return embedding if pre_logits else self.head(embedding)

    def forward_intermediates(
        self,
        pixel_values: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (before the downsample that follows) as (B, C, H, W) maps, timm's API; `norm`
        applies the final norm to the last stage's map, the only one of its width."""
        take = feature_indices(indices, len(self.stages))
        x, grid = self.patch_embed(pixel_values)
        maps = []
        for index, stage in enumerate(self.stages):
            stage_grid = grid
            x, grid, out = stage(x, grid)
            if index in take:
                last = index == len(self.stages) - 1
                maps.append(tokens_to_map(self.norm(out) if norm and last else out, stage_grid))
        if intermediates_only:
            return maps
        return self.norm(x), maps

    def forward(self, pixel_values: torch.Tensor) -> ModelOutput:
        embedding = self.forward_head(self.forward_features(pixel_values), pre_logits=True)
        return ModelOutput(self.head(embedding), embedding)


__all__ = ["HierarchicalBackbone"]
