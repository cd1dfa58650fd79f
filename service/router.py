"""Resolution router: an image size -> the (backbone, shape) that serves it, the resize behind it, and why.

Two backbones share the traffic. Global attention (ViT) is cheap on few tokens but quadratic in
them; windowed attention (Swin) grows linearly. Each serves several input shapes (square and
aspect-ratio shapes, export/shapes.py), and every (backbone, shape) pair is a candidate with

- geometry: the image resized to fit the shape ("pad") or to cover it ("crop"), its `scale`, the
  `padding` (fraction of served pixels that are not image) and the `detail` it keeps: served
  content pixels / image pixels, capped at 1, because upscaling adds no information;
- cost: calibrated seconds per batch of the entry (service/calibration.py: measured on the real
  runtime at start-up, read from a calibration file, or estimated from FLOPs; `cost_source`);
- wait: the expected queue wait from the live pending work of the entry's pool (the batches
  queued and running there, at their calibrated cost); expected_ms = wait + cost of one image.

Policy "cost" (default). Candidates padded more than 15% are excluded whenever some candidate
padded less keeps as much detail (an aspect ratio is served by the shapes of its class; a padded
shape stays only where it keeps more detail than every shape of the class), then those that upscale the image by
more than 5% whenever some candidate left does not (an image smaller than every shape of its class
takes the least upscaling); `max_global_tokens` optionally caps the
global backbone's tokens. The intended candidate keeps the most detail whose own cost fits the
request's latency budget (cheaper on ties, so global vs windowed is decided by measured cost at
equal detail and the crossover comes from calibration). Load then sheds detail before requests:
the candidate served is the most detailed one whose expected time, queue included, fits the
budget; when that is less detail than intended the route is `degraded` (counted per pool).
`detail=full` opts out: the most detailed candidate, whatever the budget and the queues.

An entry whose remote pool has no ready endpoint (every replica gone or ejected,
service/runtimes/endpoints.py) is routed around: it is left out while another candidate stays, and
when that costs detail the route is `degraded` and says why. A request that forced that backbone,
asked for `detail=full`, or has nothing else left meets the pool's 503 instead.

Policy "square" is the previous router, kept as the benchmarks' baseline: square shapes only,
the global backbone while the image has at most `max_global_tokens` (default 1024) tokens at its
patch size, and the smallest bucket not smaller than the long (pad) or short (crop) side.

Everything that costs more than arithmetic (cost estimates of every candidate) is computed when
the Router is built; a route is a few dozen multiplications per candidate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

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

from export.shapes import Shape, as_shape, aspect_ladder, shape_name
from models.config import BackboneConfig
from models.cost import estimate_cost
from models.mixing import padded_grid
from models.registry import get_config
from service.calibration import EntryCost, estimated_cost

Pool = Literal["global", "windowed"]
ResizeMode = Literal["pad", "crop"]
Policy = Literal["cost", "square"]
MAX_UPSCALE = 1.05
MAX_PADDING = 0.15
# Details equal to two decimals are a tie, decided by expected time.
DETAIL_DECIMALS = 2
# The exclusion reason of a candidate whose pool has no ready endpoint.
UNAVAILABLE = "no ready endpoint"
# The square policy's limit between the backbones, (512 / 16)^2 tokens, when the routing sets none.
SQUARE_MAX_GLOBAL_TOKENS = 1024
DEFAULT_GLOBAL_SHAPES = aspect_ladder(224, 16)
DEFAULT_WINDOWED_SHAPES = (*aspect_ladder(448, 28), *aspect_ladder(896, 28))


class UnknownModelError(ValueError):
    """A requested model is not one of the routed backbones (the gateway answers 404)."""


class BackboneRoute(BaseModel):
    """One routable backbone: its name in the model repository, its registry config and its shapes.

    `buckets` lists input shapes: a side for a square bucket, [height, width] otherwise.
    `seconds_per_gflop` is the fallback cost calibration for entries nothing measured.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    config: str
    buckets: tuple[PositiveInt | tuple[PositiveInt, PositiveInt], ...] = Field(min_length=1)
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
    def _sorted_buckets(cls, buckets: tuple) -> tuple:
        unique = {as_shape(b): None for b in buckets}
        return tuple(h if h == w else (h, w) for h, w in sorted(unique, key=lambda s: (s[0] * s[1], s)))

    @property
    def shapes(self) -> tuple[Shape, ...]:
        return tuple(as_shape(b) for b in self.buckets)


