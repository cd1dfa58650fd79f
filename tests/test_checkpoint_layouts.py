"""Checkpoints in the layouts users have: vitserve's own bare state dicts and timm's ViT / Swin.

timm cannot be imported here (torchvision 0.28.0 from PyPI is the CUDA build and needs
libc10_cuda.so, which the CPU torch wheel lacks), so its layout is tested on state dicts these tests
write with timm's key names, translated from one of our models by the hand-written tables below
(timm's `VisionTransformer` and `SwinTransformer` module names; since timm 0.9 a Swin merge opens
the next stage, `layers.{s+1}.downsample`, and the head is `head.fc`). Loading the translated file
must rebuild the same function: identical outputs prove every tensor landed in its place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models import build_model, create_model, get_config
from models.checkpoint import CheckpointError

VIT = "vit_tiny_patch16_224"
SMALL_VIT = {"embed_dim": 48, "num_heads": 3, "depth": 2, "patch_size": 8, "img_size": 32, "num_classes": 5}
SWIN = "swin_tiny_patch4_window7_224"
SMALL_SWIN = {"embed_dim": 16, "depths": (2, 2, 2), "num_heads": (1, 2, 4), "window_size": 4, "img_size": 64}


def timm_vit_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ViT names: ours except the position table, a bare `pos_embed` parameter there."""
    return {("pos_embed" if k == "pos_embed.weight" else k): v for k, v in state.items()}


def timm_swin_names(state: dict[str, torch.Tensor], modern: bool = True) -> dict[str, torch.Tensor]:
    """timm's Swin names (>= 0.9 when `modern`, else the original layout), with its index buffers."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.replace(
            "attn.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"
        )
        if match := re.fullmatch(r"stages\.(\d+)\.downsample\.(.*)", key):
            stage = int(match[1]) + (1 if modern else 0)
            key = f"layers.{stage}.downsample.{match[2]}"
        key = re.sub(r"^stages\.", "layers.", key)
        if modern and key.startswith("head."):
            key = "head.fc." + key.removeprefix("head.")
        renamed[key] = value
        if key.endswith("relative_position_bias_table"):
            window = (int(value.shape[0] ** 0.5) + 1) // 2
            renamed[key.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(
                window**4, dtype=torch.long
            )
    return renamed


def same_function(a: nn.Module, b: nn.Module, size: tuple[int, int]) -> bool:
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x, y = a(pixels), b(pixels)
    return torch.equal(x.logits, y.logits) and torch.equal(x.embedding, y.embedding)


@pytest.mark.parametrize(("name", "overrides"), [(VIT, SMALL_VIT), (SWIN, SMALL_SWIN)])
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_bare_vitserve_state_dict_loads(tmp_path: Path, name: str, overrides: dict, suffix: str) -> None:
    """The issue's new-user path: save_file(model.state_dict(), ...) and load it back by name."""
    model = create_model(name, **overrides)
    path = tmp_path / f"m{suffix}"
    save_file(model.state_dict(), path) if suffix == ".safetensors" else torch.save(model.state_dict(), path)
    loaded = create_model(name, checkpoint=path, **overrides)
    assert same_function(model, loaded, (overrides["img_size"], overrides["img_size"]))


def test_timm_vit_state_dict_loads(tmp_path: Path) -> None:
    model = create_model(VIT, **SMALL_VIT)
    state = timm_vit_names(model.state_dict())
    assert {"cls_token", "pos_embed", "blocks.1.attn.qkv.weight", "head.bias"} <= set(state)
    save_file(state, tmp_path / "timm.safetensors")
    loaded = create_model(VIT, checkpoint=tmp_path / "timm.safetensors", **{**SMALL_VIT, "num_classes": 1000})
    assert loaded.config.num_classes == SMALL_VIT["num_classes"]
    assert same_function(model, loaded, (32, 48))


@pytest.mark.parametrize("modern", [True, False], ids=["timm>=0.9", "timm<0.9"])
def test_timm_swin_state_dict_loads(tmp_path: Path, modern: bool) -> None:
    overrides = {**SMALL_SWIN, "num_classes": 7}
    model = create_model(SWIN, **overrides)
    state = timm_swin_names(model.state_dict(), modern)
    merges = {"layers.1.downsample.reduction.weight", "layers.2.downsample.norm.bias"}
    assert merges <= set(state) if modern else "layers.0.downsample.reduction.weight" in state
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = create_model(SWIN, checkpoint=tmp_path / "pytorch_model.bin", **overrides)
    assert same_function(model, loaded, (72, 88))


def test_timm_layout_errors_name_both_vocabularies(tmp_path: Path) -> None:
    state = timm_swin_names(create_model(SWIN, **SMALL_SWIN).state_dict())
    del state["layers.2.downsample.norm.weight"]
    state["layers.0.blocks.0.ls1.gamma"] = torch.ones(16)
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="read as the timm layout") as raised:
        create_model(SWIN, checkpoint=tmp_path / "broken.safetensors", **SMALL_SWIN)
    message = str(raised.value)
    assert "missing: layers.2.downsample.norm.weight -> stages.1.downsample.norm.weight" in message
    assert "unexpected: layers.0.blocks.0.ls1.gamma (no counterpart in our model)" in message


def test_timm_folder_brings_labels_and_preprocessing(tmp_path: Path) -> None:
    model = create_model(VIT, **SMALL_VIT)
    save_file(timm_vit_names(model.state_dict()), tmp_path / "model.safetensors")
    labels = [f"species {i}" for i in range(SMALL_VIT["num_classes"])]
    pretrained_cfg = {
        "input_size": [3, 32, 32],
        "interpolation": "bicubic",
        "mean": [0.4, 0.5, 0.6],
        "std": [0.2, 0.25, 0.3],
        "crop_pct": 0.9,
        "crop_mode": "center",
    }
    config = {"architecture": f"{VIT}.augreg_in21k", "num_classes": 5, "label_names": labels}
    (tmp_path / "config.json").write_text(json.dumps({**config, "pretrained_cfg": pretrained_cfg}))
    loaded = create_model(VIT, checkpoint=tmp_path, **SMALL_VIT)
    cfg = loaded.config
    assert cfg.label_names() == labels
    assert (cfg.interpolation, cfg.resize, cfg.crop_pct) == ("bicubic", "crop", 0.9)
    assert (cfg.mean, cfg.std) == ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    assert same_function(model, loaded, (32, 32))


def test_architecture_still_has_to_match(tmp_path: Path) -> None:
    save_file(
        timm_vit_names(build_model(get_config(VIT, **SMALL_VIT)).state_dict()), tmp_path / "t.safetensors"
    )
    with pytest.raises(
        CheckpointError, match=r"mis-shaped: blocks\.0\.norm1\.weight: expected \(64,\), found \(48,\)"
    ):
        create_model(
            VIT, checkpoint=tmp_path / "t.safetensors", **{**SMALL_VIT, "embed_dim": 64, "num_heads": 4}
        )
