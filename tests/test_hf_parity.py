"""Parity with Hugging Face transformers: HF models built from configs (no hub), saved, loaded into ours.

Logits and embeddings must match to RELATIVE_TOLERANCE at the native size and at another one: ViT with
`interpolate_pos_encoding=True`, Swin at sizes that need window padding and odd patch merging. The
embedding reference is ViT's final-normed class token (`last_hidden_state[:, 0]`) and Swin's
`pooler_output`. Both HF key layouts are covered: transformers 5.x `save_pretrained` writes the 4.x
names, and the in-memory 5.x `state_dict()` gives the new ones.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models import ViTConfig, create_model
from models.checkpoint import load_checkpoint

try:
    import transformers
except ImportError as missing:  # a required reference, never a silent skip
    raise ImportError(
        "transformers (the reference implementation) is missing: run `make install` "
        "(installs the dev extra: pip install -e '.[dev]')"
    ) from missing

RELATIVE_TOLERANCE = 1e-4
SMALL_VIT = {
    "hidden_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "intermediate_size": 96,
    "image_size": 32,
    "patch_size": 8,
}
# Three stages at 72x88: 18x22 tokens padded to windows, merged to an odd 9x11, then 5x6 with a shift.
SMALL_SWIN = {
    "embed_dim": 16,
    "depths": [2, 2, 2],
    "num_heads": [2, 4, 8],
    "image_size": 64,
    "window_size": 4,
}
SIZES = {"vit": [(32, 32), (48, 64)], "swin": [(64, 64), (72, 88)]}
# An eps this large changes the outputs visibly, so ignoring it (or the missing q/k/v bias) fails parity.
VARIANTS = {"defaults": {}, "eps_and_no_qkv_bias": {"layer_norm_eps": 0.1, "qkv_bias": False}}
NUM_LABELS = 3


def hf_model(family: str, with_head: bool, **config: object) -> nn.Module:
    """A seeded random transformers model in eval mode: ...ForImageClassification or the bare ...Model."""
    torch.manual_seed(0)
    prefix = "ViT" if family == "vit" else "Swin"
    hf_config = getattr(transformers, f"{prefix}Config")(**config)
    cls = getattr(transformers, f"{prefix}ForImageClassification" if with_head else f"{prefix}Model")
    return cls(hf_config).eval()


def small_hf_model(family: str, with_head: bool, **overrides: object) -> nn.Module:
    config = {**(SMALL_VIT if family == "vit" else SMALL_SWIN), **overrides}
    if with_head:
        config["num_labels"] = NUM_LABELS
    return hf_model(family, with_head, **config)


def save_hf(model: nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


@torch.no_grad()
def hf_outputs(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(logits, or None for a headless model; embedding) from one transformers forward pass."""
    model_type = model.config.model_type
    kwargs = {"interpolate_pos_encoding": True} if model_type == "vit" else {}
    backbone = getattr(model, model_type, model)
    trunk_outputs = []
    hook = backbone.register_forward_hook(lambda module, args, output: trunk_outputs.append(output))
    try:
        result = model(pixels, **kwargs)
    finally:
        hook.remove()
    trunk = trunk_outputs[0]
    embedding = trunk.last_hidden_state[:, 0] if model_type == "vit" else trunk.pooler_output
    return (None if backbone is model else result.logits), embedding


@torch.no_grad()
def assert_parity(
    reference: nn.Module, sizes: list[tuple[int, int]], *models: nn.Module, batch: int = 2
) -> None:
    """Each of our models matches the reference's embedding, and its logits too when it has a head."""
    for height, width in sizes:
        pixels = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height * width))
        # HF Swin layers clamp their shift for good the first time a feature map is no larger than a
        # window (set_shift_and_window_size), so every size runs on a fresh copy.
        fresh = copy.deepcopy(reference) if reference.config.model_type == "swin" else reference
        logits, embedding = hf_outputs(fresh, pixels)
        for ours in models:
            out = ours(pixels)
            assert relative_error(out.embedding, embedding) <= RELATIVE_TOLERANCE, (height, width)
            if ours.config.num_classes:
                assert relative_error(out.logits, logits) <= RELATIVE_TOLERANCE, (height, width)
            else:
                assert torch.equal(out.logits, out.embedding)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("with_head", [True, False], ids=["classifier", "headless"])
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_small_models_match_transformers(tmp_path: Path, family: str, with_head: bool, variant: str) -> None:
    reference = small_hf_model(family, with_head, **VARIANTS[variant])
    ours = load_checkpoint(save_hf(reference, tmp_path))
    assert ours.config.num_classes == (NUM_LABELS if with_head else 0)
    assert ours.config.layer_norm_eps == reference.config.layer_norm_eps
    assert ours.config.qkv_bias == reference.config.qkv_bias
    assert_parity(reference, SIZES[family], ours)


@pytest.mark.parametrize(
    ("name", "family", "sizes"),
    [
        ("vit_base_patch16_224", "vit", [(224, 224), (288, 288)]),
        ("swin_tiny_patch4_window7_224", "swin", [(224, 224), (256, 320)]),
    ],
)
def test_default_size_models_match_transformers(
    tmp_path: Path, name: str, family: str, sizes: list[tuple[int, int]]
) -> None:
    """ViT-B/16 and Swin-T from transformers' default configs, loaded through the registry names, both as
    ...ForImageClassification and, from the same weights, as the headless ...Model (its backbone)."""
    reference = hf_model(family, with_head=True)
    classifier = create_model(name, checkpoint=save_hf(reference, tmp_path / "classifier"))
    headless = create_model(name, checkpoint=save_hf(getattr(reference, family), tmp_path / "headless"))
    assert (classifier.config.num_classes, headless.config.num_classes) == (2, 0)
    assert classifier.config.layer_norm_eps == reference.config.layer_norm_eps
    assert_parity(reference, sizes, classifier, headless, batch=1)


def layout_state_dicts(model: nn.Module, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The model's weights under transformers 4.x names (as save_pretrained writes them) and 5.x names."""
    legacy = load_file(save_hf(model, folder) / "model.safetensors")
    current = model.state_dict()
    assert any(".query." in key for key in legacy) and not any(".query." in key for key in current)
    assert any(".q_proj." in key for key in current) and not any(".q_proj." in key for key in legacy)
    return {"legacy": legacy, "current": current}


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("layout", ["legacy", "current"])
@pytest.mark.parametrize("with_head", [True, False], ids=["classifier", "headless"])
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_both_key_layouts_load(
    tmp_path: Path, family: str, with_head: bool, layout: str, weights_file: str
) -> None:
    reference = small_hf_model(family, with_head)
    state = layout_state_dicts(reference, tmp_path / "saved")[layout]
    folder = tmp_path / "rewritten"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    if weights_file.endswith(".bin"):
        torch.save(state, folder / weights_file)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, folder / weights_file)
    assert_parity(reference, SIZES[family][1:], load_checkpoint(folder))


def test_bare_state_dict_takes_architecture_from_config(tmp_path: Path) -> None:
    reference = small_hf_model("vit", True, qkv_bias=False)
    save_hf(reference, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    config = ViTConfig(
        img_size=224,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        mlp_ratio=2.0,
        layer_norm_eps=hf_config["layer_norm_eps"],
        num_classes=1000,
    )
    ours = load_checkpoint(tmp_path / "model.safetensors", config)
    # Read off the tensors: the position table's grid, the classifier's rows, the absent q/k/v bias.
    assert (ours.config.img_size, ours.config.num_classes, ours.config.qkv_bias) == (32, NUM_LABELS, False)
    assert_parity(reference, SIZES["vit"], ours)
