"""Input shapes of repository entries: (height, width) pairs, square buckets being the special case.

A square bucket is written as one number (`224`), any other shape as `HxW` (`192x256`, height
first as in NCHW). Entry names follow the same spelling: `<backbone>_224`, `<backbone>_192x256`.

`aspect_ladder` builds the shapes one resolution level needs so that padding stays small for any
aspect ratio from 1:3 to 3:1. Padding of an image of aspect r (width / height) served in a shape
of aspect R is 1 - min(r / R, R / r), so neighbouring classes R1 < R2 bound it by
1 - sqrt(R1 / R2) for the images between them; the classes below keep every neighbouring ratio
under 1.39, i.e. padding under 15%, leaving a margin for rounding the sides to the backbone's
multiple (the router tests check the bound on the exported shapes themselves).
"""

from __future__ import annotations

import math
import re

Shape = tuple[int, int]
ShapeSpec = int | tuple[int, int]
# Width / height of each class: tall panorama 1:3 and 3:7, 9:16, 3:4, square, 4:3, 16:9, 7:3, wide 3:1.
ASPECT_CLASSES: tuple[float, ...] = (1 / 3, 3 / 7, 9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9, 7 / 3, 3.0)
_SPEC = re.compile(r"(\d+)(?:x(\d+))?")


def as_shape(spec: ShapeSpec) -> Shape:
    """`224` -> (224, 224); `(192, 256)` stays (height, width)."""
    if isinstance(spec, int):
        return spec, spec
    height, width = spec
    return int(height), int(width)


def shape_name(spec: ShapeSpec) -> str:
    """`224` for a square, `192x256` otherwise: the suffix of the entry name and the config parameter."""
    height, width = as_shape(spec)
    return str(height) if height == width else f"{height}x{width}"


def parse_shape(text: str) -> ShapeSpec:
    """`224` -> 224 (square bucket), `192x256` -> (192, 256); ValueError for anything else."""
    match = _SPEC.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"shape {text!r} is neither a side (224) nor HEIGHTxWIDTH (192x256)")
    height, width = int(match[1]), int(match[2] or match[1])
    return height if height == width else (height, width)


def aspect_ladder(side: int, multiple: int) -> tuple[ShapeSpec, ...]:
    """One shape per aspect class with about `side`^2 pixels, sides rounded to `multiple`.

    Squares are returned as plain ints so their entries keep the square-bucket names.
    """
    if side < multiple or multiple < 1:
        raise ValueError(f"ladder side {side} must be at least the shape multiple {multiple}")
    shapes: dict[Shape, None] = {}
    for aspect in ASPECT_CLASSES:
        rows, cols = side / math.sqrt(aspect) / multiple, side * math.sqrt(aspect) / multiple
        nearby = [
            (max(1, h) * multiple, max(1, w) * multiple)
            for h in (math.floor(rows), math.ceil(rows))
            for w in (math.floor(cols), math.ceil(cols))
        ]
        # The rounding closest to the class's aspect ratio, then to the level's area.
        best = min(
            nearby, key=lambda s: (abs(math.log(s[1] / s[0] / aspect)), abs(s[0] * s[1] - side * side))
        )
        shapes[best] = None
    return tuple(h if h == w else (h, w) for h, w in shapes)


__all__ = ["ASPECT_CLASSES", "Shape", "ShapeSpec", "as_shape", "aspect_ladder", "parse_shape", "shape_name"]
