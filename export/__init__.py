"""Export vitserve backbones to ONNX / TorchScript and write them into a Triton-layout model repository.

Names resolve on first use (PEP 562): the gateway reads repositories (export.repository) without
importing the exporters, which need torch.
"""

from __future__ import annotations

from models.lazy import lazy_namespace

_EXPORTS = {
    "ExportError": "export.errors",
    "VerificationError": "export.errors",
    "ExportRequest": "export.pipeline",
    "export_model": "export.pipeline",
    "ModelEntry": "export.repository",
    "read_entry": "export.repository",
    "read_repository": "export.repository",
}


__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
