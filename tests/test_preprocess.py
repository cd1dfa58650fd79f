"""service.preprocess: pad/crop geometry and normalization against straightforward references, and
writing into a caller's buffer."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from service.imaging import decode_image
from service.preprocess import ResizeGeometry, preprocess, resize_geometry

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def reference_normalize(pixels: np.ndarray) -> np.ndarray:
    """(x / 255 - mean) / std in float64, HWC -> CHW."""
    return ((pixels / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)


def pillow_resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)).astype(np.float64)


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return skdata.coffee()  # 600x400


def test_pad_geometry():
    geometry = resize_geometry(640, 427, 384, "pad")
    assert geometry == ResizeGeometry(384, "pad", 0.6, (384, 256), (384, 256), (0.0, 0.0, 640.0, 427.0))
    portrait = resize_geometry(300, 1200, 224, "pad")
    assert (portrait.content_size, portrait.scale) == ((56, 224), 224 / 1200)
    assert resize_geometry(5000, 3, 224, "pad").content_size == (224, 1)  # never collapses to zero


def test_crop_geometry():
    geometry = resize_geometry(640, 427, 384, "crop")
    assert geometry.scale == 384 / 427
    assert geometry.resized_size == (576, 384)
    assert geometry.content_size == (384, 384)
    assert geometry.source_box == (106.5, 0.0, 533.5, 427.0)


@pytest.mark.parametrize("bad", [(0, 10, 224, "pad"), (10, 10, 0, "crop"), (10, 10, 224, "stretch")])
def test_geometry_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        resize_geometry(*bad)


@pytest.mark.parametrize("bucket", [224, 384, 160])
def test_pad_matches_resize_normalize_and_zero_pad(coffee, bucket):
    content_w, content_h = resize_geometry(600, 400, bucket, "pad").content_size
    expected = np.zeros((3, bucket, bucket))
    expected[:, :content_h, :content_w] = reference_normalize(pillow_resize(coffee, (content_w, content_h)))
    result = preprocess(coffee, bucket, MEAN, STD, "pad")
    assert result.dtype == np.float32 and result.shape == (3, bucket, bucket)
    np.testing.assert_allclose(result, expected, atol=1e-5)
    assert not result[:, content_h:, :].any()  # padding is the mean colour, i.e. zero after normalization


@pytest.mark.parametrize("bucket", [224, 384, 160])
def test_crop_matches_resize_then_center_crop(coffee, bucket):
    resized_w, resized_h = resize_geometry(600, 400, bucket, "crop").resized_size
    left, top = (resized_w - bucket) // 2, (resized_h - bucket) // 2
    resized = pillow_resize(coffee, (resized_w, resized_h))
    expected = reference_normalize(resized[top : top + bucket, left : left + bucket])
    np.testing.assert_allclose(preprocess(coffee, bucket, MEAN, STD, "crop"), expected, atol=1e-5)


def test_crop_with_subpixel_offset_stays_close_to_resize_then_crop():
    """When the scaled size is not whole, the centered crop is sub-pixel; it differs only slightly."""
    astronaut = skdata.astronaut()[100:292, 150:406]  # 256x192 -> 224: scaled width 298.67
    geometry = resize_geometry(256, 192, 224, "crop")
    resized = pillow_resize(astronaut, geometry.resized_size)
    left = (geometry.resized_size[0] - 224) // 2
    expected = reference_normalize(resized[:, left : left + 224])
    result = preprocess(astronaut, 224, MEAN, STD, "crop")
    assert np.abs(result - expected).mean() < 0.1
    assert np.abs(result - expected).mean() < np.abs(result - reference_normalize(resized[:, :224])).mean()


def test_constant_colour_normalizes_to_exact_values():
    colour = np.array([12, 128, 250], dtype=np.uint8)
    image = np.broadcast_to(colour, (50, 70, 3)).copy()
    result = preprocess(image, 64, MEAN, STD, "crop")
    expected = (colour / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(
        result.reshape(3, -1), np.repeat(expected[:, None], 64 * 64, axis=1), atol=1e-5
    )


def test_image_of_bucket_size_is_only_normalized():
    image = skdata.astronaut()[:224, :224]
    np.testing.assert_allclose(
        preprocess(image, 224, MEAN, STD, "pad"), reference_normalize(image), atol=1e-5
    )


def test_small_images_are_upscaled(coffee):
    small = coffee[::10, ::10]  # 60x40
    result = preprocess(small, 224, MEAN, STD, "pad")
    expected = reference_normalize(pillow_resize(small, (224, 149)))
    np.testing.assert_allclose(result[:, :149], expected, atol=1e-5)
    assert not result[:, 149:].any()


def test_writes_into_a_batch_buffer_view(coffee):
    batch = np.full((3, 3, 224, 224), np.nan, dtype=np.float32)
    view = batch[1]
    result = preprocess(coffee, 224, MEAN, STD, "pad", out=view)
    assert result is view
    assert np.isfinite(batch[1]).all()  # padding overwrote the stale values too
    assert np.isnan(batch[0]).all() and np.isnan(batch[2]).all()
    np.testing.assert_array_equal(batch[1], preprocess(coffee, 224, MEAN, STD, "pad"))


@pytest.mark.parametrize(
    "out",
    [
        np.empty((3, 224, 225), np.float32),
        np.empty((3, 224, 224), np.float64),
        np.broadcast_to(np.zeros(1, np.float32), (3, 224, 224)),
    ],
)
def test_rejects_unusable_out(coffee, out):
    with pytest.raises(ValueError, match="out must be"):
        preprocess(coffee, 224, MEAN, STD, "pad", out=out)


@pytest.mark.parametrize(
    "image",
    [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3), np.float32)],
)
def test_rejects_non_rgb_uint8(image):
    with pytest.raises(ValueError, match="RGB uint8"):
        preprocess(image, 224, MEAN, STD)


def test_rejects_bad_normalization(coffee):
    with pytest.raises(ValueError, match="std > 0"):
        preprocess(coffee, 224, MEAN, (0.2, 0.0, 0.2))


def test_reduced_decode_lands_on_the_original_geometry():
    """A draft-decoded JPEG, given its original size, fills exactly the box the router explained."""
    coffee = Image.fromarray(skdata.coffee()).resize((2401, 1509), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    coffee.save(buffer, "JPEG", quality=90)
    limits = {"max_bytes": 1 << 24, "max_pixels": 1 << 24}
    reduced = decode_image(buffer.getvalue(), **limits, target_side=160, mode="pad")
    full = decode_image(buffer.getvalue(), **limits)
    height, width = reduced.pixels.shape[:2]
    assert (width, height) == (301, 189)  # 1/8 scale, rounded up
    content_w, content_h = resize_geometry(2401, 1509, 160, "pad").content_size
    assert resize_geometry(width, height, 160, "pad").content_size != (content_w, content_h)
    result = preprocess(reduced.pixels, 160, MEAN, STD, "pad", original_size=reduced.original_size)
    assert not result[:, content_h:].any() and result[:, content_h - 1].any()
    reference = preprocess(full.pixels, 160, MEAN, STD, "pad")
    assert np.abs(result - reference).mean() < 0.05
