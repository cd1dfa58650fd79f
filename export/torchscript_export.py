"""TorchScript (traced) and torch.export (.pt2) artifacts for the PyTorch runtime and Triton's libtorch backend.

Tracing keeps `aten::scaled_dot_product_attention` as one op, so libtorch dispatches to fused
kernels. TorchScript is deprecated in torch 2.13; `.pt2` (torch.export) is its successor and
what vitserve's PyTorch runtime prefers, while Triton's libtorch backend still needs TorchScript.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from export.shapes import ShapeSpec, as_shape

SDPA_OP = "aten::scaled_dot_product_attention"


def _frozen(model: nn.Module) -> nn.Module:
    model = model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def export_torchscript(model: nn.Module, bucket: ShapeSpec, path: Path) -> None:
    """Trace `model` at input shape `bucket` (side or (height, width)) and save it as TorchScript."""
    example = torch.zeros(2, model.config.in_chans, *as_shape(bucket))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_frozen(model), example, strict=False)
        torch.jit.save(traced, str(path))


def count_sdpa_ops(path: Path) -> int:
    """Number of fused attention calls in a saved TorchScript graph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = str(torch.jit.load(str(path)).inlined_graph)
    return graph.count(SDPA_OP)


class _PlainOutputs(nn.Module):
    """Returns (logits, embedding) as a plain tuple: ExportedProgram serialization rejects custom NamedTuples."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embedding = self.model(pixel_values)
        return logits, embedding


def export_pt2(model: nn.Module, bucket: ShapeSpec, path: Path) -> None:
    """torch.export the model with a dynamic, unbounded batch axis and save the ExportedProgram.

    An upper bound would become a runtime guard in the loaded program, failing any batch the
    entry's max_batch_size (or a runtime padding batches to a power of two) allows beyond it.
    """
    example = torch.zeros(2, model.config.in_chans, *as_shape(bucket))
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(_PlainOutputs(_frozen(model)), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
