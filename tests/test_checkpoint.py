"""Checkpoint loading: config translation, labels, strict errors that name what is wrong, our own format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_hf_parity import NUM_LABELS, SMALL_VIT, save_hf, small_hf_model
from torch import nn

from models import SwinConfig, ViTConfig, build_model, create_model, get_config
from models.checkpoint import (
    CONFIG_METADATA_KEY,
    CheckpointError,
    config_from_hf,
    load_checkpoint,
    save_checkpoint,
)

try:
    import transformers
except ImportError as missing:  # a required reference, never a silent skip
    raise ImportError(
        "transformers (the reference implementation) is missing: run `make install` "
        "(installs the dev extra: pip install -e '.[dev]')"
    ) from missing

LABELS = ("cat", "dog", "bird")
PREFIX_Q = "vit.encoder.layer.0.attention.attention.query.weight"
# Our fields for SMALL_VIT, stated independently of the code under test.
OUR_SMALL_VIT = {
    "embed_dim": 48,
    "depth": 2,
    "num_heads": 3,
    "mlp_ratio": 2.0,
    "patch_size": 8,
    "img_size": 32,
}


@pytest.fixture
def vit_folder(tmp_path: Path) -> Path:
    """A small ViTForImageClassification saved by transformers (4.x key names, `vit.` prefix)."""
    return save_hf(small_hf_model("vit", True), tmp_path / "vit")


def rewrite_weights(folder: Path, edit) -> Path:
    """Apply `edit` to the folder's state dict in place and write it back."""
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")
    return folder


def test_config_from_hf_vit_defaults_is_vit_base_patch16() -> None:
    config = config_from_hf(transformers.ViTConfig().to_dict(), num_classes=0)
    expected = get_config("vit_base_patch16_224")
    assert isinstance(config, ViTConfig)
    assert (config.embed_dim, config.depth, config.num_heads, config.mlp_ratio, config.patch_size) == (
        768,
        12,
        12,
        4.0,
        16,
    )
    assert (config.class_token, config.global_pool, config.pos_embed) == (True, "token", "learned_1d")
    assert config.mean == config.std == (0.5, 0.5, 0.5)
    assert config.layer_norm_eps == 1e-12 and config.num_classes == 0
    assert (
        config.replace(layer_norm_eps=expected.layer_norm_eps, num_classes=expected.num_classes) == expected
    )


def test_config_from_hf_swin_defaults_is_swin_tiny() -> None:
    config = config_from_hf(transformers.SwinConfig().to_dict(), num_classes=1000)
    assert isinstance(config, SwinConfig)
    assert config.labels == () and config.num_classes == 1000
    assert config == get_config("swin_tiny_patch4_window7_224")


@pytest.mark.parametrize(
    ("family", "options", "message"),
    [
        ("Swin", {"use_absolute_embeddings": True}, "use_absolute_embeddings"),
        ("ViT", {"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
        ("ViT", {"image_size": [224, 320]}, "non-square image_size"),
    ],
)
def test_unsupported_hf_options_are_rejected(family: str, options: dict, message: str) -> None:
    hf_config = getattr(transformers, f"{family}Config")(**options).to_dict()
    with pytest.raises(ValueError, match=message):
        config_from_hf(hf_config, num_classes=0)


def test_unsupported_model_type_is_rejected(tmp_path: Path) -> None:
    save_hf(transformers.DeiTModel(transformers.DeiTConfig(**SMALL_VIT)), tmp_path)
    with pytest.raises(ValueError, match="model_type 'deit'"):
        load_checkpoint(tmp_path)


def test_labels_and_preprocessing_come_along(tmp_path: Path) -> None:
    id2label = dict(enumerate(LABELS))
    folder = save_hf(small_hf_model("swin", True, id2label=id2label, label2id={}), tmp_path)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1] * 3, "image_std": [0.2] * 3})
    )
    model = load_checkpoint(folder)
    assert model.config.labels == LABELS and model.config.label_names() == list(LABELS)
    assert (model.config.mean, model.config.std) == ((0.1,) * 3, (0.2,) * 3)


def test_headless_checkpoint_has_identity_head(tmp_path: Path) -> None:
    model = load_checkpoint(save_hf(small_hf_model("vit", False), tmp_path))
    assert model.config.num_classes == 0 and isinstance(model.head, nn.Identity)


def test_missing_key_is_named(vit_folder: Path) -> None:
    rewrite_weights(vit_folder, lambda state: state.pop("vit.encoder.layer.1.intermediate.dense.weight"))
    with pytest.raises(CheckpointError, match="missing") as error:
        load_checkpoint(vit_folder)
    assert "vit.encoder.layer.1.intermediate.dense.weight -> blocks.1.mlp.fc1.weight" in str(error.value)


def test_missing_qkv_slice_is_named(vit_folder: Path) -> None:
    rewrite_weights(vit_folder, lambda state: state.pop(PREFIX_Q.replace("query", "key")))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(vit_folder)
    assert f"{PREFIX_Q.replace('query', 'key')} -> blocks.0.attn.qkv.weight (k slice)" in str(error.value)


