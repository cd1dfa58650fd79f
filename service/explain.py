"""Heat maps of where a served model looked, computed by ONNX Runtime from the entry's own artifact.

Why ONNX Runtime and not a PyTorch copy: the ONNX artifact is what serves, in whatever precision
it was exported, and the exporter's optimizer renames, transposes, merges and constant-folds
parameters (Swin's relative position tables are folded into the attention bias), so the weights
cannot be read back by name. The graph itself can tell what it attends to: opset 23's fused
`Attention` node returns its softmax probabilities as optional output 3 when
`qk_matmul_output_mode` is 3 (unfused opset-18 exports are not explained).
`instrument` exposes those tensors (and, for windowed backbones, the final tokens) as extra graph
outputs; a second session on that graph answers /v1/explain while the serving session stays as it is.

Methods (the heat map is a grid over the model input; it sums to 1):
- Global attention (ViT; NAT/DiNAT, whose masks keep the full token set): attention rollout
  (Abnar & Zuidema, 2020). Layer l mixes tokens by M_l = (A_l + I) / 2, A_l its head-averaged
  probabilities and I the residual path; the relevance of the input tokens to the pooled output
  is e · M_L ... M_1, with e the class token (token pooling) or the mean over patch tokens.
- Windowed attention (Swin): the cosine similarity of each final-stage token to the pooled
  embedding (clipped at 0) says which final tokens the embedding is made of; but the final stage
  is 1/32 of the input (2 x 2 cells for a 32-pixel digit), too coarse to show an object. So that
  similarity seeds the same rollout, carried back through every window layer (windows, cyclic
  shift and padding replayed from the config) and every patch merge (a merged token's relevance
  split over its 2 x 2 sources) down to the first-stage grid, patch_size pixels per cell.
Block/grid (MaxViT) and linear attention are not explained: the first partitions differently, the
second has no probabilities. Such entries answer 501.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from models.config import BackboneConfig, SwinConfig, ViTConfig

QK_OUTPUT_INDEX = 3
QK_AFTER_SOFTMAX = 3
FULL_ATTENTION = frozenset({"global", "neighborhood", "dilated"})
PASS_THROUGH = frozenset({"Cast", "Identity"})


class NotExplainable(Exception):
    """The entry's model cannot be explained by these methods; the message says why (HTTP 501)."""


@dataclass(frozen=True)
class Probes:
    """Names of the graph outputs `instrument` added: per-layer attention probabilities, final tokens."""

    attention: tuple[str, ...]
    tokens: str | None


@dataclass(frozen=True)
class HeatMap:
    """Relevance per cell of the model input's token grid (rows, cols), summing to 1."""

    values: np.ndarray
    method: str
    cell_pixels: int


def check_explainable(config: BackboneConfig) -> None:
    """NotExplainable unless `config` is a Swin or an isotropic trunk of full-attention layers."""
    if isinstance(config, SwinConfig):
        return
    kinds = set(config.attention_kinds)
    if not kinds <= FULL_ATTENTION:
        raise NotExplainable(
            f"attention {sorted(kinds - FULL_ATTENTION)} cannot be explained: rollout needs each layer's "
            "probabilities over the whole token grid (global, neighborhood, dilated) or Swin windows"
        )


def instrument(model: onnx.ModelProto, embedding_output: str) -> Probes:
    """Add each attention layer's probabilities and the tokens pooled into `embedding_output` as
    graph outputs of `model` (in place), in execution order."""
    graph = model.graph
    names = []
    for layer, node in enumerate(n for n in graph.node if n.op_type == "Attention"):
        name = f"explain_attention_{layer}"
        node.output.extend([""] * (QK_OUTPUT_INDEX + 1 - len(node.output)))
        node.output[QK_OUTPUT_INDEX] = name
        _set_int_attribute(node, "qk_matmul_output_mode", QK_AFTER_SOFTMAX)
        names.append(name)
    tokens = _pooled_tokens(graph, embedding_output)
    for name in (*names, *([tokens] if tokens else [])):
        graph.output.append(helper.make_empty_tensor_value_info(name))
    return Probes(tuple(names), tokens)


