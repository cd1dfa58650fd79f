"""RGB uint8 pixels -> normalized float32 CHW tensor of one input shape (a square bucket or H x W).

Runs in the gateway's thread pool, so it is plain C work (Pillow resampling, numpy ufuncs) that
releases the GIL; there is no per-pixel Python. The result is written straight into `out`, which
the gateway points at its slot in the batch buffer, so the only copy of the tensor is that one.

Geometry (`resize_geometry`, shared with the router so its explanation matches what is done), for a
square bucket (an int side) or any (height, width) shape. The router picks "pad" or "crop"; an entry
whose checkpoint recorded its own processor overrides that (`served_mode`), since the model was
trained on images prepared its way:
- "pad": scale so the image just fits the shape (the long side of a square bucket), keep the aspect
  ratio, place the content at the
  top-left and pad bottom/right with zeros *after* normalization, i.e. with the mean colour, which
  is what the model sees as "no signal".
- "crop": scale so the image just covers the shape (the short side of a square bucket) and keep its
  centered H x W window.
  Only that square of the source is resampled (Pillow's `box`): the same pixels as
  resize-then-center-crop when the scaled size is whole, exactly centered (sub-pixel) otherwise,
  and the discarded margins are never resampled. With the checkpoint's `crop_pct` < 1 (timm's eval
  transform) the short side goes to floor(bucket / crop_pct) first, so the square keeps the
  checkpoint's margin.
- "squash": both sides to the bucket, aspect ratio not kept (transformers' ViTImageProcessor);
  pixel for pixel what that processor computes.
Resampling uses the checkpoint's Pillow filter (`interpolation`, bilinear when it recorded none), with
Pillow's antialiasing; `reducing_gap` lets Pillow first shrink by an integer factor with a box filter
when the downscale is 6x or more, which is much faster and visually indistinguishable at this gap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from PIL import Image

from export.shapes import ShapeSpec, as_shape

ResizeMode = Literal["pad", "crop", "squash"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
REDUCING_GAP = 3.0
FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# The checkpoint policy that leaves the router's pad/crop in charge (models.config.RESIZE_POLICIES).
ROUTE_POLICY = "route"


def served_mode(route_mode: ResizeMode, policy: str) -> ResizeMode:
    """The resize mode an entry is served with: its checkpoint's policy, else the router's."""
    if policy == ROUTE_POLICY:
        return route_mode
    if policy not in RESIZE_MODES:
        raise ValueError(f"resize policy {policy!r} is not {ROUTE_POLICY!r} or one of {RESIZE_MODES}")
    return policy  # type: ignore[return-value]


def decode_side(bucket: int, mode: ResizeMode, crop_pct: float = 1.0) -> int:
    """The side (the one `mode` maps onto the bucket) the decoder must keep: larger than the bucket
    when a crop_pct margin is cut away."""
    return math.ceil(bucket / crop_pct) if mode == "crop" else bucket


@dataclass(frozen=True)
class ResizeGeometry:
    """How an image of a given size lands in a bucket (an int side or a (height, width) shape).

    `scale` is output pixels per source pixel (the short side of a padded image is rounded to whole
    pixels, so its own scale differs by under half a pixel; a squashed image has one scale per axis
    and reports its long side's); `resized_size` is the whole
    source after scaling, before padding or cropping; `content_size` is the (width, height) of the
    image inside the bucket (the rest is padding in "pad" mode); `source_box` is the (left, top,
    right, bottom) region of the source that ends up in the bucket, in source pixels.
    """

    bucket: ShapeSpec
    mode: ResizeMode
    scale: float
    resized_size: tuple[int, int]
    content_size: tuple[int, int]
    source_box: tuple[float, float, float, float]


def resize_geometry(
    width: int, height: int, bucket: ShapeSpec, mode: ResizeMode, crop_pct: float = 1.0
) -> ResizeGeometry:
    """Compute where a `width` x `height` image goes in a `bucket` (side, or (height, width)) input."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    out_height, out_width = as_shape(bucket)
    if min(out_height, out_width) < 1:
        raise ValueError(f"bucket must be a positive number of pixels, got {bucket}")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    full = (0.0, 0.0, float(width), float(height))
    if mode == "squash":
        served = (out_width, out_height)
        return ResizeGeometry(
            bucket, mode, max(out_height, out_width) / max(width, height), served, served, full
        )
    if mode == "pad":
        scale = min(out_width / width, out_height / height)
        resized = (_scaled(width, scale, out_width), _scaled(height, scale, out_height))
        return ResizeGeometry(bucket, mode, scale, resized, resized, full)
    if mode == "crop":
        # timm's eval transform: scale_size = floor(img_size / crop_pct); a hair of slack absorbs
        # crop_pct values like 224/256 that are not exact in binary.
        scale = max(
            math.floor(out_width / crop_pct + 1e-9) / width, math.floor(out_height / crop_pct + 1e-9) / height
        )
        kept_width, kept_height = out_width / scale, out_height / scale
        left, top = (width - kept_width) / 2, (height - kept_height) / 2
        resized = (max(out_width, round(width * scale)), max(out_height, round(height * scale)))
        return ResizeGeometry(
            bucket,
            mode,
            scale,
            resized,
            (out_width, out_height),
            (left, top, left + kept_width, top + kept_height),
        )
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def preprocess(
    image: np.ndarray,
    bucket: ShapeSpec,
    mean: Sequence[float],
    std: Sequence[float],
    mode: ResizeMode = "pad",
    out: np.ndarray | None = None,
    *,
    original_size: tuple[int, int] | None = None,
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
) -> np.ndarray:
    """Resize `image` (H, W, 3 uint8) into the bucket and normalize to float32 (3, *shape).

    Values are (x / 255 - mean) / std per channel. With `out` (any writable float32 array of that
    shape, e.g. a view into a batch buffer) the result is written there and `out` is returned.
    `original_size` is the (width, height) the geometry is computed for when `image` was decoded
    at reduced scale, so the output matches `resize_geometry` of the original size exactly.
    `interpolation` (a FILTERS name) and `crop_pct` are the checkpoint's (models.config).
    """
    if interpolation not in FILTERS:
        raise ValueError(f"interpolation {interpolation!r} is not one of {tuple(FILTERS)}")
    _check_image(image)
    gain, offset = _normalization(mean, std)
    height, width = image.shape[:2]
    src_width, src_height = original_size or (width, height)
    geometry = resize_geometry(src_width, src_height, bucket, mode, crop_pct)
    target = _output(out, bucket)
    content_width, content_height = geometry.content_size
    left, top, right, bottom = geometry.source_box
    sx, sy = width / src_width, height / src_height
    box = (left * sx, top * sy, right * sx, bottom * sy)
    if geometry.content_size == (width, height) and box == (0, 0, width, height):
        resized = image
    else:
        resized = np.asarray(
            Image.fromarray(image).resize(
                geometry.content_size, FILTERS[interpolation], box=box, reducing_gap=REDUCING_GAP
            )
        )
    pixels = resized.transpose(2, 0, 1)
    content = target[:, :content_height, :content_width]
    np.multiply(pixels, gain, out=content)
    np.subtract(content, offset, out=content)
    target[:, content_height:, :] = 0.0
    target[:, :content_height, content_width:] = 0.0
    return target


def _scaled(length: int, scale: float, bucket: int) -> int:
    return min(bucket, max(1, round(length * scale)))


def _normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (gain, offset) with x * gain - offset == (x / 255 - mean) / std: two ufunc passes."""
    mean_arr = np.asarray(mean, dtype=np.float64)
    std_arr = np.asarray(std, dtype=np.float64)
    if mean_arr.shape != (3,) or std_arr.shape != (3,) or not np.all(std_arr > 0):
        raise ValueError(f"mean and std need 3 values each, with std > 0; got mean={mean!r} std={std!r}")
    gain = (1.0 / (255.0 * std_arr)).astype(np.float32)[:, None, None]
    offset = (mean_arr / std_arr).astype(np.float32)[:, None, None]
    return gain, offset


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            "preprocess needs an RGB uint8 array of shape (H, W, 3), got "
            f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}; decode with "
            "service.imaging.decode_image"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")


def _output(out: np.ndarray | None, bucket: ShapeSpec) -> np.ndarray:
    shape = (3, *as_shape(bucket))
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.writeable:
        raise ValueError(
            f"out must be a writable float32 array of shape {shape}, "
            f"got {out.dtype} {out.shape} writeable={out.flags.writeable}"
        )
    return out
