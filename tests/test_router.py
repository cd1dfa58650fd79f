"""The square-bucket policy (the benchmarks' baseline), overrides, candidates' cost numbers and routing files.

The cost policy's properties (detail, budget, upscaling, padding, degradation) are in test_routing_policy.py.
"""

from __future__ import annotations

import json

import pytest

from models.cost import estimate_cost
from service.calibration import DEFAULT_SECONDS_PER_GFLOP
from service.router import SQUARE_MAX_GLOBAL_TOKENS, BackboneRoute, Router, RoutingConfig, UnknownModelError

GLOBAL = "vit_global"
WINDOWED = "swin_windowed"


# The former default repository: square buckets only, split at 1024 global tokens.
SQUARE = RoutingConfig(
    global_backbone=BackboneRoute(model=GLOBAL, config="vit_tiny_patch16_224", buckets=(224, 384)),
    windowed_backbone=BackboneRoute(
        model=WINDOWED, config="swin_tiny_patch4_window7_224", buckets=(448, 672, 896, 1344)
    ),
)


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(SQUARE, policy="square")


def _config(**changes) -> RoutingConfig:
    return SQUARE.model_copy(update=changes)


def _square(**changes) -> Router:
    return Router(_config(**changes), policy="square")


@pytest.mark.parametrize(("height", "width"), [(224, 224), (400, 600), (32, 32), (512, 512)])
def test_small_images_go_to_global_attention(router, height, width):
    route = router.route(height, width)
    assert (route.model, route.pool) == (GLOBAL, "global")
    assert route.image_tokens <= SQUARE_MAX_GLOBAL_TOKENS


@pytest.mark.parametrize(("height", "width"), [(1411, 1411), (2048, 2048), (4000, 600), (513, 513)])
def test_large_images_go_to_windowed_attention(router, height, width):
    route = router.route(height, width)
    assert (route.model, route.pool) == (WINDOWED, "windowed")
    assert route.image_tokens > SQUARE_MAX_GLOBAL_TOKENS
    assert "windowed" in route.reason and str(route.image_tokens) in route.reason


def test_the_token_limit_is_inclusive_and_configurable():
    assert _square(max_global_tokens=196).route(224, 224).pool == "global"
    assert _square(max_global_tokens=195).route(224, 224).pool == "windowed"


@pytest.mark.parametrize(
    ("height", "width", "bucket", "resized"),
    [
        (100, 200, 224, (112, 224)),  # upscaled so the long side fits
        (224, 224, 224, (224, 224)),
        (225, 100, 384, (384, 171)),  # just over 224: next bucket up keeps every pixel
        (400, 600, 384, (256, 384)),  # beyond the global buckets: the largest, downscaled
        (700, 513, 896, (896, 657)),
        (1024, 1000, 1344, (1344, 1312)),
        (1411, 1411, 1344, (1344, 1344)),
        (4000, 600, 1344, (1344, 202)),
    ],
)
def test_pad_mode_picks_the_smallest_bucket_covering_the_long_side(router, height, width, bucket, resized):
    route = router.route(height, width)
    assert route.bucket == bucket
    assert route.resized == resized
    assert route.scale == pytest.approx(bucket / max(height, width))
    assert route.resize_mode == "pad"


def test_crop_mode_fits_the_short_side_and_counts_only_the_central_square():
    router = _square(resize_mode="crop")
    portrait = router.route(600, 400)
    # The 400x400 centre has 625 tokens: global, while pad mode counts all 950 tokens of the image.
    assert (portrait.pool, portrait.image_tokens, portrait.bucket, portrait.resized) == (
        "global",
        625,
        384,
        (576, 384),
    )
    panorama = router.route(600, 4000)
    assert (panorama.pool, panorama.image_tokens, panorama.bucket) == ("windowed", 38 * 38, 672)
    assert panorama.resized == (672, 4480) and panorama.resize_mode == "crop"


def test_route_tokens_and_candidates_are_the_cost_models_numbers(router):
    config = router.config
    route = router.route(2048, 2048)
    assert [(c.entry, c.shape) for c in route.candidates] == [
        (f"{GLOBAL}_224", (224, 224)),
        (f"{GLOBAL}_384", (384, 384)),
        (f"{WINDOWED}_448", (448, 448)),
        (f"{WINDOWED}_672", (672, 672)),
        (f"{WINDOWED}_896", (896, 896)),
        (f"{WINDOWED}_1344", (1344, 1344)),
    ]
    for candidate in route.candidates:
        backbone = config.global_backbone if candidate.pool == "global" else config.windowed_backbone
        cost = estimate_cost(backbone.config, *candidate.shape)
        assert (candidate.tokens, candidate.flops) == (cost.tokens, cost.flops)
        assert candidate.cost_source == "estimated from FLOPs"
        assert candidate.cost_ms == pytest.approx(cost.flops / 1e9 * DEFAULT_SECONDS_PER_GFLOP * 1e3)
    assert (route.entry, route.shape) == (f"{WINDOWED}_1344", (1344, 1344))
    assert route.tokens == estimate_cost(config.windowed_backbone.config, 1344, 1344).tokens == 336 * 336


