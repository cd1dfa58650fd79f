"""Load ViT and Swin weights from Hugging Face or timm checkpoints or our own files, and save our own.

Accepted by `load_checkpoint`:
- a Hugging Face model folder: `config.json` plus `model.safetensors` (or `pytorch_model.bin`), as written
  by `save_pretrained` for ViTModel, ViTForImageClassification, SwinModel and SwinForImageClassification.
  An optional `preprocessor_config.json` supplies the preprocessing (models.preprocessing).
- a timm model folder (`push_to_hf_hub`): `config.json` with `architecture` (a registry name, tag
  dropped), `num_classes`, `label_names` and `pretrained_cfg` (preprocessing), plus the weights.
- a bare `.safetensors` or `.bin` state dict in our names (`save_file(model.state_dict(), ...)`), in
  timm's ViT / Swin names or in a Hugging Face layout; it carries no architecture, so the `config`
  argument defines it, and the layout that places most of its tensors in that model is used.
- a `.safetensors` file written by `save_checkpoint`: our parameter names, with our config (labels
  included) as JSON under the `vitserve_config` metadata key.

timm's names are ours except ViT's `pos_embed` (ours `pos_embed.weight`) and Swin's `layers.S` (ours
`stages.S`), whose merge opens stage S+1 since timm 0.9 (ours ends stage S) and whose head is
`head.fc`; the earlier timm Swin layout is accepted too, its `relative_position_index` / `attn_mask`
buffers dropped. Hugging Face key layouts, each with or without the `vit.` / `swin.` prefix of the classification models:
- transformers 4.x (also what transformers 5.x `save_pretrained` writes): `encoder.layer.N.attention.
  attention.query|key|value`, `attention.output.dense`, `intermediate.dense`, `output.dense`; Swin
  `encoder.layers.S.blocks.M.attention.self.query|key|value|relative_position_bias_table`.
- transformers 5.x module names (`model.state_dict()`): `layers.N.attention.q_proj|k_proj|v_proj|o_proj`,
  `mlp.fc1|fc2`; Swin `attention.relative_position_bias.relative_position_bias_table`.
q, k and v are concatenated into our fused `qkv` projection. Dropped on purpose: ViTModel's
`pooler.dense` (our embedding is the final-normed class token, the pooler's input) and Swin's
`relative_position_index` buffers (we derive them from the window size). Everything else must match
exactly: missing, unexpected and mis-shaped tensors are reported by name, ours and the checkpoint's.

A checkpoint without a classifier (ViTModel, SwinModel) gives `num_classes=0`: the head is
`nn.Identity` and `logits` equals `embedding`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.config import IMAGENET_MEAN, IMAGENET_STD, BackboneConfig, SwinConfig, ViTConfig
from models.layers.pos_embed import resize_relative_position_bias_table
from models.preprocessing import from_hf_processor, from_timm_pretrained_cfg
from models.registry import build_model, get_config

CONFIG_METADATA_KEY = "vitserve_config"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# Values a checkpoint decides even when the caller names a config; every other field is architecture.
CHECKPOINT_FIELDS = (
    "img_size",
    "num_classes",
    "labels",
    "layer_norm_eps",
    "qkv_bias",
    "mean",
    "std",
    "interpolation",
    "resize",
    "crop_pct",
)
# Values the caller decides even against the checkpoint: the checkpoint's tensors are adapted to them
# (relative-position-bias tables resized to the requested window).
REQUESTED_FIELDS = ("window_size", "partition_size")
BIAS_TABLE_SUFFIX = "relative_position_bias_table"
SUPPORTED_ACTIVATION = "gelu"
# transformers leaves id2label out of config.json when it is the default of two labels.
HF_DEFAULT_NUM_LABELS = 2
MAX_LISTED = 12
QKV_PARTS = "qkv"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested architecture."""


# ---------------------------------------------------------------- Hugging Face key layouts


