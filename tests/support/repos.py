"""Model repositories for service tests, exported once per session with the real `export_model`.

Export time dominates service-test set-up, so the backbones are registry configurations shrunk to a
depth of one or two blocks: the gateway's behaviour (routing, batching, metrics, errors) does not
depend on depth, and the served numbers are still compared with ONNX Runtime or PyTorch.

- The photo repository pairs a global-attention ViT (shapes 192x256, 224, 384) with a windowed Swin
  (448, 896) under the names the default routing uses, so `vitserve serve` derives its routing from it.
- The digits repository serves the trained digits models (tests/support/digits.py) at their
  training size with a routing file, so accuracy over HTTP can be compared with PyTorch's.
- The seeded digits repository holds the same two digits-sized backbones untrained (seeded weights)
  at one bucket: the smallest repository a gateway derives its routing from, for tests of
  processes and tiers rather than of accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export import ExportRequest, export_model
from models import build_model, save_checkpoint
from service.router import BackboneRoute, RoutingConfig
from support.digits import DIGITS_IMG_SIZE, DIGITS_MODELS, digits_config, digits_model_spec


@dataclass(frozen=True)
class Backbone:
    """One backbone to export: repository name, registry config, shrinking overrides and buckets."""

    name: str
    model: str
    buckets: tuple[int | tuple[int, int], ...]
    overrides: dict[str, Any] = field(default_factory=dict)

    def export(self, repository: Path, checkpoint: Path | None = None, artifact_format: str = "onnx") -> None:
        request = ExportRequest(
            model=self.model,
            repository=repository,
            buckets=self.buckets,
            name=self.name,
            overrides=self.overrides,
            checkpoint=checkpoint,
            artifact_format=artifact_format,
        )
        export_model(request, log=lambda _: None)

    def route(self) -> BackboneRoute:
        return BackboneRoute(model=self.name, config=self.model, buckets=self.buckets)


PHOTO_GLOBAL = Backbone("vit_global", "vit_tiny_patch16_224", ((192, 256), 224, 384), {"depth": 2})
PHOTO_WINDOWED = Backbone(
    "swin_windowed",
    "swin_tiny_patch4_window7_224",
    (448, 896),
    {"depths": (1, 1), "num_heads": (2, 4), "embed_dim": 32},
)
# A 32 x 32 digit image at the ViT's patch size: this limit routes digits to global attention.
DIGITS_MAX_GLOBAL_TOKENS = (DIGITS_IMG_SIZE // DIGITS_MODELS["vit"][1]["patch_size"]) ** 2


def build_photo_repository(root: Path) -> Path:
    """Export the global and windowed photo backbones into `root`; returns it."""
    for backbone in (PHOTO_GLOBAL, PHOTO_WINDOWED):
        backbone.export(root)
    return root


@dataclass(frozen=True)
class DigitsRepository:
    """The digits repository, its routing file and the backbones it serves."""

    path: Path
    routing: Path
    global_backbone: Backbone
    windowed_backbone: Backbone


def build_digits_repository(root: Path, vit: nn.Module, swin: nn.Module) -> DigitsRepository:
    """Export the trained digits models at their training size, with a routing file sending digits to the ViT.

    The models are exported from checkpoints with the registry name and overrides they were built
    with (`digits_model_spec`), exactly as a user would serve a fine-tuned model.
    """
    repository = root / "repository"
    backbones = {}
    for family, model in (("vit", vit), ("swin", swin)):
        name, overrides = digits_model_spec(family)
        backbone = Backbone(f"digits_{family}", name, (DIGITS_IMG_SIZE,), overrides)
        backbone.export(repository, checkpoint=save_checkpoint(model, root / f"{family}.safetensors"))
        backbones[family] = backbone
    routing = RoutingConfig(
        global_backbone=backbones["vit"].route(),
        windowed_backbone=backbones["swin"].route(),
        max_global_tokens=DIGITS_MAX_GLOBAL_TOKENS,
    )
    routing.to_yaml(root / "routing.yaml")
    return DigitsRepository(repository, root / "routing.yaml", backbones["vit"], backbones["swin"])


def build_seeded_digits_repository(root: Path, bucket: int = DIGITS_IMG_SIZE) -> Path:
    """Seeded, untrained digits-sized ViT (`vit_digits`, global) and Swin (`swin_digits`, windowed) at
    `bucket`, exported as ONNX into `root`; returns it. Seeded, so outputs repeat across sessions."""
    for family in ("vit", "swin"):
        arch, overrides = DIGITS_MODELS[family]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_model(digits_config(family, bucket))
        checkpoint = save_checkpoint(model, root.parent / f"{root.name}-{family}.safetensors")
        Backbone(f"{family}_digits", arch, (bucket,), overrides).export(root, checkpoint)
    return root
