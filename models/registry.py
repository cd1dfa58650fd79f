"""Registry of named configurations in timm's naming style, and the model factory.

Names read family_size_patchP[_variant]_resolution, e.g. `vit_base_patch16_384` or
`swin_tiny_patch4_window7_224`. `create_model(name, **overrides)` builds any of them with
fields of its config overridden, optionally loading a checkpoint. Configs need no torch: a family's
model module is imported when the first model of it is built, so the gateway reads configs and costs
in a process that never imports torch (models/mixing.py).
"""

from __future__ import annotations

import fnmatch
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.config import BackboneConfig, NATConfig, SwinConfig, ViTConfig

if TYPE_CHECKING:
    from torch import nn

_REGISTRY: dict[str, BackboneConfig] = {}
# family -> (module, class) of its model, imported by build_model.
_BUILDERS: dict[str, tuple[str, str]] = {
    "vit": ("models.vit", "VisionTransformer"),
    "swin": ("models.swin", "SwinTransformer"),
    "nat": ("models.nat", "NeighborhoodTransformer"),
}

HALF_MEAN_STD = (0.5, 0.5, 0.5)
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
SWIN_SIZES = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}
# Hierarchical NAT / DiNAT (NATTEN's tiny configurations): (embed_dim, depths, heads, mlp_ratio).
NAT_SIZES = {"tiny": (64, (3, 4, 18, 5), (2, 4, 8, 16), 3.0)}
# DiNAT's per-block dilations at 224 px: each stage alternates 1 with (stage grid) / kernel (56/7 = 8, 28/7 = 4, 14/7 = 2).
DINAT_224_DILATIONS = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1,) * 5)
# Trunks composed from the other attention variants: (name stem, overrides). The `_iso` names say
# what they are: isotropic stride-16 ViT trunks with another token mixer, not the hierarchical NAT,
# DiNAT or MaxViT of the papers (no convolutional tokenizer, downsamplers or per-stage settings).
COMPOSED_VIT_VARIANTS = {
    "vit_{size}_patch16_rope_224": {"pos_embed": "rope_2d"},
    "vit_{size}_patch16_sincos_224": {"pos_embed": "sincos_2d"},
    "vit_{size}_patch16_pos2d_224": {"pos_embed": "learned_2d"},
    "nat_iso_{size}_patch16_224": {"attention": ("neighborhood",)},
    "dinat_iso_{size}_patch16_224": {"attention": ("neighborhood", "dilated")},
    "maxvit_iso_{size}_patch16_224": {"attention": ("block", "grid")},
    "linvit_{size}_patch16_224": {"attention": ("linear",)},
}


def register(name: str, config: BackboneConfig) -> None:
    """Add a named configuration; names are unique."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = config


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_config(name: str, **overrides: Any) -> BackboneConfig:
    """The named configuration with `overrides` applied."""
    if name not in _REGISTRY:
        close = [n for n in _REGISTRY if name.split("_")[0] in n][:8]
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} See list_models() for all {len(_REGISTRY)} names.")
    config = _REGISTRY[name]
    return config.replace(**overrides) if overrides else config


def build_model(config: BackboneConfig) -> nn.Module:
    """A randomly initialized model in eval mode for `config`."""
    module, name = _BUILDERS[config.family]
    return getattr(importlib.import_module(module), name)(config).eval()


def create_model(name: str, checkpoint: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build the named model (eval mode); with `checkpoint`, load its weights, labels and config values.

    `checkpoint` is a Hugging Face model folder (config.json + weights), a .safetensors or .bin
    state dict in either Hugging Face layout, or a file written by `save_checkpoint`.
    """
    config = get_config(name, **overrides)
    if checkpoint is None:
        return build_model(config)
    from models.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, config)


def _register_defaults() -> None:
    for size, (dim, depth, heads) in VIT_SIZES.items():
        for patch in (8, 14, 16, 32):
            for res in (224, 384):
                register(
                    f"vit_{size}_patch{patch}_{res}",
                    ViTConfig(
                        img_size=res,
                        patch_size=patch,
                        embed_dim=dim,
                        depth=depth,
                        num_heads=heads,
                        mean=HALF_MEAN_STD,
                        std=HALF_MEAN_STD,
                    ),
                )
    for size in ("tiny", "small"):
        base = _REGISTRY[f"vit_{size}_patch16_224"]
        for pattern, overrides in COMPOSED_VIT_VARIANTS.items():
            if "attention" in overrides:
                overrides = {**overrides, "class_token": False, "global_pool": "avg"}
            register(pattern.format(size=size), base.replace(**overrides))
    for size, (dim, depths, heads, mlp_ratio) in NAT_SIZES.items():
        nat = NATConfig(embed_dim=dim, depths=depths, num_heads=heads, mlp_ratio=mlp_ratio)
        register(f"nat_{size}_224", nat)
        register(f"dinat_{size}_224", nat.replace(dilations=DINAT_224_DILATIONS))
    for size, (dim, depths, heads) in SWIN_SIZES.items():
        for window, res in ((7, 224), (12, 384)):
            register(
                f"swin_{size}_patch4_window{window}_{res}",
                SwinConfig(img_size=res, embed_dim=dim, depths=depths, num_heads=heads, window_size=window),
            )


_register_defaults()
