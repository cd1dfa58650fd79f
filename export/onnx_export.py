"""ONNX export through torch's dynamo exporter.

Fused mode targets opset 23, where `F.scaled_dot_product_attention` (with its bias or mask as
`attn_mask`) becomes a single ONNX `Attention` node per layer. Tracing runs inside the MATH SDPA
backend with frozen parameters so masked/windowed attention lowers cleanly (pytorch#141107).
Unfused mode targets opset 18 for runtimes without the opset-23 op: attention decomposes into
MatMul/Softmax/MatMul. The batch axis is dynamic and unbounded (the entry's max_batch_size is
Triton's to enforce); spatial size is fixed per shape (bucket). `dynamic_spatial` also leaves
height and width dynamic (multiples of the config's bucket multiple), which only bench.dynamic_dims
uses: torch.export traces the Python branches that depend on the input size (position-table
antialiasing, Swin's odd-grid and window padding, unshifted single-window layers) for the example
shape only, so such a graph is exact only for shapes that take the same branches.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from export.shapes import ShapeSpec, as_shape

FUSED_OPSET = 23
UNFUSED_OPSET = 18
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("logits", "embedding")


# Dynamic spatial dims span 4 to 128 bucket multiples (e.g. 64..2048 pixels at patch 16).
SPATIAL_MULTIPLES = (4, 128)


# The exporter warns once per missing torchvision op; vitserve uses none of them.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def export_onnx(
    model: nn.Module, bucket: ShapeSpec, path: Path, *, fused: bool = True, dynamic_spatial: bool = False
) -> None:
    """Write `model` at input shape `bucket` (side or (height, width)) to `path` (ONNX, external data inlined);
    with `dynamic_spatial`, `bucket` is only the example traced (see the module docstring)."""
    model = model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    in_chans = model.config.in_chans
    example = torch.zeros(2, in_chans, *as_shape(bucket))
    dims = {0: torch.export.Dim("batch", min=1)}
    if dynamic_spatial:
        multiple = model.config.bucket_multiple
        low, high = SPATIAL_MULTIPLES
        dims[2] = multiple * torch.export.Dim("rows", min=low, max=high)
        dims[3] = multiple * torch.export.Dim("cols", min=low, max=high)
    with warnings.catch_warnings(), sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=FUSED_OPSET if fused else UNFUSED_OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=(dims,),
            verbose=False,
        )
    program.save(str(path))
