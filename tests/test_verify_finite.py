"""Export verification cannot pass garbage: non-finite outputs fail, naming the output and where.

NaN compares false with every tolerance, so before this check an artifact whose logits were NaN was
published as verified. The model here is a real (small) ViT whose checkpoint has one NaN head bias:
export must fail, say that `logits` is non-finite at class 7 of the first sample, leave `embedding`
out of the complaint, and write nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from export import ExportError, ExportRequest, export_model
from export.verify import non_finite_problems
from models import create_model, save_checkpoint

VIT = "vit_tiny_patch16_224"
SMALL_VIT = {"embed_dim": 32, "num_heads": 2, "depth": 1, "num_classes": 10, "img_size": 32}
NAN_CLASS = 7


def test_nan_head_bias_makes_export_fail(tmp_path: Path) -> None:
    model = create_model(VIT, **SMALL_VIT)
    with torch.no_grad():
        model.head.bias[NAN_CLASS] = math.nan
    checkpoint = save_checkpoint(model, tmp_path / "nan.safetensors")
    repository = tmp_path / "repo"
    request = ExportRequest(
        model=VIT, repository=repository, buckets=(32,), checkpoint=checkpoint, overrides=SMALL_VIT
    )
    with pytest.raises(ExportError) as raised:
        export_model(request, log=lambda _: None)
    message = str(raised.value)
    assert "PyTorch reference output 'logits' has 3 NaN" in message
    assert f"first at index (0, {NAN_CLASS})" in message
    assert "in 3 of 3 samples" in message
    assert "'embedding'" not in message
    assert not repository.exists()


def test_finite_outputs_pass_and_inf_is_located() -> None:
    clean = {"logits": np.zeros((2, 4), np.float32), "embedding": np.ones((2, 3), np.float32)}
    assert non_finite_problems(clean, "artifact") == []
    broken = dict(clean, embedding=np.ones((2, 3), np.float32))
    broken["embedding"][1, 2] = np.inf
    (problem,) = non_finite_problems(broken, "artifact")
    assert problem.startswith("artifact output 'embedding' has 0 NaN and 1 inf of 6 values in 1 of 2 samples")
    assert problem.endswith("first at index (1, 2)")