def test_missing_key_is_named_in_the_checkpoints_own_layout(tmp_path: Path) -> None:
    state = small_hf_model("vit", True).state_dict()
    del state["vit.layers.0.mlp.fc1.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"missing: vit\.layers\.0\.mlp\.fc1\.weight -> blocks\.0\.mlp\.fc1\.weight$"
    ):
        load_checkpoint(tmp_path / "model.safetensors", get_config("vit_tiny_patch16_224", **OUR_SMALL_VIT))


def test_classification_checkpoint_without_classifier_is_not_silently_headless(vit_folder: Path) -> None:
    rewrite_weights(vit_folder, lambda state: [state.pop(f"classifier.{p}") for p in ("weight", "bias")])
    with pytest.raises(CheckpointError, match="missing: classifier.weight -> head.weight"):
        load_checkpoint(vit_folder)


def test_unexpected_key_is_named(vit_folder: Path) -> None:
    rewrite_weights(
        vit_folder, lambda state: state.update({"vit.encoder.layer.0.extra.weight": torch.ones(2)})
    )
    with pytest.raises(CheckpointError, match="unexpected: vit.encoder.layer.0.extra.weight"):
        load_checkpoint(vit_folder)


def test_misshaped_tensor_is_named_with_both_shapes(vit_folder: Path) -> None:
    rewrite_weights(vit_folder, lambda state: state.update({PREFIX_Q: torch.zeros(48, 40)}))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(vit_folder)
    assert f"{PREFIX_Q} -> blocks.0.attn.qkv.weight (q slice): expected (48, 48), found (48, 40)" in str(
        error.value
    )


def test_head_of_wrong_size_is_named(vit_folder: Path) -> None:
    rewrite_weights(vit_folder, lambda state: state.update({"classifier.bias": torch.zeros(NUM_LABELS + 1)}))
    with pytest.raises(CheckpointError, match=r"classifier.bias -> head.bias: expected \(3,\), found \(4,\)"):
        load_checkpoint(vit_folder)


def test_architecture_mismatch_names_each_field(vit_folder: Path) -> None:
    with pytest.raises(ValueError, match="architecture mismatch") as error:
        create_model("vit_tiny_patch16_224", checkpoint=vit_folder)
    message = str(error.value)
    assert "embed_dim: checkpoint 48, requested 192" in message
    assert "depth: checkpoint 2, requested 12" in message
    assert "patch_size: checkpoint 8, requested 16" in message
    with pytest.raises(ValueError, match="family: checkpoint 'vit', requested 'swin'"):
        create_model("swin_tiny_patch4_window7_224", checkpoint=vit_folder)


def test_checkpoint_decides_non_architectural_fields(vit_folder: Path) -> None:
    requested = get_config(
        "vit_tiny_patch16_224", **{**OUR_SMALL_VIT, "img_size": 224}, num_classes=10, layer_norm_eps=0.5
    )
    model = load_checkpoint(vit_folder, requested)
    assert (model.config.num_classes, model.config.img_size, model.config.layer_norm_eps) == (
        NUM_LABELS,
        32,
        1e-12,
    )


def test_bare_state_dict_needs_a_config(vit_folder: Path) -> None:
    with pytest.raises(ValueError, match="pass config="):
        load_checkpoint(vit_folder / "model.safetensors")


def test_missing_files_are_reported(tmp_path: Path, vit_folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    (vit_folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors or pytorch_model.bin"):
        load_checkpoint(vit_folder)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("vit_tiny_patch16_224", {"depth": 2, "img_size": 32, "patch_size": 8, "num_classes": 3}),
        (
            "swin_tiny_patch4_window7_224",
            {"depths": (2, 2), "num_heads": (3, 6), "window_size": 4, "img_size": 64},
        ),
    ],
)
def test_save_and_load_round_trip(tmp_path: Path, name: str, overrides: dict) -> None:
    config = get_config(
        name, **overrides, labels=tuple(f"label {i}" for i in range(overrides.get("num_classes", 1000)))
    )
    model = build_model(config)
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()[CONFIG_METADATA_KEY])["family"] == config.family
    loaded = create_model(name, checkpoint=path, **overrides)
    assert loaded.config == config and not loaded.training
    pixels = torch.randn(2, 3, 48, 56)
    with torch.no_grad():
        expected, actual = model(pixels), loaded(pixels)
    assert torch.equal(expected.logits, actual.logits) and torch.equal(expected.embedding, actual.embedding)


def test_own_format_is_strict_too(tmp_path: Path) -> None:
    path = save_checkpoint(
        build_model(get_config("vit_tiny_patch16_224", depth=1)), tmp_path / "model.safetensors"
    )
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(path)
    del state["blocks.0.mlp.fc2.bias"]
    save_file(state, path, metadata=metadata)
    with pytest.raises(CheckpointError, match=r"missing: blocks\.0\.mlp\.fc2\.bias$"):
        load_checkpoint(path)


def test_save_checkpoint_rejects_other_suffixes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_checkpoint(build_model(get_config("vit_tiny_patch16_224", depth=1)), tmp_path / "model.bin")
