"""vitserve model library: ViT-family backbones built from attention variants, with a cost model."""

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.config import BackboneConfig, NATConfig, SwinConfig, ViTConfig
from models.cost import Cost, estimate_cost
from models.output import ModelOutput
from models.registry import build_model, create_model, get_config, list_models, register

__all__ = [
    "BackboneConfig",
    "CheckpointError",
    "Cost",
    "ModelOutput",
    "NATConfig",
    "SwinConfig",
    "ViTConfig",
    "build_model",
    "create_model",
    "estimate_cost",
    "get_config",
    "list_models",
    "load_checkpoint",
    "register",
    "save_checkpoint",
]
