"""Properties of the cost policy: detail within the budget, no upscaling, bounded padding, load sheds detail.

These run the Router on the default routing (the shapes `make export` writes, export/shapes.py) with
costs from a calibration table, so every property is checked over many image sizes without a server;
test_service_routing.py checks degradation under a real saturated queue.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export import read_repository
from export.shapes import ASPECT_CLASSES, as_shape, aspect_ladder, parse_shape
from models.cost import estimate_cost
from service.calibration import EntryCost, ServedCosts, read_calibration, write_calibration
from service.router import MAX_PADDING, MAX_UPSCALE, BackboneRoute, Router, RoutingConfig

# ONNX Runtime on the 2-core development VM runs Swin-T at about 1.4x the FLOP rate of ViT-S (bench/).
SECONDS_PER_GFLOP = {"global": 0.006, "windowed": 0.0045}
SIZES = [(int(h), int(w)) for h in np.geomspace(48, 6000, 17) for w in np.geomspace(48, 6000, 17)]
BUDGETS_MS = (20, 60, 200, 600, 2000, 6000)


def _costs(config: RoutingConfig) -> dict[str, EntryCost]:
    """Per-entry seconds per batch as a calibration file holds them (batch 4 at 3.2x batch 1)."""
    costs = {}
    for pool, backbone in config.backbones().items():
        for shape in backbone.shapes:
            seconds = estimate_cost(backbone.config, *shape).gflops * SECONDS_PER_GFLOP[pool]
            name = f"{backbone.model}_{shape[0] if shape[0] == shape[1] else f'{shape[0]}x{shape[1]}'}"
            costs[name] = EntryCost({1: seconds, 4: 3.2 * seconds}, "calibration file")
    return costs


@pytest.fixture(scope="module")
def router() -> Router:
    config = RoutingConfig.default()
    return Router(config, costs=_costs(config))


def _live(route):
    return [c for c in route.candidates if c.excluded is None]


def test_the_default_shapes_are_the_aspect_ladders_the_makefile_exports():
    config = RoutingConfig.default()
    assert config.global_backbone.shapes == tuple(
        sorted({as_shape(s) for s in aspect_ladder(224, 16)}, key=lambda s: (s[0] * s[1], s))
    )
    for backbone, multiple in ((config.global_backbone, 16), (config.windowed_backbone, 28)):
        assert all(h % multiple == 0 and w % multiple == 0 for h, w in backbone.shapes)
        aspects = {round(w / h, 1) for h, w in backbone.shapes}
        assert {round(a, 1) for a in ASPECT_CLASSES} <= aspects | {round(a, 1) + 0.1 for a in ASPECT_CLASSES}


def test_the_makefile_exports_the_default_routing_shapes():
    variables = dict(
        line.split(" ?= ", 1) for line in Path("Makefile").read_text().splitlines() if "_BUCKETS ?= " in line
    )
    config = RoutingConfig.default()
    for variable, backbone in (
        ("GLOBAL_BUCKETS", config.global_backbone),
        ("WINDOWED_BUCKETS", config.windowed_backbone),
    ):
        exported = {as_shape(parse_shape(s)) for s in variables[variable].split(",")}
        assert exported == set(backbone.shapes), variable


@pytest.mark.parametrize("long_side", [400, 640, 1000, 2000, 4000, 12000])
def test_padding_stays_within_15_percent_for_aspect_ratios_1_3_to_3_1(router, long_side):
    for aspect in np.geomspace(1 / 3, 3, 61):
        height, width = (long_side, max(1, round(long_side * aspect)))
        if aspect > 1:
            height, width = max(1, round(long_side / aspect)), long_side
        for budget in (BUDGETS_MS[0], BUDGETS_MS[-1]):
            route = router.route(height, width, budget_ms=budget)
            assert route.padding <= MAX_PADDING, (height, width, budget, route.entry, route.padding)


def test_images_larger_than_the_smallest_shape_are_never_upscaled_beyond_5_percent(router):
    smallest = max(max(shape) for shape in router.config.global_backbone.shapes)
    for height, width in SIZES:
        for budget in BUDGETS_MS:
            route = router.route(height, width, budget_ms=budget)
            if min(height, width) >= smallest:
                assert route.scale <= MAX_UPSCALE, (height, width, route.entry, route.scale)
            # Smaller images take the least upscaling of the shapes of their aspect class.
            assert route.scale <= MAX_UPSCALE * max(MAX_UPSCALE, min(c.scale for c in _live(route)))
    tiny = router.route(32, 32)
    assert (tiny.shape, tiny.detail, tiny.padding) == ((224, 224), 1.0, 0.0)


def test_a_padded_shape_that_keeps_more_detail_than_every_shape_of_the_class_is_not_left_out():
    """While `make serve` exports the rest of the ladders its repository holds every ViT shape but
    Swin only at 448. A 640x480 photo then goes to Swin at 448 (detail 0.49, padded 25%) when the
    budget allows, not to ViT at 192x256 (0.16); under a budget Swin misses it is ViT's, and with
    Swin's whole ladder the 4:3 shape 392x532 (0.67, padded 2%) wins, so the padding bound holds."""
    partial = RoutingConfig(
        windowed_backbone=BackboneRoute(
            model="swin_windowed", config="swin_tiny_patch4_window7_224", buckets=(448,)
        )
    )
    router = Router(partial, costs=_costs(partial))
    route = router.route(480, 640, budget_ms=1000)
    vit = next(c for c in route.candidates if c.entry == "vit_global_192x256")
    assert (route.entry, route.padding, route.degraded) == ("swin_windowed_448", 0.25, False)
    assert route.detail > 3 * vit.detail
    swin = next(c for c in route.candidates if c.entry == "swin_windowed_448")
    assert router.route(480, 640, budget_ms=swin.cost_ms / 2).entry == "vit_global_192x256"
    full = RoutingConfig.default()
    served = Router(full, costs=_costs(full)).route(480, 640, budget_ms=1000)
    assert (served.entry, served.padding <= MAX_PADDING) == ("swin_windowed_392x532", True)


