"""bench.mixed derives its per-class figures from the responses' `route` objects exactly as issue 8
defines them (detail, padding, upscaling), over a reproducible open-loop arrival sequence."""

from __future__ import annotations

import pytest

from bench.mixed import CLASSES, _aggregate, _arrivals, _route_numbers


def test_route_numbers_of_a_padded_photo() -> None:
    """4000x3000 served as 672x896 content in an 896x896 square: a quarter padding, 5% of the pixels."""
    route = {"pool": "windowed", "shape": [896, 896], "resized": [672, 896], "scale": 0.224}
    numbers = _route_numbers(route, width=4000, height=3000)
    assert numbers["padding"] == pytest.approx(0.25)
    assert numbers["detail"] == pytest.approx(672 * 896 / (4000 * 3000))
    assert not numbers["upscaled"] and not numbers["degraded"]
    assert numbers["shape"] == "896x896"


def test_route_numbers_cap_detail_and_flag_upscaling() -> None:
    """A 256x192 thumbnail upscaled into 384x384 keeps no more than all of its pixels (detail 1)."""
    route = {"pool": "global", "bucket": 384, "resized": [288, 384], "scale": 1.5, "degraded": True}
    numbers = _route_numbers(route, width=256, height=192)
    assert numbers["detail"] == 1.0
    assert numbers["upscaled"] and numbers["degraded"]
    assert numbers["padding"] == pytest.approx(0.25)
    assert numbers["shape"] == "384x384"


def test_arrivals_are_seeded_poisson_over_the_mix() -> None:
    first = _arrivals(rate=20.0, seconds=60.0, seed=3)
    assert first == _arrivals(rate=20.0, seconds=60.0, seed=3)
    assert first != _arrivals(rate=20.0, seconds=60.0, seed=4)
    assert 1000 < len(first) < 1400  # 1200 expected; a 5.8-sigma band
    offsets = [offset for offset, _, _ in first]
    assert offsets == sorted(offsets) and 0 < offsets[0] and offsets[-1] < 60
    sizes = {c.name: set(c.sizes) for c in CLASSES}
    assert all(size in sizes[name] for _, name, size in first)
    thumbnails = sum(name == "thumbnail" for _, name, _ in first) / len(first)
    assert thumbnails == pytest.approx(0.30, abs=0.06)


def test_aggregate_counts_budget_and_statuses_per_class() -> None:
    ok = {"class": "tile", "status": 200, "detail": 0.2, "padding": 0.0, "upscaled": False, "degraded": True}
    results = [
        {**ok, "ms": 900.0, "shape": "896x896"},
        {**ok, "ms": 3500.0, "shape": "896x896", "degraded": False},
        {"class": "tile", "status": 504, "ms": 3100.0, "error": "deadline_exceeded"},
        {"class": "thumbnail", "status": 0, "error": "no answer within the grace period"},
    ]
    rows = {r["class"]: r for r in _aggregate(results, elapsed=10.0, budget_ms=3000.0)}
    tile = rows["tile"]
    assert (tile["sent"], tile["answered_200"]) == (3, 2)
    assert tile["budget_attainment"] == pytest.approx(1 / 3, abs=1e-3)
    assert tile["degraded_fraction"] == 0.5
    assert tile["statuses"] == {"200": 2, "504": 1}
    assert tile["throughput_req_per_s"] == 0.2
    assert rows["thumbnail"]["mean_detail"] is None and rows["thumbnail"]["statuses"] == {"0": 1}
    assert rows["all"]["sent"] == 4
    assert list(rows) == ["thumbnail", "tile", "all"]
