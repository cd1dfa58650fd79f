"""The backbones learn a real task (scikit-learn digits), and a saved checkpoint reproduces them exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from models import load_checkpoint, save_checkpoint
from support.digits import DigitsData, accuracy, normalize

MIN_ACCURACY = 0.9


@pytest.fixture(params=["vit", "swin"])
def trained(request: pytest.FixtureRequest) -> nn.Module:
    return request.getfixturevalue(f"digits_{request.param}")


def test_trained_model_classifies_held_out_digits(trained: nn.Module, digits_data: DigitsData) -> None:
    assert accuracy(trained, digits_data) >= MIN_ACCURACY


def test_checkpoint_round_trip_gives_identical_logits(
    trained: nn.Module, digits_data: DigitsData, tmp_path: Path
) -> None:
    path = save_checkpoint(trained, tmp_path / "digits.safetensors")
    reloaded = load_checkpoint(path)
    assert reloaded.config == trained.config
    assert reloaded.config.label_names() == list(digits_data.labels)
    inputs = normalize(digits_data.test_images[:64], trained.config)
    with torch.no_grad():
        expected, actual = trained(inputs), reloaded(inputs)
    assert torch.equal(actual.logits, expected.logits)
    assert torch.equal(actual.embedding, expected.embedding)
    assert accuracy(reloaded, digits_data) == accuracy(trained, digits_data)