def test_the_most_detail_within_the_budget_is_served_cheapest_on_ties(router):
    for height, width in SIZES:
        for budget in BUDGETS_MS:
            route = router.route(height, width, budget_ms=budget)
            live = _live(route)
            fitting = [c for c in live if c.expected_ms <= budget]
            if not fitting:
                assert route.expected_ms == min(c.expected_ms for c in live)
                continue
            assert route.expected_ms <= budget
            best = max(round(c.detail, 2) for c in fitting)
            assert round(route.detail, 2) == best
            assert route.expected_ms == min(c.expected_ms for c in fitting if round(c.detail, 2) == best)
            assert not route.degraded


def test_a_larger_budget_never_serves_less_detail(router):
    for height, width in SIZES:
        details = [router.route(height, width, budget_ms=b).detail for b in BUDGETS_MS]
        assert details == sorted(details), (height, width, details)


def test_detail_is_served_content_over_image_pixels_capped_at_one(router):
    route = router.route(1200, 1600, budget_ms=6000)
    content = route.resized[0] * route.resized[1]
    assert route.detail == pytest.approx(min(1.0, content / (1200 * 1600)))
    assert route.padding == pytest.approx(1 - content / (route.shape[0] * route.shape[1]))
    assert route.scale == pytest.approx(min(route.shape[0] / 1200, route.shape[1] / 1600))


def test_a_long_queue_sheds_detail_before_requests_and_detail_full_opts_out(router):
    idle = router.route(1536, 2048, budget_ms=2000)
    assert idle.pool == "windowed" and not idle.degraded
    busy = router.route(1536, 2048, budget_ms=2000, waits={"windowed": 5.0})
    assert busy.degraded and busy.detail < idle.detail and busy.expected_ms <= 2000
    assert busy.reason.startswith(f"degraded: {idle.entry}")
    intended = next(c for c in busy.candidates if c.entry == idle.entry)
    assert intended.wait_ms == 5000 and intended.expected_ms > 2000
    full = router.route(1536, 2048, budget_ms=2000, waits={"windowed": 5.0}, full_detail=True)
    assert not full.degraded and full.detail == max(c.detail for c in _live(full))
    tight = router.route(1536, 2048, budget_ms=100)
    beyond = router.route(1536, 2048, budget_ms=100, full_detail=True)
    assert beyond.detail == full.detail > tight.detail  # beyond the budget: the most detail there is


def test_entries_of_a_pool_without_ready_endpoints_are_routed_around_unless_nothing_else_serves(router):
    """The windowed pool down: a photo Swin would serve goes to ViT, degraded and saying why; a forced
    backbone, detail=full and a request with nothing else left still route there and meet its 503."""
    up = router.route(1536, 2048, budget_ms=2000)
    assert up.pool == "windowed"
    down = [s.entry for s in router.servables if s.pool == "windowed"]
    around = router.route(1536, 2048, budget_ms=2000, unavailable=down)
    assert around.pool == "global" and around.degraded and around.detail < up.detail
    assert around.reason.startswith(f"degraded: pool windowed has no ready endpoint, where {up.entry}")
    assert {c.excluded for c in around.candidates if c.pool == "windowed"} == {
        "no ready endpoint in pool windowed"
    }
    assert around.padding <= MAX_PADDING  # the global backbone's shape of the photo's aspect class
    assert router.route(1536, 2048, override_model="swin_windowed", unavailable=down).pool == "windowed"
    full = router.route(1536, 2048, budget_ms=2000, full_detail=True, unavailable=down)
    assert full.entry == up.entry and not full.degraded
    everything = [s.entry for s in router.servables]
    assert router.route(1536, 2048, budget_ms=2000, unavailable=everything).entry == up.entry
    # A thumbnail the global pool would serve at full detail keeps it on the windowed backbone: no
    # detail is lost, so the route is not degraded.
    thumbnail = router.route(224, 224, unavailable=[s.entry for s in router.servables if s.pool == "global"])
    assert thumbnail.pool == "windowed" and thumbnail.detail == 1 and not thumbnail.degraded


