"""A real, learnable classification task for end-to-end tests: scikit-learn's handwritten digits.

Random weights cannot tell a correct pipeline from one that scrambles pixels or channels, so
export and serving tests need a model that has actually learned something. The 8x8 digits are
upscaled to small RGB images, and tiny ViT / Swin backbones, built from registry names like any
other model, train on them in seconds on a CPU. Training is seeded, so a session gets the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from models import BackboneConfig, create_model, get_config

Family = Literal["vit", "swin"]
DIGIT_LABELS = tuple(str(d) for d in range(10))
DIGITS_IMG_SIZE = 32
TEST_FRACTION = 0.25
SPLIT_SEED = 0

# Per family: the registry name and the overrides that shrink it to a digits-sized model. Patch 8 keeps
# the token count small enough to train in seconds: the ViT sees a 4x4 grid behind a class token; the Swin
# a 4x4 grid in 2x2 windows, so stage 1 runs shifted windows and stage 2 (2x2) fits in one unshifted window.
DIGITS_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": (
        "vit_tiny_patch16_224",
        {"patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 4, "mlp_ratio": 2.0},
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {
            "patch_size": 8,
            "window_size": 2,
            "embed_dim": 32,
            "depths": (2, 2),
            "num_heads": (2, 4),
            "mlp_ratio": 2.0,
        },
    ),
}
# Epochs that reach ~97% held-out accuracy over several seeds; the ViT converges more slowly than the Swin.
DIGITS_EPOCHS = {"vit": 20, "swin": 15}
# Random translation by up to 1/16 of the image (2 pixels at 32x32): the cheapest augmentation that keeps
# these small models from overfitting 1347 training images.
MAX_SHIFT_FRACTION = 2 / DIGITS_IMG_SIZE


@dataclass(frozen=True)
class DigitsData:
    """Images are float32 (N, 3, size, size) in [0, 1], not normalized; labels are int64 class indices."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    labels: tuple[str, ...] = DIGIT_LABELS

    @property
    def size(self) -> int:
        return self.train_images.shape[-1]


def load_digits_images(size: int = DIGITS_IMG_SIZE) -> DigitsData:
    """The digits as size x size RGB images (bilinear upscaling) with a fixed stratified 75/25 train/test split."""
    digits = load_digits()
    gray = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    images = images.expand(-1, 3, -1, -1).contiguous()
    targets = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(targets)), test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return DigitsData(images[train_idx], targets[train_idx], images[test_idx], targets[test_idx])


def digits_model_spec(family: Family, size: int = DIGITS_IMG_SIZE) -> tuple[str, dict[str, Any]]:
    """`(name, overrides)` such that `create_model(name, **overrides)` builds the untrained digits model."""
    if family not in DIGITS_MODELS:
        raise ValueError(f"unknown digits model family {family!r}; choose one of {sorted(DIGITS_MODELS)}")
    name, overrides = DIGITS_MODELS[family]
    return name, {**overrides, "img_size": size, "num_classes": len(DIGIT_LABELS), "labels": DIGIT_LABELS}


def digits_config(family: Family, size: int = DIGITS_IMG_SIZE) -> BackboneConfig:
    """The config of the digits model for `family`."""
    name, overrides = digits_model_spec(family, size)
    return get_config(name, **overrides)


def normalize(images: torch.Tensor, config: BackboneConfig) -> torch.Tensor:
    """Map [0, 1] images (N, C, H, W) to the model's input space with the config's mean and std."""
    mean = torch.tensor(config.mean, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(config.std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


def random_translate(images: torch.Tensor, max_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random sub-pixel offset, filling with black (the digits' background)."""
    offsets = (torch.rand(len(images), 2, generator=generator) * 2 - 1) * (2 * max_fraction)
    theta = torch.zeros(len(images), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = offsets
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def train_digits_model(
    family: Family,
    data: DigitsData,
    epochs: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 2e-3,
) -> nn.Module:
    """Train the digits model of `family` from a seeded init (AdamW, one-cycle LR); returns it in eval mode.

    Runs on one intra-op thread: these matrices are too small to gain from more, and OpenMP
    spin-waiting makes two threads many times slower when other processes share the cores. The
    thread count and the global RNG state are restored afterwards, so other tests are not perturbed.
    """
    name, overrides = digits_model_spec(family, data.size)
    epochs = DIGITS_EPOCHS[family] if epochs is None else epochs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = create_model(name, **overrides)
            _fit(model, data, epochs, torch.Generator().manual_seed(seed), batch_size, lr)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _fit(
    model: nn.Module, data: DigitsData, epochs: int, generator: torch.Generator, batch_size: int, lr: float
) -> None:
    """Minibatch AdamW with label smoothing on randomly translated training images."""
    steps_per_epoch = -(-len(data.train_images) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_images), generator=generator)
        for batch in order.split(batch_size):
            images = random_translate(data.train_images[batch], MAX_SHIFT_FRACTION, generator)
            logits = model(normalize(images, model.config)).logits
            loss = F.cross_entropy(logits, data.train_labels[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class indices for [0, 1] images, normalized with the model's own config."""
    inputs = normalize(images, model.config)
    return torch.cat([model(chunk).logits.argmax(dim=1) for chunk in inputs.split(batch_size)])


def accuracy(model: nn.Module, data: DigitsData) -> float:
    """Fraction of the held-out test images the model classifies correctly."""
    return (predict(model, data.test_images) == data.test_labels).double().mean().item()
