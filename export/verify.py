"""Check an exported artifact against PyTorch before it is written to the repository.

Numerics: outputs on fresh random input, relative error ||a - b|| / ||b|| per output (fp32 <= 1e-4,
fp16 <= 1e-2); int8 is judged by the mean per-sample cosine similarity of each output (>= 0.99),
since quantization moves every value a little. Before any of that, every output of the artifact and
of the PyTorch reference must be finite: NaN compares false with every limit, so a NaN artifact
would otherwise pass, and the error names the output, how many values are NaN or inf and the
first (sample, index) where one sits. The batch differs from the one the exporters trace
with, so a batch size baked into the graph fails here rather than in serving. Structure: the ONNX
graph must hold exactly one fused attention node per softmax-attention layer and no Softmax (fused
export), or one Softmax per layer (unfused export); a TorchScript graph must keep one
scaled_dot_product_attention per layer.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export.errors import VerificationError
from export.shapes import ShapeSpec, as_shape, shape_name
from export.torchscript_export import count_sdpa_ops
from models.mixing import get_variant

REL_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
INT8_MIN_COSINE = 0.99
FUSED_ATTENTION_OPS = {
    ("", "Attention"),
    ("com.microsoft", "MultiHeadAttention"),
    ("com.microsoft", "Attention"),
}
# Exporters trace with a batch of 2; checking at another size proves the batch axis is really dynamic.
VERIFY_BATCH = 3

Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass
class VerificationReport:
    """What the check measured; `summary()` is printed by the CLI and stored nowhere else."""

    relative_error: dict[str, float] = field(default_factory=dict)
    cosine: dict[str, float] = field(default_factory=dict)
    attention_nodes: int = 0
    softmax_nodes: int = 0
    expected_attention_layers: int = 0

    def summary(self) -> str:
        errors = ", ".join(f"{k} rel.err {v:.2e}" for k, v in self.relative_error.items())
        cosines = ", ".join(f"{k} cosine {v:.6f}" for k, v in self.cosine.items())
        return (
            f"{errors}, {cosines}, fused attention ops "
            f"{self.attention_nodes}/{self.expected_attention_layers}, softmax {self.softmax_nodes}"
        )


def softmax_attention_layers(model: nn.Module) -> int:
    """Attention layers that run softmax attention (each variant says whether it does); an unknown
    kind raises ValueError rather than being counted either way."""
    return sum(get_variant(kind).softmax for kind in model.config.attention_kinds)


def onnx_op_counts(path: Path) -> Counter:
    """(domain, op_type) counts over the main graph and every local function."""
    graph = onnx.load(str(path), load_external_data=False)
    nodes = list(graph.graph.node) + [n for f in graph.functions for n in f.node]
    return Counter((n.domain or "", n.op_type) for n in nodes)


def onnx_runner(path: Path) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda x: dict(zip(names, session.run(None, {session.get_inputs()[0].name: x}), strict=True))


def _torch_runner(module: Callable) -> Runner:
    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            logits, embedding = module(torch.from_numpy(x))
        return {"logits": logits.numpy(), "embedding": embedding.numpy()}

    return run


def torchscript_runner(path: Path) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _torch_runner(torch.jit.load(str(path)).eval())


def pt2_runner(path: Path) -> Runner:
    return _torch_runner(torch.export.load(str(path)).module())


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-12))


def _mean_cosine(actual: np.ndarray, expected: np.ndarray) -> float:
    dot = (actual * expected).sum(axis=1)
    norms = np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1)
    return float((dot / np.maximum(norms, 1e-12)).mean())


def non_finite_problems(outputs: Mapping[str, np.ndarray], source: str) -> list[str]:
    """One line per output holding NaN or inf: which output, how many of each, and where the first one is."""
    problems = []
    for name, values in outputs.items():
        bad = ~np.isfinite(values)
        if not bad.any():
            continue
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        samples = int(bad.reshape(bad.shape[0], -1).any(axis=1).sum()) if bad.ndim else 1
        problems.append(
            f"{source} output {name!r} has {int(np.isnan(values).sum())} NaN and {int(np.isinf(values).sum())} "
            f"inf of {values.size} values in {samples} of {values.shape[0] if values.ndim else 1} samples, "
            f"first at index {first}"
        )
    return problems


def fresh_input(model: nn.Module, bucket: ShapeSpec, batch: int = VERIFY_BATCH) -> np.ndarray:
    """Normalized-pixel-like random input from a fresh seed, so no export is checked on one lucky sample."""
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    return torch.randn(batch, model.config.in_chans, *as_shape(bucket), generator=generator).numpy()


def verify_artifact(
    model: nn.Module, path: Path, artifact_format: str, precision: str, bucket: ShapeSpec, fused: bool = True
) -> VerificationReport:
    """Compare the artifact with `model`; raise VerificationError (with the numbers) on any failure."""
    runners = {"onnx": onnx_runner, "torchscript": torchscript_runner, "pt2": pt2_runner}
    x = fresh_input(model, bucket)
    with torch.no_grad():
        reference = model(torch.from_numpy(x))._asdict()
    actual = runners[artifact_format](path)(x)
    reference_np = {name: value.numpy() for name, value in reference.items()}
    non_finite = non_finite_problems(reference_np, "PyTorch reference") + non_finite_problems(
        actual, f"{artifact_format}/{precision} artifact"
    )
    if non_finite:
        raise VerificationError(
            f"{artifact_format}/{precision} export at bucket {shape_name(bucket)} failed verification: "
            + "; ".join(non_finite)
            + ". Non-finite reference outputs come from the weights (check the checkpoint for NaN/inf); "
            "non-finite artifact outputs only, from the export precision (try fp32)"
        )
    report = VerificationReport(expected_attention_layers=softmax_attention_layers(model))
    for name, expected in reference_np.items():
        report.relative_error[name] = _relative_error(actual[name], expected)
        report.cosine[name] = _mean_cosine(actual[name], expected)
    problems = []
    if precision == "int8":
        problems += [
            f"int8 {k} cosine {v:.4f} < {INT8_MIN_COSINE}"
            for k, v in report.cosine.items()
            if not v >= INT8_MIN_COSINE
        ]
    else:
        limit = REL_TOLERANCE[precision]
        problems += [
            f"{k} relative error {v:.2e} > {limit:.0e}"
            for k, v in report.relative_error.items()
            if not v <= limit
        ]
    problems += _structure_problems(path, artifact_format, fused, report)
    if problems:
        raise VerificationError(
            f"{artifact_format}/{precision} export at bucket {shape_name(bucket)} failed verification: "
            + "; ".join(problems)
            + f" ({report.summary()})"
        )
    return report


def _structure_problems(
    path: Path, artifact_format: str, fused: bool, report: VerificationReport
) -> list[str]:
    expected = report.expected_attention_layers
    if artifact_format == "onnx":
        counts = onnx_op_counts(path)
        report.attention_nodes = sum(counts[op] for op in FUSED_ATTENTION_OPS)
        report.softmax_nodes = counts[("", "Softmax")]
        want_fused, want_softmax = (expected, 0) if fused else (0, expected)
        if report.attention_nodes != want_fused or report.softmax_nodes != want_softmax:
            return [
                f"graph has {report.attention_nodes} fused attention and {report.softmax_nodes} Softmax nodes, "
                f"expected {want_fused} and {want_softmax} for {expected} softmax-attention layers"
            ]
    elif artifact_format == "torchscript":
        report.attention_nodes = count_sdpa_ops(path)
        if report.attention_nodes != expected:
            return [
                f"TorchScript graph has {report.attention_nodes} SDPA ops for {expected} attention layers"
            ]
    return []
