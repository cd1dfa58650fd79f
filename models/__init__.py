"""vitserve model library: ViT-family backbones built from attention variants, with a cost model.

Names resolve on first use (PEP 562), so `import models.config` or `models.cost` (what the gateway
needs to read configs and route) does not import torch; the model classes and checkpoint code do.
"""

from __future__ import annotations

from models.lazy import lazy_namespace

_EXPORTS = {
    "CheckpointError": "models.checkpoint",
    "load_checkpoint": "models.checkpoint",
    "save_checkpoint": "models.checkpoint",
    "BackboneConfig": "models.config",
    "NATConfig": "models.config",
    "SwinConfig": "models.config",
    "ViTConfig": "models.config",
    "Cost": "models.cost",
    "estimate_cost": "models.cost",
    "ModelOutput": "models.output",
    "build_model": "models.registry",
    "create_model": "models.registry",
    "get_config": "models.registry",
    "list_models": "models.registry",
    "register": "models.registry",
}


__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