@dataclass(frozen=True)
class KeyRule:
    """One tensor: our name and its names in each dialect of a layout (HF: transformers 4.x, 5.x).

    Names are templates: `{i}` block, `{s}` stage, `{p}` weight|bias. `part` marks the q (0), k (1)
    or v (2) slice of our fused `qkv`; `prefixed` is False for the classifier, which sits outside the
    `vit.` / `swin.` module of the classification models; `stage_offset` is added to our stage index
    to get theirs (timm's Swin opens stage s+1 with the merge that ends our stage s).
    """

    ours: str
    names: tuple[str, ...]
    part: int | None = None
    prefixed: bool = True
    stage_offset: int = 0


def _same(ours: str, theirs: str, prefixed: bool = True, stage_offset: int = 0) -> KeyRule:
    return KeyRule(ours, (theirs,), prefixed=prefixed, stage_offset=stage_offset)


def _block_rules(ours: str, legacy: str, current: str, legacy_attention: str) -> tuple[KeyRule, ...]:
    """The rules of one pre-norm block, given each layout's block prefix and 4.x attention module name."""
    suffixes = (
        ("norm1.{p}", "layernorm_before.{p}", "layernorm_before.{p}", None),
        ("norm2.{p}", "layernorm_after.{p}", "layernorm_after.{p}", None),
        ("attn.qkv.{p}", legacy_attention + ".query.{p}", "attention.q_proj.{p}", 0),
        ("attn.qkv.{p}", legacy_attention + ".key.{p}", "attention.k_proj.{p}", 1),
        ("attn.qkv.{p}", legacy_attention + ".value.{p}", "attention.v_proj.{p}", 2),
        ("attn.proj.{p}", "attention.output.dense.{p}", "attention.o_proj.{p}", None),
        ("mlp.fc1.{p}", "intermediate.dense.{p}", "mlp.fc1.{p}", None),
        ("mlp.fc2.{p}", "output.dense.{p}", "mlp.fc2.{p}", None),
    )
    return tuple(KeyRule(ours + o, (legacy + old, current + new), part) for o, old, new, part in suffixes)


# timm's block modules carry our names (ours were chosen to match); only the block prefix differs.
TIMM_BLOCK_PARTS = ("norm1.{p}", "attn.qkv.{p}", "attn.proj.{p}", "norm2.{p}", "mlp.fc1.{p}", "mlp.fc2.{p}")


def _timm_block_rules(ours: str, theirs: str) -> tuple[KeyRule, ...]:
    return tuple(_same(ours + part, theirs + part) for part in TIMM_BLOCK_PARTS)


_SWIN_BLOCK = "encoder.layers.{s}.blocks.{i}."
_SWIN_BIAS = "stages.{s}.blocks.{i}.attn.relative_position_bias.relative_position_bias_table"
_TIMM_SWIN_BLOCK = "layers.{s}.blocks.{i}."


def _timm_swin(merge_offset: int, head: str) -> tuple[KeyRule, ...]:
    """timm's Swin: since timm 0.9 each merge opens the next stage (`merge_offset` 1) and the head is
    `head.fc`; earlier releases end a stage with its merge, as ours does, and name the head `head`."""
    return (
        _same("patch_embed.proj.{p}", "patch_embed.proj.{p}"),
        _same("patch_embed.norm.{p}", "patch_embed.norm.{p}"),
        *_timm_block_rules("stages.{s}.blocks.{i}.", _TIMM_SWIN_BLOCK),
        _same(_SWIN_BIAS, _TIMM_SWIN_BLOCK + "attn.relative_position_bias_table"),
        _same(
            "stages.{s}.downsample.reduction.weight",
            "layers.{s}.downsample.reduction.weight",
            True,
            merge_offset,
        ),
        _same("stages.{s}.downsample.norm.{p}", "layers.{s}.downsample.norm.{p}", True, merge_offset),
        _same("norm.{p}", "norm.{p}"),
        _same("head.{p}", head + ".{p}"),
    )


