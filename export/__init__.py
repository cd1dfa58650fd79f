"""Export vitserve backbones to ONNX / TorchScript and write them into a Triton-layout model repository."""

from export.errors import ExportError, VerificationError
from export.pipeline import ExportRequest, export_model
from export.repository import ModelEntry, read_entry, read_repository

__all__ = [
    "ExportError",
    "ExportRequest",
    "ModelEntry",
    "VerificationError",
    "export_model",
    "read_entry",
    "read_repository",
]
