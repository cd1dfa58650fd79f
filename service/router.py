"""Resolution router: an image size -> the backbone, bucket and resize that serve it, and why.

Two backbones share the traffic. Global attention (ViT) is accurate and cheap on few tokens but
quadratic in them; windowed attention (Swin) grows linearly and keeps the detail of large images.
The decision rests on the image's own detail, its token count at the global backbone's patch size
(`image_tokens`): at most `max_global_tokens` -> global backbone, above -> windowed backbone. The
limit applies to the image rather than to the bucket it lands in because the global buckets are
small by design; measured at the bucket, every image, however large, would fit once downscaled.

Inside the chosen backbone the bucket keeps the most detail: the smallest bucket not smaller
than the image's long side ("pad": resize to fit, then pad to a square) or short side ("crop":
resize, then center-crop), else the largest bucket (downscale).

Routing runs per request, so everything that costs more than arithmetic (cost estimates of
every (backbone, bucket) pair) is computed once when the Router is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from models.config import BackboneConfig
from models.cost import estimate_cost
from models.layers.patch_embed import padded_grid
from models.registry import get_config

Pool = Literal["global", "windowed"]
ResizeMode = Literal["pad", "crop"]


class UnknownModelError(ValueError):
    """A requested model is not one of the routed backbones (the gateway answers 404)."""


class BackboneRoute(BaseModel):
    """One routable backbone: its name in the model repository, its registry config and its buckets.

    `config` names the registry configuration whose cost model stands for the served model.
    `seconds_per_gflop` is the benchmarks' calibration; without it costs are reported in GFLOPs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    config: str
    buckets: tuple[PositiveInt, ...] = Field(min_length=1)
    seconds_per_gflop: float | None = Field(default=None, gt=0)

    @field_validator("config")
    @classmethod
    def _known_config(cls, name: str) -> str:
        try:
            get_config(name)
        except KeyError as err:
            raise ValueError(err.args[0]) from err
        return name

    @field_validator("buckets")
    @classmethod
    def _sorted_buckets(cls, buckets: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(buckets)))


class RoutingConfig(BaseModel):
    """The routing/buckets file: the two backbones, the token limit between them, the resize mode.

    The default limit, 1024 tokens = (512 / 16)^2, sends images of up to about 512x512 pixels of
    detail to global attention, which serves them at its 384 bucket with at most a 4/3 downscale.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    global_backbone: BackboneRoute = BackboneRoute(
        model="vit_global", config="vit_tiny_patch16_224", buckets=(224, 384)
    )
    windowed_backbone: BackboneRoute = BackboneRoute(
        model="swin_windowed", config="swin_tiny_patch4_window7_224", buckets=(448, 672, 896, 1344)
    )
    max_global_tokens: PositiveInt = 1024
    resize_mode: ResizeMode = "pad"

    @model_validator(mode="after")
    def _distinct_models(self) -> RoutingConfig:
        if self.global_backbone.model == self.windowed_backbone.model:
            raise ValueError(
                f"global and windowed backbones must be different models, both are {self.global_backbone.model!r}"
            )
        return self

    @classmethod
    def default(cls) -> RoutingConfig:
        return cls()

    @classmethod
    def from_yaml(cls, path: str | Path) -> RoutingConfig:
        """Load a routing file; keys left out keep their defaults, unknown keys are errors."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(
                f"routing file {path} must hold a mapping of settings, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(f"invalid routing file {path}: {err}") from err

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))

    def backbones(self) -> dict[Pool, BackboneRoute]:
        return {"global": self.global_backbone, "windowed": self.windowed_backbone}


@dataclass(frozen=True)
class Candidate:
    """Cost of serving one square bucket with one backbone (batch 1).

    `cost` is in seconds when the backbone is calibrated, else in GFLOPs (`cost_unit` says which).
    """

    model: str
    pool: Pool
    bucket: int
    tokens: int
    attention_flops: int
    flops: int
    cost: float
    cost_unit: Literal["seconds", "GFLOP"]


