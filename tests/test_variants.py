"""Every attention kind is declared once (models/mixing.py: its cost and properties, without torch)
and built by its own module (models/layers/attention/); the cost model and the export verifier ask
the declaration, so a new variant is costed and verified by what it declares, and an unknown kind is
an error rather than being costed as global attention."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models.mixing as mixing
from export.verify import softmax_attention_layers
from models import build_model, estimate_cost, get_config
from models.layers.attention import BUILDERS
from models.mixing import ATTENTION_KINDS, AttentionVariant, get_variant

PROBE_FLOPS = 12345


def _with_attention(kind: str):
    """A small isotropic config whose attention field holds `kind`, bypassing the config's own check."""
    config = get_config("linvit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2, num_classes=3)
    object.__setattr__(config, "attention", (kind,))
    return config


def test_every_declared_kind_is_built_by_its_own_module() -> None:
    assert set(BUILDERS) == set(ATTENTION_KINDS)
    modules = {kind: BUILDERS[kind].__module__ for kind in ATTENTION_KINDS}
    assert modules["global"].endswith("attention.global_attention")
    assert {modules[k] for k in ("window", "block", "grid")} == {"models.layers.attention.partitioned"}
    assert {modules[k] for k in ("neighborhood", "dilated")} == {"models.layers.attention.neighborhood"}
    assert [k for k in ATTENTION_KINDS if not get_variant(k).softmax] == ["linear"]


def test_unknown_kind_is_an_error_in_cost_model_and_verifier() -> None:
    config = _with_attention("bogus")
    with pytest.raises(ValueError, match="unknown attention kind 'bogus'; choose one of global"):
        estimate_cost(config, 64, 64)
    model = build_model(get_config("linvit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2))
    model.config = config
    with pytest.raises(ValueError, match="unknown attention kind 'bogus'"):
        softmax_attention_layers(model)


def test_cost_model_and_verifier_ask_the_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered variant is costed by its own cost function and counted by its softmax flag."""

    def probe_cost(tally, shape) -> int:
        tally.attention_flops += PROBE_FLOPS
        tally.flops += PROBE_FLOPS
        return shape.tokens

    monkeypatch.setitem(mixing.VARIANTS, "probe", AttentionVariant("probe", probe_cost, softmax=True))
    config = get_config("linvit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2, attention=("probe",))
    cost = estimate_cost(config, 64, 64)
    assert cost.attention_flops == 2 * PROBE_FLOPS
    model = build_model(get_config("linvit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2))
    model.config = config
    assert softmax_attention_layers(model) == 2


def test_neighbourhood_mask_is_cached_per_grid_and_device() -> None:
    model = build_model(
        get_config("nat_iso_tiny_patch16_224", depth=1, embed_dim=32, num_heads=2, num_classes=0)
    )
    attn = model.blocks[0].attn
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        first = attn.mask((4, 4), torch.device("cpu"))
        model(torch.randn(2, 3, 64, 64))
        model(torch.randn(1, 3, 48, 80))
    assert attn.mask((4, 4), torch.device("cpu")) is first
    assert set(attn._masks) == {((4, 4), torch.device("cpu")), ((3, 5), torch.device("cpu"))}


def test_configs_costs_and_the_gateway_import_without_torch() -> None:
    """What the gateway needs (configs, the named registry, the cost model, the app) never imports torch."""
    probe = (
        "import sys\n"
        "import models, service.app\n"
        "config = models.get_config('swin_tiny_patch4_window7_224')\n"
        "assert models.estimate_cost(config, 2048, 2048).tokens == 512 * 512\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "models.build_model(models.get_config('vit_tiny_patch16_224', depth=1))\n"
        "assert 'torch' in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=root)