def _set_int_attribute(node: onnx.NodeProto, name: str, value: int) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _pooled_tokens(graph: onnx.GraphProto, output: str) -> str | None:
    """The (B, N, C) tensor whose token mean is `output`, or None when `output` is not a ReduceMean."""
    producers = {name: node for node in graph.node for name in node.output}
    node = producers.get(output)
    while node is not None and node.op_type in PASS_THROUGH:
        node = producers.get(node.input[0])
    return node.input[0] if node is not None and node.op_type == "ReduceMean" else None


def heat_map(
    config: BackboneConfig,
    bucket: int,
    attention: list[np.ndarray],
    tokens: np.ndarray | None,
    embedding: np.ndarray,
) -> HeatMap:
    """The heat map of one image from its probes' values (batch of one), by the module's methods."""
    probabilities = [np.asarray(a, dtype=np.float64).mean(axis=1) for a in attention]
    if isinstance(config, SwinConfig):
        if tokens is None:
            raise NotExplainable(
                "the graph does not pool its final tokens with ReduceMean; cannot seed Swin relevance"
            )
        return _windowed(config, bucket, probabilities, tokens[0], embedding[0])
    return _global(config, bucket, probabilities)


def _global(config: ViTConfig, bucket: int, probabilities: list[np.ndarray]) -> HeatMap:
    side = -(-bucket // config.patch_size)
    prefix = 1 if config.class_token else 0
    tokens = prefix + side * side
    relevance = np.zeros(tokens)
    if config.global_pool == "token":
        relevance[0] = 1.0
    else:
        relevance[prefix:] = 1.0 / (side * side)
    for layer in reversed(probabilities):
        relevance = 0.5 * relevance + 0.5 * relevance @ layer[0]
    return _normalized(relevance[prefix:].reshape(side, side), "attention_rollout", config.patch_size)


def _windowed(
    config: SwinConfig, bucket: int, probabilities: list[np.ndarray], tokens: np.ndarray, pooled: np.ndarray
) -> HeatMap:
    grids = [(-(-bucket // config.patch_size),) * 2]
    for _ in config.depths[1:]:
        grids.append(tuple(-(-side // 2) for side in grids[-1]))
    similarity = tokens @ pooled / (np.linalg.norm(tokens, axis=1) * np.linalg.norm(pooled) + 1e-12)
    relevance = np.clip(similarity, 0.0, None).reshape(grids[-1])
    layers = iter(reversed(probabilities))
    for stage in reversed(range(len(config.depths))):
        for block in reversed(range(config.depths[stage])):
            shift = config.window_size // 2 if block % 2 else 0
            relevance = _window_step(relevance, next(layers), config.window_size, shift)
        if stage:
            rows, cols = grids[stage - 1]
            relevance = np.repeat(np.repeat(relevance / 4, 2, axis=0), 2, axis=1)[:rows, :cols]
    return _normalized(relevance, "window_rollout_from_token_similarity", config.patch_size)


def _window_step(relevance: np.ndarray, layer: np.ndarray, size: int, shift: int) -> np.ndarray:
    """Relevance of one window layer's inputs from its outputs', replaying pad, shift and windows."""
    rows, cols = relevance.shape
    shift = shift if min(rows, cols) > size else 0
    padded = np.pad(relevance, ((0, (-rows) % size), (0, (-cols) % size)))
    rolled = np.roll(padded, (-shift, -shift), axis=(0, 1))
    prows, pcols = rolled.shape
    windows = rolled.reshape(prows // size, size, pcols // size, size).transpose(0, 2, 1, 3)
    windows = windows.reshape(-1, size * size)
    mixed = 0.5 * windows + 0.5 * np.einsum("wi,wij->wj", windows, layer)
    back = mixed.reshape(prows // size, pcols // size, size, size).transpose(0, 2, 1, 3)
    back = np.roll(back.reshape(prows, pcols), (shift, shift), axis=(0, 1))
    return back[:rows, :cols]


def _normalized(values: np.ndarray, method: str, cell_pixels: int) -> HeatMap:
    total = values.sum()
    return HeatMap(values / total if total > 0 else values, method, cell_pixels)
