"""Export vitserve backbones to ONNX / TorchScript and write them into a Triton-layout model repository.

Names resolve on first use (PEP 562): the gateway reads repositories (export.repository) without
importing the exporters, which need torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExportError": "export.errors",
    "VerificationError": "export.errors",
    "ExportRequest": "export.pipeline",
    "export_model": "export.pipeline",
    "ModelEntry": "export.repository",
    "read_entry": "export.repository",
    "read_repository": "export.repository",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(_EXPORTS)


__all__ = sorted(_EXPORTS)