@dataclass(frozen=True)
class Route:
    """A routing decision: serve the image resized to `resized` (height, width), then padded or
    center-cropped (`resize_mode`) to `bucket` x `bucket`, with `model`.

    tokens: tokens of `model` at the bucket. image_tokens: the image's tokens at the global
    backbone's patch size, the quantity compared with max_global_tokens. estimate: the candidate
    taken. candidates: every (model, bucket) pair the router weighed.
    """

    model: str
    pool: Pool
    bucket: int
    tokens: int
    image_tokens: int
    scale: float
    resized: tuple[int, int]
    resize_mode: ResizeMode
    estimate: Candidate
    candidates: tuple[Candidate, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Router:
    """Maps image sizes to Routes under one RoutingConfig; cheap enough to call per request."""

    def __init__(
        self, config: RoutingConfig | None = None, model_configs: Mapping[str, BackboneConfig] | None = None
    ):
        """`model_configs` maps repository model names to the configs they were exported with; costs
        of models not in it come from their registry config."""
        self.config = config or RoutingConfig.default()
        self._backbones = self.config.backbones()
        known = dict(model_configs or {})
        configs = {b.model: known.get(b.model) or get_config(b.config) for b in self._backbones.values()}
        self.pools: dict[str, Pool] = {b.model: pool for pool, b in self._backbones.items()}
        self.candidates = tuple(
            _candidate(pool, backbone, configs[backbone.model], bucket)
            for pool, backbone in self._backbones.items()
            for bucket in backbone.buckets
        )
        self._candidate = {(c.model, c.bucket): c for c in self.candidates}
        self._patch = configs[self.config.global_backbone.model].patch_size

    def buckets(self, model: str) -> tuple[int, ...]:
        """Buckets served by `model`; UnknownModelError lists the routed models."""
        return self._backbones[self._pool_of(model)].buckets

    def route(
        self,
        height: int,
        width: int,
        override_model: str | None = None,
        override_bucket: int | None = None,
    ) -> Route:
        """Route an image of `height` x `width` pixels, optionally forcing the model and/or bucket.

        Raises ValueError for a non-positive size or a bucket the model does not serve, and
        UnknownModelError (a ValueError) for a model that is not routed.
        """
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"image {name} must be a positive integer, got {value!r}")
        image_tokens = self._image_tokens(height, width)
        automatic: Pool = "global" if image_tokens <= self.config.max_global_tokens else "windowed"
        pool, why_pool = self._choose_pool(
            automatic, image_tokens, height, width, override_model, override_bucket
        )
        backbone = self._backbones[pool]
        side_name, side = (
            ("long", max(height, width))
            if self.config.resize_mode == "pad"
            else ("short", min(height, width))
        )
        if override_bucket is None:
            bucket, why_bucket = _pick_bucket(backbone.buckets, side, side_name)
        elif override_bucket in backbone.buckets:
            bucket, why_bucket = override_bucket, f"bucket {override_bucket} requested"
        else:
            raise ValueError(
                f"bucket {override_bucket} is not served by {backbone.model}; valid buckets: {list(backbone.buckets)}"
            )
        scale = bucket / side
        estimate = self._candidate[(backbone.model, bucket)]
        return Route(
            model=backbone.model,
            pool=pool,
            bucket=bucket,
            tokens=estimate.tokens,
            image_tokens=image_tokens,
            scale=scale,
            resized=(max(1, round(height * scale)), max(1, round(width * scale))),
            resize_mode=self.config.resize_mode,
            estimate=estimate,
            candidates=self.candidates,
            reason=f"{why_pool}; {why_bucket}, scale x{scale:.3g}",
        )

    def _image_tokens(self, height: int, width: int) -> int:
        """Tokens of the content that is served: the whole image (pad) or its central square (crop)."""
        if self.config.resize_mode == "crop":
            height = width = min(height, width)
        rows, cols = padded_grid(height, width, self._patch)
        return rows * cols

    def _choose_pool(
        self,
        automatic: Pool,
        image_tokens: int,
        height: int,
        width: int,
        override_model: str | None,
        override_bucket: int | None,
    ) -> tuple[Pool, str]:
        if override_model is not None:
            return self._pool_of(override_model), f"model {override_model} requested"
        if override_bucket is not None:
            pools = [pool for pool, b in self._backbones.items() if override_bucket in b.buckets]
            if not pools:
                valid = "; ".join(f"{b.model} {list(b.buckets)}" for b in self._backbones.values())
                raise ValueError(f"bucket {override_bucket} is not served; valid buckets: {valid}")
            pool = automatic if automatic in pools else pools[0]
            return pool, f"{pool} backbone serves the requested bucket"
        relation = "<=" if automatic == "global" else ">"
        return automatic, (
            f"{image_tokens} image tokens ({height}x{width} at patch {self._patch}) {relation} "
            f"max_global_tokens {self.config.max_global_tokens}: {automatic} attention"
        )

    def _pool_of(self, model: str) -> Pool:
        if model not in self.pools:
            raise UnknownModelError(f"unknown model {model!r}; routed models: {', '.join(self.pools)}")
        return self.pools[model]


def _pick_bucket(buckets: tuple[int, ...], side: int, side_name: str) -> tuple[int, str]:
    """The smallest bucket >= side keeps all detail; without one, the largest loses the least."""
    for bucket in buckets:
        if bucket >= side:
            return bucket, f"bucket {bucket} is the smallest >= the {side_name} side {side}"
    return buckets[-1], f"bucket {buckets[-1]} is the largest, below the {side_name} side {side} (downscale)"


def _candidate(pool: Pool, backbone: BackboneRoute, config: BackboneConfig, bucket: int) -> Candidate:
    cost = estimate_cost(config, bucket, bucket)
    calibrated = backbone.seconds_per_gflop is not None
    return Candidate(
        model=backbone.model,
        pool=pool,
        bucket=bucket,
        tokens=cost.tokens,
        attention_flops=cost.attention_flops,
        flops=cost.flops,
        cost=cost.gflops * backbone.seconds_per_gflop if calibrated else cost.gflops,
        cost_unit="seconds" if calibrated else "GFLOP",
    )


__all__ = [
    "BackboneRoute",
    "Candidate",
    "Pool",
    "ResizeMode",
    "Route",
    "Router",
    "RoutingConfig",
    "UnknownModelError",
]