class RoutingConfig(BaseModel):
    """The routing file: the two backbones, the optional global token cap, the resize mode."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    global_backbone: BackboneRoute = BackboneRoute(
        model="vit_global", config="vit_small_patch16_224", buckets=DEFAULT_GLOBAL_SHAPES
    )
    windowed_backbone: BackboneRoute = BackboneRoute(
        model="swin_windowed", config="swin_tiny_patch4_window7_224", buckets=DEFAULT_WINDOWED_SHAPES
    )
    max_global_tokens: PositiveInt | None = None
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
class Servable:
    """What the router knows of one (backbone, shape) before any request: its entry, tokens and cost
    (cost_ms: one image alone, from `cost`, so a route never interpolates it)."""

    model: str
    entry: str
    pool: Pool
    shape: Shape
    tokens: int
    flops: int
    cost: EntryCost
    cost_ms: float


class Geometry(NamedTuple):
    """An image in one shape: content size before padding/cropping, scale, padding and detail."""

    resized: tuple[int, int]
    scale: float
    padding: float
    detail: float


@dataclass(frozen=True)
class Candidate:
    """One (backbone, shape) weighed for one image: geometry, detail, time, and why it was left out.

    shape, resized: [height, width] served and of the content before padding/cropping.
    padding: fraction of the served pixels that are not image. detail: served content pixels /
    image pixels, capped at 1. cost_ms: one image alone; wait_ms: the pool's queued and running
    work; expected_ms: their sum. excluded: why the candidate could not be taken, else None.
    """

    model: str
    entry: str
    pool: Pool
    shape: tuple[int, int]
    tokens: int
    flops: int
    resized: tuple[int, int]
    scale: float
    padding: float
    detail: float
    cost_ms: float
    wait_ms: float
    expected_ms: float
    cost_source: str
    excluded: str | None = None

    @property
    def rank(self) -> tuple[float, float]:
        """Most detail first, then least expected time."""
        return -round(self.detail, DETAIL_DECIMALS), self.expected_ms


@dataclass(frozen=True)
class Route:
    """A routing decision: serve the image resized to `resized` (height, width), then padded or
    center-cropped (`resize_mode`) to `shape`, with `model`'s entry `entry`.

    bucket: the long side of `shape` (the side of a square bucket). tokens: of `model` at `shape`.
    image_tokens: the image's tokens at the global backbone's patch size. degraded: load made
    the router serve less detail than the budget allowed on idle queues. candidates: every
    (backbone, shape) pair weighed, with its numbers.
    """

    model: str
    entry: str
    pool: Pool
    shape: tuple[int, int]
    bucket: int
    tokens: int
    image_tokens: int
    scale: float
    resized: tuple[int, int]
    resize_mode: ResizeMode
    padding: float
    detail: float
    expected_ms: float
    budget_ms: float
    degraded: bool
    policy: Policy
    cost_source: str
    reason: str
    candidates: tuple[Candidate, ...]

    @property
    def target_side(self) -> int:
        """The side of the resized image that decoding at reduced scale must keep (see imaging)."""
        return max(self.resized) if self.resize_mode == "pad" else min(self.resized)

    def to_dict(self) -> dict[str, Any]:
        """Fields as a dict, candidates as dicts. Every value is immutable, so nothing is copied:
        `dataclasses.asdict` deep-copies each value and took 0.35 ms per request at 27 candidates."""
        fields = {name: getattr(self, name) for name in ROUTE_FIELDS}
        fields["candidates"] = [
            {name: getattr(c, name) for name in CANDIDATE_FIELDS} for c in self.candidates
        ]
        return fields


ROUTE_FIELDS = tuple(f.name for f in dataclasses.fields(Route) if f.name != "candidates")
CANDIDATE_FIELDS = tuple(f.name for f in dataclasses.fields(Candidate))


class Router:
    """Maps image sizes to Routes under one RoutingConfig and policy; cheap enough to call per request."""

    def __init__(
        self,
        config: RoutingConfig | None = None,
        model_configs: Mapping[str, BackboneConfig] | None = None,
        *,
        entries: Mapping[tuple[str, Shape], str] | None = None,
        costs: Mapping[str, EntryCost] | None = None,
        policy: Policy = "cost",
        target_latency_ms: float = 1000.0,
    ):
        """`model_configs` maps repository model names to the configs they were exported with (else
        their registry config); `entries` maps (model, shape) to the entry name (else
        `<model>_<shape>`); `costs` the calibrated cost of each entry (else estimated from FLOPs)."""
        self.config = config or RoutingConfig.default()
        self.policy: Policy = policy
        self.target_latency_ms = target_latency_ms
        self._backbones = self.config.backbones()
        known = dict(model_configs or {})
        configs = {b.model: known.get(b.model) or get_config(b.config) for b in self._backbones.values()}
        self.pools: dict[str, Pool] = {b.model: pool for pool, b in self._backbones.items()}
        names = dict(entries or {})
        measured = dict(costs or {})
        servables = []
        for pool, backbone in self._backbones.items():
            for shape in backbone.shapes:
                entry = names.get((backbone.model, shape), f"{backbone.model}_{shape_name(shape)}")
                estimate = estimate_cost(configs[backbone.model], *shape)
                cost = measured.get(entry) or estimated_cost(estimate.flops, backbone.seconds_per_gflop)
                servables.append(
                    Servable(
                        backbone.model,
                        entry,
                        pool,
                        shape,
                        estimate.tokens,
                        estimate.flops,
                        cost,
                        cost.batch_seconds(1) * 1e3,
                    )
                )
        self.servables = tuple(servables)
        self._patch = configs[self.config.global_backbone.model].patch_size

    def buckets(self, model: str) -> tuple[Shape, ...]:
        """Shapes served by `model`; UnknownModelError lists the routed models."""
        return self._backbones[self._pool_of(model)].shapes

    def route(
        self,
        height: int,
        width: int,
        override_model: str | None = None,
        override_bucket: int | None = None,
        *,
        budget_ms: float | None = None,
        full_detail: bool = False,
        waits: Mapping[str, float] | None = None,
        unavailable: Collection[str] = (),
    ) -> Route:
        """Route an image of `height` x `width` pixels.

        `budget_ms` is the request's latency budget (default `target_latency_ms`), `waits` the
        expected queue wait in seconds of each pool, `full_detail` opts out of degradation,
        `unavailable` the entries whose pool has no ready endpoint (routed around, see the module
        docstring).
        The model and/or a square bucket may be forced. Raises ValueError for a non-positive size or
        a bucket the model does not serve, UnknownModelError (a ValueError) for an unrouted model.
        """
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"image {name} must be a positive integer, got {value!r}")
        budget = float(budget_ms or self.target_latency_ms)
        pool_waits = dict(waits or {})
        geometries = [self._geometry(s.shape, height, width) for s in self.servables]
        image_tokens = self._image_tokens(height, width)
        down = frozenset(unavailable) if self.policy == "cost" and not full_detail else frozenset()
        if self.policy == "square":
            candidates = self._candidates(geometries, [None] * len(geometries), pool_waits)
            chosen, intended, reason = self._square(
                candidates, height, width, image_tokens, override_model, override_bucket
            )
        else:
            excluded = self._exclusions(geometries, override_model, override_bucket, down)
            candidates = self._candidates(geometries, excluded, pool_waits)
            chosen, intended, reason = self._by_cost(candidates, budget, full_detail)
            if any(c.excluded and c.excluded.startswith(UNAVAILABLE) for c in candidates):
                up = self._candidates(
                    geometries, self._exclusions(geometries, override_model, override_bucket), pool_waits
                )
                preferred = self._by_cost(up, budget, full_detail)[0]
                if round(preferred.detail, DETAIL_DECIMALS) > round(intended.detail, DETAIL_DECIMALS):
                    intended = preferred
                    reason = (
                        f"degraded: pool {preferred.pool} has no ready endpoint, where {preferred.entry} would "
                        f"keep detail {preferred.detail:.2f}; {chosen.entry} keeps detail {chosen.detail:.2f} "
                        f"in an expected {chosen.expected_ms:.0f} ms"
                    )
        degraded = round(chosen.detail, DETAIL_DECIMALS) < round(intended.detail, DETAIL_DECIMALS)
        return Route(
            model=chosen.model,
            entry=chosen.entry,
            pool=chosen.pool,
            shape=chosen.shape,
            bucket=max(chosen.shape),
            tokens=chosen.tokens,
            image_tokens=image_tokens,
            scale=chosen.scale,
            resized=chosen.resized,
            resize_mode=self.config.resize_mode,
            padding=chosen.padding,
            detail=chosen.detail,
            expected_ms=chosen.expected_ms,
            budget_ms=budget,
            degraded=degraded,
            policy=self.policy,
            cost_source=chosen.cost_source,
            reason=reason,
            candidates=tuple(candidates),
        )

    def _geometry(self, shape: Shape, height: int, width: int) -> Geometry:
        """Where a `height` x `width` image lands in `shape` under the resize mode."""
        rows, cols = shape
        if self.config.resize_mode == "pad":
            scale = min(rows / height, cols / width)
            resized = (min(rows, max(1, round(height * scale))), min(cols, max(1, round(width * scale))))
            content = resized[0] * resized[1]
        else:
            scale = max(rows / height, cols / width)
            resized = (max(rows, round(height * scale)), max(cols, round(width * scale)))
            content = rows * cols
        return Geometry(resized, scale, 1 - content / (rows * cols), min(1.0, content / (height * width)))

    def _candidates(
        self, geometries: list[Geometry], excluded: list[str | None], waits: Mapping[str, float]
    ) -> list[Candidate]:
        return [
            self._candidate(servable, geometry, waits.get(servable.pool, 0.0), reason)
            for servable, geometry, reason in zip(self.servables, geometries, excluded, strict=True)
        ]

    @staticmethod
    def _candidate(servable: Servable, geometry: Geometry, wait_s: float, excluded: str | None) -> Candidate:
        cost_ms = servable.cost_ms
        return Candidate(
            model=servable.model,
            entry=servable.entry,
            pool=servable.pool,
            shape=servable.shape,
            tokens=servable.tokens,
            flops=servable.flops,
            resized=geometry.resized,
            scale=geometry.scale,
            padding=geometry.padding,
            detail=geometry.detail,
            cost_ms=cost_ms,
            wait_ms=wait_s * 1e3,
            expected_ms=wait_s * 1e3 + cost_ms,
            cost_source=servable.cost.source,
            excluded=excluded,
        )

    def _exclusions(
        self,
        geometries: list[Geometry],
        override_model: str | None,
        override_bucket: int | None,
        down: frozenset[str] = frozenset(),
    ) -> list[str | None]:
        """Why each servable is left out for this image (None: it stays), the first rule that applies
        winning; raises ValueError if an override leaves nothing. Entries in `down` are left out while
        another candidate stays. Decided on the geometries before any Candidate is built, so
        each Candidate is built once (rebuilding excluded ones with `dataclasses.replace` was a third
        of a route's time at 27 candidates)."""
        requested = self._pool_of(override_model) if override_model is not None else None
        square = None if override_bucket is None else (override_bucket, override_bucket)
        cap = self.config.max_global_tokens
        reasons: list[str | None] = []
        for servable in self.servables:
            if requested not in (None, servable.pool):
                reasons.append(f"model {override_model} requested")
            elif square is not None and servable.shape != square:
                reasons.append(f"bucket {override_bucket} requested")
            elif cap is not None and servable.pool == "global" and servable.tokens > cap:
                reasons.append(f"{servable.tokens} tokens > max_global_tokens {cap}")
            else:
                reasons.append(None)
        if square is not None and not any(
            servable.shape == square and requested in (None, servable.pool) for servable in self.servables
        ):
            raise ValueError(self._unserved(override_bucket, override_model))
        live = [i for i, reason in enumerate(reasons) if reason is None]
        if not live:
            raise ValueError(f"no candidate is left for this request: {reasons[0]}")
        if any(self.servables[i].entry not in down for i in live):
            for i in live:
                if self.servables[i].entry in down:
                    reasons[i] = f"{UNAVAILABLE} in pool {self.servables[i].pool}"
            live = [i for i in live if reasons[i] is None]
        # Padding first: an aspect ratio is served by the shapes of its class. Among those, an image
        # that some shape holds without upscaling it over 5% is never upscaled more; an image smaller
        # than every shape of its class takes the least upscaling.
        self._exclude_padded(geometries, reasons, live)
        least = min(geometries[i].scale for i in live if reasons[i] is None)
        limit = MAX_UPSCALE if least <= MAX_UPSCALE else least * MAX_UPSCALE
        for i in live:
            if reasons[i] is None and geometries[i].scale > limit:
                reasons[i] = f"upscales x{geometries[i].scale:.3g} (> x{limit:.3g})"
        return reasons

    @staticmethod
    def _exclude_padded(geometries: list[Geometry], reasons: list[str | None], live: list[int]) -> None:
        """Leave out (in `reasons`) each live candidate padded over MAX_PADDING that a candidate padded
        at most MAX_PADDING matches in detail: its padding would only cost compute.

        A padded candidate that keeps more detail than every unpadded one stays. Otherwise a backbone
        without a shape of the image's aspect class (a repository holding only some shapes, as while
        `make serve` exports the rest of the ladder) would hand the image to a much smaller shape of
        the other backbone: a 640x480 photo to ViT at 192x256 (detail 0.16) instead of Swin at 448
        (0.49, padded 25%).
        """
        unpadded = [geometries[i].detail for i in live if geometries[i].padding <= MAX_PADDING]
        if not unpadded:
            return
        matched = round(max(unpadded), DETAIL_DECIMALS)
        for i in live:
            geometry = geometries[i]
            if geometry.padding > MAX_PADDING and round(geometry.detail, DETAIL_DECIMALS) <= matched:
                reasons[i] = f"padding {geometry.padding:.0%} > {MAX_PADDING:.0%}"

    def _by_cost(
        self, candidates: list[Candidate], budget: float, full_detail: bool
    ) -> tuple[Candidate, Candidate, str]:
        """(served, intended, reason) under the cost policy."""
        live = [c for c in candidates if not c.excluded]
        if full_detail:
            chosen = min(live, key=lambda c: c.rank)
            return (
                chosen,
                chosen,
                (
                    f"detail=full: {chosen.entry} keeps the most detail ({chosen.detail:.2f}), "
                    f"expected {chosen.expected_ms:.0f} ms"
                ),
            )
        affordable = [c for c in live if c.cost_ms <= budget]
        intended = (
            min(affordable, key=lambda c: (-round(c.detail, DETAIL_DECIMALS), c.cost_ms))
            if affordable
            else min(live, key=lambda c: c.cost_ms)
        )
        in_time = [c for c in live if c.expected_ms <= budget]
        chosen = min(in_time, key=lambda c: c.rank) if in_time else min(live, key=lambda c: c.expected_ms)
        if round(chosen.detail, DETAIL_DECIMALS) < round(intended.detail, DETAIL_DECIMALS):
            return (
                chosen,
                intended,
                (
                    f"degraded: {intended.entry} (detail {intended.detail:.2f}) would take {intended.expected_ms:.0f} ms "
                    f"with {intended.wait_ms:.0f} ms queued, over the {budget:.0f} ms budget; {chosen.entry} keeps "
                    f"detail {chosen.detail:.2f} in an expected {chosen.expected_ms:.0f} ms"
                ),
            )
        if not affordable:
            return (
                chosen,
                intended,
                (
                    f"no candidate fits the {budget:.0f} ms budget; {chosen.entry} is the fastest "
                    f"(expected {chosen.expected_ms:.0f} ms, detail {chosen.detail:.2f})"
                ),
            )
        return (
            chosen,
            intended,
            (
                f"{chosen.entry} keeps the most detail ({chosen.detail:.2f}, padding {chosen.padding:.0%}) within the "
                f"{budget:.0f} ms budget, expected {chosen.expected_ms:.0f} ms, cheapest at that detail"
            ),
        )

    def _square(
        self,
        candidates: list[Candidate],
        height: int,
        width: int,
        image_tokens: int,
        override_model: str | None,
        override_bucket: int | None,
    ) -> tuple[Candidate, Candidate, str]:
        """(served, served, reason) under the square-bucket policy (the benchmarks' baseline)."""
        limit = self.config.max_global_tokens or SQUARE_MAX_GLOBAL_TOKENS
        automatic: Pool = "global" if image_tokens <= limit else "windowed"
        squares = {
            pool: sorted(c.shape[0] for c in candidates if c.pool == pool and c.shape[0] == c.shape[1])
            for pool in self._backbones
        }
        if override_model is not None:
            pool, why = self._pool_of(override_model), f"model {override_model} requested"
        elif override_bucket is not None:
            serving = [p for p, sides in squares.items() if override_bucket in sides]
            if not serving:
                raise ValueError(self._unserved(override_bucket, None))
            pool = automatic if automatic in serving else serving[0]
            why = f"{pool} backbone serves the requested bucket"
        else:
            relation = "<=" if automatic == "global" else ">"
            pool, why = (
                automatic,
                (
                    f"{image_tokens} image tokens ({height}x{width} at patch {self._patch}) {relation} "
                    f"max_global_tokens {limit}: {automatic} attention"
                ),
            )
        sides = squares[pool]
        if not sides:
            raise ValueError(
                f"the square policy needs square buckets; {self._backbones[pool].model} serves none"
            )
        side = max(height, width) if self.config.resize_mode == "pad" else min(height, width)
        if override_bucket is not None:
            if override_bucket not in sides:
                raise ValueError(self._unserved(override_bucket, self._backbones[pool].model))
            bucket, why_bucket = override_bucket, f"bucket {override_bucket} requested"
        else:
            bucket = next((s for s in sides if s >= side), sides[-1])
            why_bucket = f"bucket {bucket} is the {'smallest >=' if bucket >= side else 'largest, below'} the side {side}"
        chosen = next(c for c in candidates if c.pool == pool and c.shape == (bucket, bucket))
        return chosen, chosen, f"square policy: {why}; {why_bucket}, scale x{chosen.scale:.3g}"

    def _unserved(self, bucket: int, model: str | None) -> str:
        backbones = [self._backbones[self._pool_of(model)]] if model else list(self._backbones.values())
        valid = "; ".join(f"{b.model} {[shape_name(s) for s in b.shapes]}" for b in backbones)
        owner = f"by {model}" if model else "by any backbone"
        return f"bucket {bucket} is not served {owner}; valid buckets: {valid}"

    def _image_tokens(self, height: int, width: int) -> int:
        """Tokens of the content that is served: the whole image (pad) or its central square (crop)."""
        if self.config.resize_mode == "crop":
            height = width = min(height, width)
        rows, cols = padded_grid(height, width, self._patch)
        return rows * cols

    def _pool_of(self, model: str) -> Pool:
        if model not in self.pools:
            raise UnknownModelError(f"unknown model {model!r}; routed models: {', '.join(self.pools)}")
        return self.pools[model]


__all__ = [
    "BackboneRoute",
    "Candidate",
    "MAX_PADDING",
    "MAX_UPSCALE",
    "Policy",
    "Pool",
    "ResizeMode",
    "Route",
    "Router",
    "RoutingConfig",
    "Servable",
    "UnknownModelError",
]
