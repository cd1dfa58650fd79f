"""Reduced-precision ONNX variants: FP16 for GPU serving, INT8 (dynamic quantization) for CPU serving.

Both keep float32 inputs and outputs, so every runtime feeds the same tensors whatever the precision.
"""

from __future__ import annotations

from pathlib import Path

import onnx

PRECISIONS = ("fp32", "fp16", "int8")


def convert_precision(source: Path, target: Path, precision: str) -> None:
    """Write the `precision` variant of the fp32 ONNX model at `source` to `target`."""
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))
    elif precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Linear layers only: ORT's quantized attention (QAttention) does not accept the opset-23 Attention node.
        quantize_dynamic(
            str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
        )
    else:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