# Key layouts per family: (layout name, rules, names dropped on purpose, module prefix of HF's
# classification models or None). `load_checkpoint` picks the one that places most of a bare state
# dict's tensors; ties go to the first listed.
LAYOUTS: dict[str, tuple[tuple[str, tuple[KeyRule, ...], tuple[str, ...], str | None], ...]] = {
    "vit": (
        (
            "timm",
            (
                _same("cls_token", "cls_token"),
                _same("pos_embed.weight", "pos_embed"),
                _same("patch_embed.proj.{p}", "patch_embed.proj.{p}"),
                *_timm_block_rules("blocks.{i}.", "blocks.{i}."),
                _same("norm.{p}", "norm.{p}"),
                _same("head.{p}", "head.{p}"),
            ),
            (),
            None,
        ),
        (
            "Hugging Face",
            (
                _same("cls_token", "embeddings.cls_token"),
                _same("pos_embed.weight", "embeddings.position_embeddings"),
                _same("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
                *_block_rules("blocks.{i}.", "encoder.layer.{i}.", "layers.{i}.", "attention.attention"),
                _same("norm.{p}", "layernorm.{p}"),
                _same("head.{p}", "classifier.{p}", prefixed=False),
            ),
            ("pooler.dense.{p}",),
            "vit.",
        ),
    ),
    "swin": (
        ("timm", _timm_swin(1, "head.fc"), (_TIMM_SWIN_BLOCK + "attn.relative_position_index",), None),
        (
            "timm < 0.9",
            _timm_swin(0, "head"),
            (_TIMM_SWIN_BLOCK + "attn.relative_position_index", _TIMM_SWIN_BLOCK + "attn_mask"),
            None,
        ),
        (
            "Hugging Face",
            (
                _same("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
                _same("patch_embed.norm.{p}", "embeddings.norm.{p}"),
                *_block_rules("stages.{s}.blocks.{i}.", _SWIN_BLOCK, _SWIN_BLOCK, "attention.self"),
                KeyRule(
                    _SWIN_BIAS,
                    (
                        _SWIN_BLOCK + "attention.self.relative_position_bias_table",
                        _SWIN_BLOCK + "attention.relative_position_bias.relative_position_bias_table",
                    ),
                ),
                _same(
                    "stages.{s}.downsample.reduction.weight", "encoder.layers.{s}.downsample.reduction.weight"
                ),
                _same("stages.{s}.downsample.norm.{p}", "encoder.layers.{s}.downsample.norm.{p}"),
                _same("norm.{p}", "layernorm.{p}"),
                _same("head.{p}", "classifier.{p}", prefixed=False),
            ),
            (
                _SWIN_BLOCK + "attention.self.relative_position_index",
                _SWIN_BLOCK + "attention.relative_position_bias.relative_position_index",
            ),
            "swin.",
        ),
    ),
}
_GROUPS = {"i": r"(?P<i>\d+)", "s": r"(?P<s>\d+)", "p": r"(?P<p>weight|bias)"}


@cache
def _pattern(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, group in _GROUPS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern)


@dataclass(frozen=True)
class Entry:
    """A checkpoint tensor placed in our model: `part` is its q/k/v slice of a fused `qkv`, else None."""

    ours: str
    source: str
    part: int | None
    tensor: torch.Tensor


class KeyLayout(Protocol):
    """Translates checkpoint names to ours, and names what a checkpoint lacks in its own terms."""

    name: str

    def entries(self, state: Mapping[str, torch.Tensor]) -> tuple[list[Entry], list[str]]:
        """Placed tensors, and the checkpoint names that have no place in our model."""
        ...

    def parts(self, ours: str) -> tuple[int | None, ...]:
        """The slices our tensor is assembled from: (0, 1, 2) for a fused qkv, else (None,)."""
        ...

    def source_names(self, ours: str, part: int | None) -> list[str]:
        """The checkpoint names that would have filled our tensor (or its slice)."""
        ...


class OwnLayout:
    """Our names, nothing fused: files from `save_checkpoint`, or `save_file(model.state_dict())`.

    `known` is our model's tensor names when the layout is a candidate for a bare state dict (names
    outside it are unknown), None for a `save_checkpoint` file, which is ours by its metadata.
    """

    name = "vitserve"

    def __init__(self, known: set[str] | None = None):
        self.known = known

    def entries(self, state: Mapping[str, torch.Tensor]) -> tuple[list[Entry], list[str]]:
        if self.known is None:
            return [Entry(name, name, None, tensor) for name, tensor in state.items()], []
        placed = [Entry(name, name, None, t) for name, t in state.items() if name in self.known]
        return placed, [name for name in state if name not in self.known]

    def parts(self, ours: str) -> tuple[int | None, ...]:
        return (None,)

    def source_names(self, ours: str, part: int | None) -> list[str]:
        return [ours]


class MappedLayout:
    """A declarative layout (timm, Hugging Face): checkpoint names mapped to ours by KeyRule templates.

    Hugging Face has two dialects (transformers 4.x and 5.x names) and an optional model prefix;
    missing tensors are named in the dialect the checkpoint uses, or in all when it gives no hint.
    """

    def __init__(
        self,
        name: str,
        rules: tuple[KeyRule, ...],
        dropped: tuple[str, ...],
        prefix: str | None,
        keys: Iterable[str],
    ):
        self.name = name
        self.rules = rules
        self.dropped = dropped
        self.prefix = prefix or ""
        keys = list(keys)
        self.prefixed = bool(prefix) and any(key.startswith(self.prefix) for key in keys)
        dialects = max(len(rule.names) for rule in rules)
        used = {index for key in keys if (match := self._match(key)) for index in match[1]}
        self.dialects = tuple(sorted(used)) if len(used) == 1 else tuple(range(dialects))

    def _match(self, key: str) -> tuple[KeyRule, tuple[int, ...], dict[str, str]] | None:
        """The rule naming `key`, the dialects whose name it is (empty when all agree), our placeholders."""
        for rule in self.rules:
            name = key.removeprefix(self.prefix) if rule.prefixed and self.prefix else key
            found = {}
            for dialect, template in enumerate(rule.names):
                if match := _pattern(template).fullmatch(name):
                    found[dialect] = match.groupdict()
            if found:
                groups = dict(next(iter(found.values())))
                if rule.stage_offset and "s" in groups:
                    groups["s"] = str(int(groups["s"]) - rule.stage_offset)
                ambiguous = len(set(rule.names)) == 1
                return rule, () if ambiguous else tuple(found), groups
        return None

    def entries(self, state: Mapping[str, torch.Tensor]) -> tuple[list[Entry], list[str]]:
        entries, unknown = [], []
        for key, tensor in state.items():
            if match := self._match(key):
                rule, _, groups = match
                entries.append(Entry(rule.ours.format(**groups), key, rule.part, tensor))
            elif not any(_pattern(t).fullmatch(key.removeprefix(self.prefix)) for t in self.dropped):
                unknown.append(key)
        return entries, unknown

    def parts(self, ours: str) -> tuple[int | None, ...]:
        fused = any(rule.part is not None and _pattern(rule.ours).fullmatch(ours) for rule in self.rules)
        return tuple(range(len(QKV_PARTS))) if fused else (None,)

    def source_names(self, ours: str, part: int | None) -> list[str]:
        names = []
        for rule in self.rules:
            match = _pattern(rule.ours).fullmatch(ours)
            if match and rule.part == part:
                groups = match.groupdict()
                if rule.stage_offset and groups.get("s") is not None:
                    groups["s"] = str(int(groups["s"]) + rule.stage_offset)
                prefix = self.prefix if self.prefixed and rule.prefixed else ""
                dialects = [d for d in self.dialects if d < len(rule.names)] or [0]
                names += [prefix + rule.names[d].format(**groups) for d in dialects]
        return list(dict.fromkeys(names))


def candidate_layouts(family: str, keys: Iterable[str], known: set[str]) -> list[KeyLayout]:
    """Every layout a bare state dict of `family` may be in, ours first."""
    keys = list(keys)
    return [OwnLayout(known)] + [MappedLayout(*spec, keys) for spec in LAYOUTS.get(family, ())]


def choose_layout(state: Mapping[str, torch.Tensor], family: str, known: set[str]) -> KeyLayout:
    """The layout that leaves fewest of the checkpoint's tensors without a place in our model."""

    def misplaced(layout: KeyLayout) -> int:
        entries, unknown = layout.entries(state)
        return len(unknown) + sum(entry.ours not in known for entry in entries)

    return min(candidate_layouts(family, state, known), key=misplaced)


# ---------------------------------------------------------------- Hugging Face config.json


def config_from_hf(
    hf_config: Mapping[str, Any], *, num_classes: int, preprocessor: Mapping[str, Any] | None = None
) -> BackboneConfig:
    """Our config for a transformers ViT or Swin `config.json`.

    Honoured, both families: patch_size, image_size, num_channels, qkv_bias, layer_norm_eps, id2label
    (the labels, when there is one per class; `num_classes` is decided by the caller, see
    `hf_num_classes`), the image processor's resampling, resize, crop, mean and std
    (models.preprocessing). ViT: hidden_size,
    num_hidden_layers, num_attention_heads, intermediate_size (as mlp_ratio); always a class token with
    token pooling and a learned 1D position table. Swin: embed_dim, depths, num_heads, window_size,
    mlp_ratio. Mean/std come from `preprocessor` (`preprocessor_config.json`) when given, else the
    processors' defaults (0.5 for ViT, ImageNet for Swin). Unsupported options raise ValueError.
    """
    model_type = hf_config.get("model_type")
    if model_type not in ("vit", "swin"):
        raise ValueError(f"unsupported Hugging Face model_type {model_type!r}: only 'vit' and 'swin' load")
    activation = hf_config.get("hidden_act", SUPPORTED_ACTIVATION)
    if activation != SUPPORTED_ACTIVATION:
        raise ValueError(f"hidden_act={activation!r} is not supported: our MLP uses exact GELU ('gelu')")
    in_chans = hf_config.get("num_channels", 3)
    labels = _labels(hf_config)
    common = {
        "img_size": _square(hf_config, "image_size"),
        "patch_size": _square(hf_config, "patch_size"),
        "in_chans": in_chans,
        "qkv_bias": hf_config.get("qkv_bias", True),
        "layer_norm_eps": hf_config["layer_norm_eps"],
        "num_classes": num_classes,
        "labels": labels if len(labels) == num_classes else (),
    }
    if model_type == "vit":
        config: BackboneConfig = ViTConfig(
            **common,
            embed_dim=hf_config["hidden_size"],
            depth=hf_config["num_hidden_layers"],
            num_heads=hf_config["num_attention_heads"],
            mlp_ratio=_mlp_ratio(hf_config["hidden_size"], hf_config["intermediate_size"]),
            mean=(0.5,) * in_chans,
            std=(0.5,) * in_chans,
        )
    else:
        if hf_config.get("use_absolute_embeddings", False):
            raise ValueError(
                "Swin with use_absolute_embeddings=True is not supported: ours has no absolute table"
            )
        config = SwinConfig(
            **common,
            embed_dim=hf_config["embed_dim"],
            depths=tuple(hf_config["depths"]),
            num_heads=tuple(hf_config["num_heads"]),
            window_size=hf_config["window_size"],
            mlp_ratio=hf_config["mlp_ratio"],
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
    if preprocessor:
        config = config.replace(**from_hf_processor(preprocessor, in_chans))
    return config


def _square(hf_config: Mapping[str, Any], name: str) -> int:
    value = hf_config[name]
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"non-square {name}={list(value)} is not supported")
    return int(value[0])


def _mlp_ratio(hidden_size: int, intermediate_size: int) -> float:
    ratio = intermediate_size / hidden_size
    if int(hidden_size * ratio) != intermediate_size:
        raise ValueError(
            f"intermediate_size {intermediate_size} is not expressible as a ratio of {hidden_size}"
        )
    return ratio


def _labels(hf_config: Mapping[str, Any]) -> tuple[str, ...]:
    id2label = hf_config.get("id2label") or {}
    return tuple(str(id2label[k]) for k in sorted(id2label, key=int))


def hf_num_classes(hf_config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> int:
    """The classifier's rows as the weights hold them; 0 for a headless ViTModel / SwinModel.

    A classification model whose weights lack the classifier keeps its label count, so that strict
    loading reports the missing tensors instead of silently dropping the head.
    """
    classifier = state.get("classifier.weight")
    if classifier is not None:
        return classifier.shape[0]
    if any(name.endswith("ForImageClassification") for name in hf_config.get("architectures") or ()):
        id2label = hf_config.get("id2label")
        return len(id2label) if id2label is not None else HF_DEFAULT_NUM_LABELS
    return 0


# ---------------------------------------------------------------- reading files


@dataclass(frozen=True)
class Source:
    """A checkpoint read from disk: its tensors, what it says about the architecture, and whether its
    names are ours by construction (a `save_checkpoint` file) rather than to be recognised."""

    state: dict[str, torch.Tensor]
    config: BackboneConfig | None
    own_layout: bool


def read_source(path: Path, requested: BackboneConfig | None = None) -> Source:
    """Read any supported checkpoint form (see the module docstring).

    `requested` is the caller's config: a timm folder names its architecture only by the timm model
    name, so without it the registry entry of that name is used.
    """
    if path.is_dir():
        if _is_timm_config(path / "config.json"):
            return _read_timm_folder(path, requested)
        return _read_hf_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        if CONFIG_METADATA_KEY in metadata:
            return Source(state, BackboneConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY])), True)
        return Source(state, None, False)
    if path.suffix in TORCH_SUFFIXES:
        return Source(_torch_state_dict(path), None, False)
    raise ValueError(
        f"unsupported checkpoint {path}: expected a Hugging Face or timm model folder, a .safetensors file "
        f"or a {'/'.join(TORCH_SUFFIXES)} state dict"
    )