def _pair(global_ms: float, windowed_ms: float, **config) -> Router:
    routing = RoutingConfig(
        global_backbone=BackboneRoute(model="g", config="vit_small_patch16_224", buckets=(224,)),
        windowed_backbone=BackboneRoute(model="w", config="swin_tiny_patch4_window7_224", buckets=(224,)),
        **config,
    )
    costs = {
        "g_224": EntryCost({1: global_ms / 1e3}, "calibration file"),
        "w_224": EntryCost({1: windowed_ms / 1e3}, "calibration file"),
    }
    return Router(routing, costs=costs)


def test_global_or_windowed_at_equal_detail_is_decided_by_calibrated_cost():
    assert _pair(10, 20).route(224, 224).model == "g"
    assert _pair(20, 10).route(224, 224).model == "w"
    route = _pair(20, 10).route(224, 224)
    assert route.cost_source == "calibration file" and route.expected_ms == pytest.approx(10)
    # The same at the other pool's queue: the idle backbone serves.
    assert _pair(10, 20).route(224, 224, waits={"global": 0.05}).model == "w"


def test_max_global_tokens_caps_the_global_backbone():
    route = _pair(10, 20, max_global_tokens=100).route(224, 224)
    assert route.model == "w"
    assert (
        next(c for c in route.candidates if c.model == "g").excluded == "196 tokens > max_global_tokens 100"
    )


def test_forcing_a_backbone_or_bucket_still_reports_every_candidate(router):
    route = router.route(1536, 2048, override_model="vit_global")
    assert route.pool == "global" and len(route.candidates) == len(router.servables)
    assert {c.excluded for c in route.candidates if c.pool == "windowed"} == {"model vit_global requested"}
    forced = router.route(1536, 2048, override_bucket=448)
    assert forced.shape == (448, 448)


def test_calibration_batch_limit_is_the_best_measured_throughput(tmp_path):
    cost = EntryCost({1: 0.010, 2: 0.016, 4: 0.030, 8: 0.064}, "measured at start-up")
    assert cost.best_batch == 4  # served (4 ms a batch more): 118 img/s at 4 and 8, 100 at 2
    assert cost.batch_seconds(3) == pytest.approx(0.023)
    assert cost.batch_seconds(16) == pytest.approx(0.128)
    assert cost.work_seconds(10, 4) == pytest.approx(2 * 0.030 + 0.016)
    assert EntryCost({1: 0.100, 2: 0.199}, "x").best_batch == 1  # under 5% better as served: not worth it
    # The same per image at batch 1 and 2, but a short run: the batch's overhead makes 2 serve 17% more.
    assert EntryCost({1: 0.010, 2: 0.0199}, "x").best_batch == 2
    path = tmp_path / "calibration.yaml"
    write_calibration(path, {"vit_global_224": cost})
    assert read_calibration(path) == {"vit_global_224": EntryCost(cost.seconds, "calibration file")}
    path.write_text("vit_global_224: [1, 2]\n")
    with pytest.raises(ValueError, match=r"vit_global_224.*batch: seconds"):
        read_calibration(path)


def test_the_photo_repository_holds_aspect_ratio_shapes_as_triton_entries(photo_repository):
    entries = {e.name: e for e in read_repository(photo_repository)}
    landscape = next(e for e in entries.values() if e.shape[0] != e.shape[1])
    assert landscape.name == f"{landscape.backbone}_{landscape.shape[0]}x{landscape.shape[1]}"
    assert landscape.input_shape == (3, *landscape.shape)
    text = (landscape.path / "config.pbtxt").read_text()
    assert f"dims: {landscape.shape[0]}\n  dims: {landscape.shape[1]}" in text
    assert f'string_value: "{landscape.shape[0]}x{landscape.shape[1]}"' in text


def test_served_costs_learn_how_much_longer_batches_run_than_calibrated():
    cost = EntryCost({1: 0.100, 2: 0.180}, "measured at start-up")
    served = ServedCosts()
    moved = [served.observe("e", cost, 2, 0.270) for _ in range(30)]
    assert moved[0], "a first batch 1.5x its calibrated time is a move worth re-planning for"
    assert served.factor("e") == pytest.approx(1.5, rel=1e-3)
    corrected = served.corrected({"e": cost, "idle": cost})
    assert corrected["e"].batch_seconds(1) == pytest.approx(0.150, rel=1e-3)
    assert corrected["e"].source == cost.source and corrected["idle"] == cost
    assert not served.observe("e", cost, 2, 0.270), "applied and unchanged: no re-plan"
    for _ in range(30):
        served.observe("e", cost, 1, 100.0)  # one pathological batch after another
    assert served.factor("e") == pytest.approx(ServedCosts.BOUNDS[1], rel=1e-2)
