"""Explicit configuration objects for every backbone family.

A config fully determines the architecture and its pre-processing (`mean`, `std`, native
`img_size`, and the checkpoint's `interpolation`, `resize` policy and `crop_pct`), so a model can be
rebuilt, and its inputs prepared as it was trained, from the dict stored beside its weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from models.mixing import VARIANTS, get_variant

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pillow's resampling filters, by the names timm and torchvision use.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
# How an image is fitted to a bucket: "route" lets the router's pad/crop decide (no checkpoint opinion),
# "squash" resizes both sides to the bucket (transformers' ViTImageProcessor), "crop" resizes the short
# side to bucket / crop_pct and keeps the centered bucket square (timm's eval transform).
RESIZE_POLICIES = ("route", "squash", "crop")
# Position encodings of isotropic ViTs (models/layers/pos_embed.py builds them).
POS_EMBED_KINDS = ("learned_1d", "learned_2d", "sincos_2d", "rope_2d", "none")


@dataclass(frozen=True)
class BackboneConfig:
    """Fields shared by all families."""

    family: ClassVar[str] = ""
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    labels: tuple[str, ...] = ()
    interpolation: str = "bilinear"
    resize: str = "route"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize {self.resize!r} is not one of {RESIZE_POLICIES}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        for name in ("img_size", "patch_size", "in_chans", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.labels and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels given for {self.num_classes} classes")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError("mean and std need one value per input channel")

    @property
    def num_features(self) -> int:
        """Width of the pooled embedding."""
        return self.embed_dim

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """Attention variant of each attention layer, in execution order."""
        raise NotImplementedError

    @property
    def window(self) -> int:
        """Side of the attention partitions (windows, blocks, grids) in tokens, 0 when attention is not partitioned."""
        return 0

    @property
    def bucket_multiple(self) -> int:
        """Input sides that are multiples of this need no padding in the first stage."""
        return self.patch_size * max(self.window, 1)

    def label_names(self) -> list[str]:
        """Class names, falling back to `class_<i>` when the checkpoint carried none."""
        return list(self.labels) if self.labels else [f"class_{i}" for i in range(self.num_classes)]

    def replace(self, **overrides: Any) -> BackboneConfig:
        """A copy with fields overridden; unknown names fail with the list of valid ones."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise TypeError(f"unknown {self.family} config field(s) {unknown}; valid fields: {sorted(valid)}")
        return dataclasses.replace(self, **{k: _freeze(v) for k, v in overrides.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> BackboneConfig:
        """Rebuild a config of the right family from `to_dict()` output."""
        data = dict(data)
        family = data.pop("family", None)
        classes = {cls.family: cls for cls in (ViTConfig, SwinConfig, NATConfig)}
        if family not in classes:
            raise ValueError(f"unknown model family {family!r}; known: {sorted(classes)}")
        return classes[family]().replace(**data)


def _freeze(value: Any) -> Any:
    """Lists (from JSON) as tuples, nested ones too, so configs stay hashable."""
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class ViTConfig(BackboneConfig):
    """Isotropic transformer: ViT with global attention, or the same trunk with another token mixer.

    `attention` is a cycle of attention kinds applied layer by layer, so ("neighborhood", "dilated")
    alternates NAT and DiNAT layers and ("block", "grid") builds a MaxViT-style trunk. Spatial
    mixers need `class_token=False` (mean pooling), since a class token has no place on the grid.
    """

    family: ClassVar[str] = "vit"
    depth: int = 12
    num_heads: int = 3
    class_token: bool = True
    global_pool: str = "token"
    pos_embed: str = "learned_1d"
    rope_theta: float = 100.0
    attention: tuple[str, ...] = ("global",)
    kernel_size: int = 7
    dilation: int = 2
    partition_size: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pos_embed not in POS_EMBED_KINDS:
            raise ValueError(f"unknown pos_embed {self.pos_embed!r}; choose one of {POS_EMBED_KINDS}")
        allowed = tuple(k for k in VARIANTS if k != "window")
        if not self.attention or any(k not in allowed for k in self.attention):
            raise ValueError(f"ViT attention {self.attention} must be a non-empty cycle of {allowed}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if self.class_token and any(not get_variant(k).prefix_tokens for k in self.attention):
            raise ValueError("spatial attention variants need class_token=False and global_pool='avg'")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        return tuple(self.attention[i % len(self.attention)] for i in range(self.depth))

    @property
    def window(self) -> int:
        return self.partition_size if any(get_variant(k).partitioned for k in self.attention) else 0

    @property
    def base_grid(self) -> tuple[int, int]:
        side = -(-self.img_size // self.patch_size)
        return side, side


@dataclass(frozen=True)
class SwinConfig(BackboneConfig):
    """Hierarchical Swin transformer: shifted-window attention, patch merging between stages."""

    family: ClassVar[str] = "swin"
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError("depths and num_heads need one entry per stage")
        for stage, heads in enumerate(self.num_heads):
            if self.stage_dim(stage) % heads:
                raise ValueError(
                    f"stage {stage} width {self.stage_dim(stage)} is not divisible by {heads} heads"
                )

    @property
    def window(self) -> int:
        return self.window_size

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    @property
    def num_features(self) -> int:
        return self.stage_dim(len(self.depths) - 1)

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        return tuple("window" for depth in self.depths for _ in range(depth))


@dataclass(frozen=True)
class NATConfig(BackboneConfig):
    """Hierarchical neighborhood-attention transformer: NAT (Hassani et al. 2023) and, with per-stage
    `dilations`, DiNAT (Hassani & Shi 2022).

    An overlapping tokenizer (two 3x3 stride-2 convolutions, so `patch_size` is the total stride 4),
    stages of neighborhood-attention blocks with a learned relative position bias, and a 3x3 stride-2
    convolution (+ LayerNorm) between stages that halves the grid and doubles the width. `dilations`
    holds one tuple per stage with one dilation per block; empty means all 1 (NAT).
    """

    family: ClassVar[str] = "nat"
    patch_size: int = 4
    embed_dim: int = 64
    depths: tuple[int, ...] = (3, 4, 18, 5)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    mlp_ratio: float = 3.0
    kernel_size: int = 7
    dilations: tuple[tuple[int, ...], ...] = ()
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size != 4:
            raise ValueError(
                f"NAT's tokenizer is two stride-2 convolutions: patch_size must be 4, got {self.patch_size}"
            )
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError("depths and num_heads need one entry per stage")
        if self.dilations and [len(d) for d in self.dilations] != list(self.depths):
            raise ValueError(
                f"dilations {self.dilations} need one tuple per stage with one value per block {self.depths}"
            )
        if any(d < 1 for stage in self.dilations for d in stage):
            raise ValueError(f"dilations must be >= 1, got {self.dilations}")
        for stage, heads in enumerate(self.num_heads):
            if self.stage_dim(stage) % heads:
                raise ValueError(
                    f"stage {stage} width {self.stage_dim(stage)} is not divisible by {heads} heads"
                )

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    def dilation(self, stage: int, block: int) -> int:
        return self.dilations[stage][block] if self.dilations else 1

    @property
    def num_features(self) -> int:
        return self.stage_dim(len(self.depths) - 1)

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        return tuple(
            "neighborhood" if self.dilation(s, b) == 1 else "dilated"
            for s, depth in enumerate(self.depths)
            for b in range(depth)
        )


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "RESIZE_POLICIES",
    "BackboneConfig",
    "NATConfig",
    "SwinConfig",
    "ViTConfig",
]