def test_seconds_per_gflop_calibrates_unmeasured_backbones():
    windowed = SQUARE.windowed_backbone.model_copy(update={"seconds_per_gflop": 0.002})
    route = _square(windowed_backbone=windowed).route(2048, 2048)
    by_pool = {c.pool: c for c in route.candidates}
    assert by_pool["windowed"].cost_ms == pytest.approx(by_pool["windowed"].flops / 1e9 * 0.002 * 1e3)
    assert by_pool["global"].cost_ms == pytest.approx(
        by_pool["global"].flops / 1e9 * DEFAULT_SECONDS_PER_GFLOP * 1e3
    )


def test_model_override_routes_to_that_backbone_with_its_bucket_rule(router):
    route = router.route(224, 224, override_model=WINDOWED)
    assert (route.model, route.pool, route.bucket) == (WINDOWED, "windowed", 448)
    assert "requested" in route.reason
    forced = router.route(2048, 2048, override_model=GLOBAL, override_bucket=224)
    assert (forced.model, forced.bucket, forced.resized) == (GLOBAL, 224, (224, 224))


def test_bucket_override_alone_picks_the_backbone_serving_it(router):
    assert router.route(2048, 2048, override_bucket=384).model == GLOBAL
    assert router.route(224, 224, override_bucket=896).model == WINDOWED


def test_bucket_override_served_by_both_keeps_the_automatic_choice():
    shared = Router(
        policy="square",
        config=_config(
            global_backbone=BackboneRoute(model=GLOBAL, config="vit_tiny_patch16_224", buckets=[224, 512]),
            windowed_backbone=BackboneRoute(
                model=WINDOWED, config="swin_tiny_patch4_window7_224", buckets=[512]
            ),
        ),
    )
    assert shared.route(224, 224, override_bucket=512).model == GLOBAL
    assert shared.route(2048, 2048, override_bucket=512).model == WINDOWED


def test_invalid_overrides_name_the_valid_choices(router):
    with pytest.raises(UnknownModelError, match=f"{GLOBAL}, {WINDOWED}"):
        router.route(224, 224, override_model="resnet50")
    with pytest.raises(
        ValueError, match=r"not served by vit_global; valid buckets: vit_global \['224', '384'\]"
    ) as err:
        router.route(224, 224, override_model=GLOBAL, override_bucket=512)
    assert not isinstance(err.value, UnknownModelError)  # 422, not 404
    with pytest.raises(
        ValueError,
        match=r"bucket 300 is not served by any backbone; valid buckets: vit_global \['224', '384'\]",
    ):
        router.route(224, 224, override_bucket=300)
    with pytest.raises(UnknownModelError):
        router.buckets("resnet50")
    assert router.buckets(WINDOWED) == ((448, 448), (672, 672), (896, 896), (1344, 1344))


@pytest.mark.parametrize(("height", "width"), [(0, 224), (224, -5), (2.5, 224), (True, 224)])
def test_rejects_invalid_image_sizes(router, height, width):
    with pytest.raises(ValueError, match="must be a positive integer"):
        router.route(height, width)


def test_route_serializes_to_json(router):
    data = json.loads(json.dumps(router.route(400, 600).to_dict()))
    assert data["model"] == GLOBAL and data["resized"] == [256, 384] and data["shape"] == [384, 384]
    assert len(data["candidates"]) == 6 and data["policy"] == "square"


def test_yaml_round_trip(tmp_path):
    config = RoutingConfig(
        global_backbone=BackboneRoute(
            model="vit", config="vit_tiny_patch16_224", buckets=[384, 224, 224], seconds_per_gflop=0.01
        ),
        windowed_backbone=BackboneRoute(
            model="swin", config="swin_tiny_patch4_window7_224", buckets=[1024, [336, 588], 512]
        ),
        max_global_tokens=600,
        resize_mode="crop",
    )
    assert config.global_backbone.buckets == (224, 384)  # sorted, duplicates dropped
    assert config.windowed_backbone.shapes == ((336, 588), (512, 512), (1024, 1024))  # by pixels
    path = tmp_path / "routing.yaml"
    config.to_yaml(path)
    assert RoutingConfig.from_yaml(path) == config


def test_yaml_keys_left_out_keep_their_defaults(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text("max_global_tokens: 4096\n")
    loaded = RoutingConfig.from_yaml(path)
    assert loaded.max_global_tokens == 4096
    assert loaded.windowed_backbone == RoutingConfig.default().windowed_backbone
    path.write_text("")
    assert RoutingConfig.from_yaml(path) == RoutingConfig.default()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_global_tokenz: 10\n", "max_global_tokenz"),
        ("resize_mode: stretch\n", "resize_mode"),
        (
            "global_backbone: {model: v, config: vit_huge_patch99_224, buckets: [224]}\n",
            "vit_huge_patch99_224",
        ),
        ("windowed_backbone: {model: w, config: swin_tiny_patch4_window7_224, buckets: []}\n", "buckets"),
        (
            "windowed_backbone: {model: vit_global, config: swin_tiny_patch4_window7_224, buckets: [512]}\n",
            "different",
        ),
        ("- 224\n- 384\n", "mapping"),
    ],
)
def test_invalid_yaml_is_rejected_with_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "routing.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        RoutingConfig.from_yaml(path)
    assert str(path) in str(err.value)