def _weights_file(folder: Path) -> Path:
    weights = next((folder / name for name in HF_WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        present = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(
            f"{folder} holds no {' or '.join(HF_WEIGHT_FILES)} (found {present}); sharded checkpoints "
            "are not supported, save with a larger max_shard_size"
        )
    return weights


def _read_hf_folder(folder: Path) -> Source:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    weights = _weights_file(folder)
    hf_config = json.loads(config_file.read_text())
    preprocessor_file = folder / "preprocessor_config.json"
    preprocessor = json.loads(preprocessor_file.read_text()) if preprocessor_file.is_file() else None
    state = read_source(weights).state
    return Source(
        state,
        config_from_hf(hf_config, num_classes=hf_num_classes(hf_config, state), preprocessor=preprocessor),
        False,
    )


def _is_timm_config(config_file: Path) -> bool:
    """timm's hub folders (`push_to_hf_hub`) describe the model by `architecture`, transformers' by `model_type`."""
    if not config_file.is_file():
        return False
    data = json.loads(config_file.read_text())
    return "architecture" in data and "model_type" not in data


def _read_timm_folder(folder: Path, requested: BackboneConfig | None) -> Source:
    timm_config = json.loads((folder / "config.json").read_text())
    state = read_source(_weights_file(folder)).state
    architecture = str(timm_config["architecture"]).split(".")[0]
    base = requested if requested is not None else get_config(architecture)
    return Source(state, config_from_timm(timm_config, base, state), False)


def config_from_timm(
    timm_config: Mapping[str, Any], base: BackboneConfig, state: Mapping[str, torch.Tensor]
) -> BackboneConfig:
    """`base` with what a timm folder's config.json decides: classes (from the head's rows when
    present), `label_names`, the native input size and the eval preprocessing of `pretrained_cfg`."""
    pretrained = timm_config.get("pretrained_cfg") or {}
    head = next((t for k, t in state.items() if k in ("head.weight", "head.fc.weight")), None)
    num_classes = head.shape[0] if head is not None else int(timm_config.get("num_classes", 0))
    labels = tuple(str(v) for v in timm_config.get("label_names") or ())
    overrides: dict[str, Any] = {
        "num_classes": num_classes,
        "labels": labels if len(labels) == num_classes else (),
        **from_timm_pretrained_cfg(pretrained),
    }
    if "input_size" in pretrained:
        channels, height, width = pretrained["input_size"]
        if height != width:
            raise ValueError(f"non-square timm input_size {pretrained['input_size']} is not supported")
        overrides.update(in_chans=channels, img_size=height)
    return base.replace(**overrides)


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (a mapping of names to tensors)")
    return dict(state)


# ---------------------------------------------------------------- configs


def reconcile(checkpoint: BackboneConfig, requested: BackboneConfig) -> BackboneConfig:
    """The checkpoint's config, after checking that it describes the requested architecture.

    Fields in CHECKPOINT_FIELDS may differ (the checkpoint wins), fields in REQUESTED_FIELDS too (the
    request wins); any other difference is an error naming each field with both values.
    """
    if checkpoint.family != requested.family:
        raise ValueError(
            f"architecture mismatch: family: checkpoint {checkpoint.family!r}, requested {requested.family!r}"
        )
    mismatches = [
        f"{field.name}: checkpoint {getattr(checkpoint, field.name)!r}, requested {getattr(requested, field.name)!r}"
        for field in dataclasses.fields(checkpoint)
        if field.name not in CHECKPOINT_FIELDS + REQUESTED_FIELDS
        and getattr(checkpoint, field.name) != getattr(requested, field.name)
    ]
    if mismatches:
        raise ValueError(
            "architecture mismatch between checkpoint and requested config: " + "; ".join(mismatches)
        )
    return checkpoint.replace(**{f: getattr(requested, f) for f in REQUESTED_FIELDS if hasattr(requested, f)})


def config_from_weights(config: BackboneConfig, entries: list[Entry]) -> BackboneConfig:
    """`config` with the values a bare state dict decides: class count, q/k/v bias, ViT native image size."""
    tensors = {entry.ours: entry.tensor for entry in entries}
    head = tensors.get("head.weight")
    num_classes = head.shape[0] if head is not None else 0
    overrides: dict[str, Any] = {
        "num_classes": num_classes,
        "labels": config.labels if len(config.labels) == num_classes else (),
        "qkv_bias": any(name.endswith("attn.qkv.bias") for name in tensors),
    }
    pos_embed = tensors.get("pos_embed.weight")
    if isinstance(config, ViTConfig) and pos_embed is not None:
        side = math.isqrt(pos_embed.shape[1] - int(config.class_token))
        if side * side == pos_embed.shape[1] - int(config.class_token):
            overrides["img_size"] = side * config.patch_size
    return config.replace(**overrides)


# ---------------------------------------------------------------- strict loading


def _describe(source: str, ours: str, part: int | None) -> str:
    target = ours if part is None else f"{ours} ({QKV_PARTS[part]} slice)"
    return target if source == ours else f"{source} -> {target}"


def _listed(title: str, items: list[str]) -> list[str]:
    more = [f"  ... and {len(items) - MAX_LISTED} more {title}"] if len(items) > MAX_LISTED else []
    return [f"  {title}: {item}" for item in items[:MAX_LISTED]] + more


def check_entries(model: nn.Module, entries: list[Entry], unknown: list[str], layout: KeyLayout) -> list[str]:
    """Every problem that would stop a strict load, each naming the tensor in both vocabularies."""
    expected = model.state_dict()
    seen: dict[tuple[str, int | None], str] = {}
    unexpected = [f"{name} (no counterpart in our model)" for name in unknown]
    shapes, duplicates = [], []
    for entry in entries:
        if entry.ours not in expected:
            unexpected.append(
                f"{_describe(entry.source, entry.ours, entry.part)} (our model has no such tensor)"
            )
            continue
        key = (entry.ours, entry.part)
        if key in seen:
            duplicates.append(
                f"{entry.source} and {seen[key]} both fill {_describe(entry.ours, entry.ours, entry.part)}"
            )
            continue
        seen[key] = entry.source
        want = tuple(expected[entry.ours].shape)
        if entry.part is not None:
            want = (want[0] // 3, *want[1:])
        if tuple(entry.tensor.shape) != want:
            shapes.append(
                f"{_describe(entry.source, entry.ours, entry.part)}: expected {want}, found {tuple(entry.tensor.shape)}"
            )
    missing = [
        f"{_describe(' or '.join(layout.source_names(ours, part)), ours, part)}"
        for ours in expected
        for part in layout.parts(ours)
        if (ours, part) not in seen
    ]
    return (
        _listed("missing", missing)
        + _listed("unexpected", unexpected)
        + _listed("mis-shaped", shapes)
        + _listed("duplicate", duplicates)
    )


def assemble(entries: list[Entry]) -> dict[str, torch.Tensor]:
    """Our state dict: whole tensors as they are, q/k/v slices concatenated into the fused qkv."""
    state: dict[str, torch.Tensor] = {}
    slices: dict[str, dict[int, torch.Tensor]] = {}
    for entry in entries:
        if entry.part is None:
            state[entry.ours] = entry.tensor
        else:
            slices.setdefault(entry.ours, {})[entry.part] = entry.tensor
    for name, parts in slices.items():
        state[name] = torch.cat([parts[index] for index in range(len(QKV_PARTS))])
    return state


# ---------------------------------------------------------------- public API


def fit_bias_tables(expected: Mapping[str, torch.Tensor], entries: list[Entry]) -> list[Entry]:
    """Entries with every relative-position-bias table resized to our window where only the window
    differs (same heads), as timm does when a checkpoint is fine-tuned at another window size."""
    fitted = []
    for entry in entries:
        want = expected.get(entry.ours)
        if (
            entry.ours.endswith(BIAS_TABLE_SUFFIX)
            and want is not None
            and entry.tensor.ndim == 2
            and entry.tensor.shape != want.shape
            and entry.tensor.shape[1] == want.shape[1]
        ):
            side = (math.isqrt(want.shape[0]) + 1) // 2
            entry = dataclasses.replace(
                entry, tensor=resize_relative_position_bias_table(entry.tensor, (side, side))
            )
        fitted.append(entry)
    return fitted


def _tensor_names(config: BackboneConfig) -> set[str]:
    """Our state-dict names for `config`, from a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return set(build_model(config).state_dict())


def load_checkpoint(path: str | Path, config: BackboneConfig | None = None) -> nn.Module:
    """A model in eval mode with the checkpoint's weights, labels and config values.

    With a Hugging Face or timm folder or a `save_checkpoint` file, `config` is optional: when given,
    its architecture must agree with the checkpoint's (ValueError naming each mismatching field);
    the fields in CHECKPOINT_FIELDS come from the checkpoint, `window_size` / `partition_size` from
    `config` (bias tables are resized to it). A bare state dict (ours, timm's or a Hugging Face
    layout, recognised by its names) needs `config`; the class count, q/k/v bias and ViT image size
    are read off its tensors. Loading is strict: CheckpointError lists every missing, unexpected,
    mis-shaped or duplicate tensor by its checkpoint name and ours.
    """
    path = Path(path)
    source = read_source(path, config)
    if source.config is None and config is None:
        raise ValueError(
            f"{path} is a bare state dict with no architecture: pass config= (or use create_model)"
        )
    family = (source.config or config).family
    layout: KeyLayout = (
        OwnLayout()
        if source.own_layout
        else choose_layout(source.state, family, _tensor_names(source.config or config))
    )
    entries, unknown = layout.entries(source.state)
    if source.config is None:
        final = config_from_weights(config, entries)
    else:
        final = source.config if config is None else reconcile(source.config, config)
    model = build_model(final)
    expected = model.state_dict()
    entries = fit_bias_tables(expected, entries)
    problems = check_entries(model, entries, unknown, layout)
    if problems:
        raise CheckpointError(
            f"cannot load {path} into a {family} model ({len(problems)} problem(s)) read as the "
            f"{layout.name} layout; the checkpoint and config disagree, or the file is not a ViT/Swin "
            "checkpoint in a supported layout (vitserve, timm, Hugging Face):\n" + "\n".join(problems)
        )
    model.load_state_dict(assemble(entries))
    return model.eval()


def save_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Write `model`'s weights and config (labels included) to a .safetensors file `load_checkpoint` reads
    without further arguments. Written to a temporary name and renamed, so readers never see half a file."""
    config = getattr(model, "config", None)
    if not isinstance(config, BackboneConfig):
        raise TypeError(
            f"{type(model).__name__} has no BackboneConfig in .config; only vitserve models can be saved"
        )
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_checkpoint writes .safetensors files, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial), metadata={CONFIG_METADATA_KEY: json.dumps(config.to_dict())})
    os.replace(partial, path)
    return path


__all__ = ["CheckpointError", "config_from_hf", "load_checkpoint", "save_checkpoint"]
