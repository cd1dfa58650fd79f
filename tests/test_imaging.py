"""service.imaging: every accepted format and pixel mode decodes to the right RGB values, EXIF
orientation is applied, limits hold before any pixel is allocated, and bad input fails cleanly."""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from sklearn.datasets import load_sample_images

from service.imaging import (
    DecodedImage,
    ImageError,
    ImageTooLarge,
    InvalidImage,
    UnsupportedImageType,
    check_content_type,
    decode_image,
    draft_reduction,
    probe_image,
)
from service.preprocess import REDUCING_GAP

LIMITS = {"max_bytes": 64 << 20, "max_pixels": 40_000_000}


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def decode(data: bytes, **kwargs) -> np.ndarray:
    return decode_image(data, **LIMITS, **kwargs).pixels


def raw_png(width: int, height: int, bit_depth: int, color_type: int, pixels: bytes = b"") -> bytes:
    """A PNG written by hand, so it can declare any size or bit depth (Pillow cannot write 16-bit RGB)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(pixels))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(skdata.astronaut()[100:292, 150:406])  # 256x192, not square


# --- formats and modes -------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "options"), [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_decode_exactly(astronaut, fmt, options):
    decoded = decode_image(encode(Image.fromarray(astronaut), fmt, **options), **LIMITS)
    assert isinstance(decoded, DecodedImage)
    assert decoded.format == fmt
    assert decoded.original_size == (256, 192)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.flags.c_contiguous
    np.testing.assert_array_equal(decoded.pixels, astronaut)
    assert not decoded.exif_transposed


def test_jpeg_decodes_within_compression_error(astronaut):
    pixels = decode(encode(Image.fromarray(astronaut), "JPEG", quality=95))
    assert pixels.shape == astronaut.shape
    assert np.abs(pixels.astype(int) - astronaut).mean() < 2.0


@pytest.mark.parametrize("index", [0, 1])
def test_bundled_sklearn_jpegs_match_their_reference_decode(index):
    samples = load_sample_images()
    decoded = decode_image(Path(samples.filenames[index]).read_bytes(), **LIMITS)
    assert decoded.format == "JPEG"
    np.testing.assert_array_equal(decoded.pixels, samples.images[index])


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP"])
def test_grayscale_becomes_three_equal_channels(fmt):
    camera = skdata.camera()[::4, ::4]
    pixels = decode(encode(Image.fromarray(camera), fmt))
    np.testing.assert_array_equal(pixels, np.repeat(camera[:, :, None], 3, axis=2))


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped():
    values = np.array([[0, 128, 257, 1000], [32767, 32768, 65280, 65535]], dtype=np.uint16)
    pixels = decode(encode(Image.fromarray(values), "PNG"))
    expected = np.round(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(pixels[..., 0], expected)
    np.testing.assert_array_equal(pixels[..., 2], expected)


def test_sixteen_bit_rgb_png_keeps_the_high_byte():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(5, 7, 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    pixels = decode(raw_png(7, 5, 16, 2, rows))
    np.testing.assert_array_equal(pixels, (values >> 8).astype(np.uint8))


def test_bilevel_image_maps_to_black_and_white():
    bits = np.zeros((8, 8), dtype=bool)
    bits[::2] = True
    pixels = decode(encode(Image.fromarray(bits), "PNG"))
    np.testing.assert_array_equal(pixels[..., 1], np.where(bits, 255, 0))


def test_rgba_is_composited_on_white():
    colour = np.array([200, 100, 50])
    alpha = np.array([0, 64, 128, 255], dtype=np.uint8)
    rgba = np.concatenate([np.tile(colour, (1, 4, 1)), alpha[None, :, None]], axis=2).astype(np.uint8)
    for fmt, options in [("PNG", {}), ("WEBP", {"lossless": True})]:
        pixels = decode(encode(Image.fromarray(rgba), fmt, **options))
        expected = colour * alpha[:, None] / 255 + 255 * (1 - alpha[:, None] / 255)
        np.testing.assert_allclose(pixels[0], expected, atol=1)


def test_gray_alpha_is_composited_on_white():
    la = np.array([[[0, 0], [0, 255], [100, 128]]], dtype=np.uint8)
    pixels = decode(encode(Image.fromarray(la, "LA"), "PNG"))
    np.testing.assert_allclose(pixels[0, :, 0], [255, 0, 100 * 128 / 255 + 255 * 127 / 255], atol=1)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    palette = [255, 0, 0, 0, 0, 255, 0, 128, 0]
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette)
    pixels = decode(encode(image, fmt, transparency=1))
    colours = {0: (255, 0, 0), 1: (255, 255, 255), 2: (0, 128, 0)}  # index 1 is transparent -> white
    np.testing.assert_array_equal(pixels, np.array([[colours[i] for i in row] for row in indices.tolist()]))


def test_rgb_colour_key_transparency():
    rgb = np.array([[[10, 20, 30], [40, 50, 60]]], dtype=np.uint8)
    pixels = decode(encode(Image.fromarray(rgb), "PNG", transparency=(40, 50, 60)))
    np.testing.assert_array_equal(pixels, [[[10, 20, 30], [255, 255, 255]]])


def test_cmyk_jpeg_converts_to_rgb():
    cmyk = np.zeros((16, 32, 4), dtype=np.uint8)
    cmyk[:, :16] = (10, 60, 200, 30)
    cmyk[:, 16:] = (0, 0, 0, 255)
    pixels = decode(encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95))
    c, m, y, k = 10, 60, 200, 30
    expected = np.array([(255 - k) * (255 - v) / 255 for v in (c, m, y)])
    np.testing.assert_allclose(pixels[8, 4], expected, atol=4)
    np.testing.assert_allclose(pixels[8, 28], [0, 0, 0], atol=4)


def test_gif_decodes_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_array_equal(decode(data), np.full((8, 8, 3), (255, 0, 0)))


# --- EXIF orientation ----------------------------------------------------------------------------

ORIENTED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_exif_orientation_matches_numpy_reference(astronaut, orientation, fmt):
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    data = encode(Image.fromarray(astronaut), fmt, exif=exif, **options)
    expected = ORIENTED[orientation](astronaut)
    header = probe_image(data, **LIMITS)
    assert (header.height, header.width) == expected.shape[:2]
    assert header.orientation == orientation
    decoded = decode_image(header, **LIMITS)
    assert decoded.original_size == (expected.shape[1], expected.shape[0])
    assert decoded.exif_transposed == (orientation != 1)
    assert decoded.pixels.flags.c_contiguous
    if fmt == "JPEG":
        assert np.abs(decoded.pixels.astype(int) - expected).mean() < 2.0
    else:
        np.testing.assert_array_equal(decoded.pixels, expected)


def test_invalid_orientation_value_is_ignored(astronaut):
    exif = Image.Exif()
    exif[0x0112] = 42
    header = probe_image(encode(Image.fromarray(astronaut), "PNG", exif=exif), **LIMITS)
    assert (header.orientation, header.size, header.pixel_count) == (1, (256, 192), 256 * 192)


def test_one_header_decodes_concurrently_from_many_threads(astronaut):
    header = probe_image(encode(Image.fromarray(astronaut), "PNG"), **LIMITS)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: decode_image(header, **LIMITS).pixels, range(8)))
    for pixels in results:
        np.testing.assert_array_equal(pixels, astronaut)


# --- limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [100_000, 6_000])
def test_decompression_bomb_is_rejected_from_the_header(side):
    """Huge declared size, tiny file: rejected before Pillow allocates a single image."""
    bomb = raw_png(side, side, 8, 2, b"\x00" * 1000)
    assert len(bomb) < 200
    limits = {"max_bytes": 1 << 20, "max_pixels": 10_000_000}
    blocks_before = Image.core.get_stats()["new_count"]
    tracemalloc.start()
    with pytest.raises(ImageTooLarge) as caught:
        probe_image(bomb, **limits)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, **limits, target_side=224)
    assert Image.core.get_stats()["new_count"] == blocks_before
    assert peak < 1 << 20
    assert str(side * side) in str(caught.value)
    assert caught.value.status == 413 and caught.value.code == "image_too_large"


def declare_size(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """Rewrite the size a real file declares in its header, leaving the (small) pixel data as it is."""
    patched = bytearray(data)
    if fmt == "PNG":
        patched[16:24] = struct.pack(">II", width, height)
        patched[29:33] = struct.pack(">I", zlib.crc32(bytes(patched[12:29])))
    elif fmt == "GIF":
        patched[6:10] = struct.pack("<HH", width, height)
    elif fmt == "BMP":
        patched[18:26] = struct.pack("<ii", width, height)
    elif fmt == "JPEG":
        sof = data.index(b"\xff\xc0")
        patched[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    elif fmt == "WEBP":
        assert data[12:16] == b"VP8X"
        patched[24:30] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return bytes(patched)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "JPEG", "WEBP"])
def test_declared_size_over_the_limit_is_rejected_without_allocating(fmt):
    frames = [Image.new("RGB", (64, 48), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    options = {"save_all": True, "append_images": frames[1:]} if fmt == "WEBP" else {}  # animated: VP8X
    bomb = declare_size(encode(frames[0], fmt, **options), fmt, 6000, 6000)
    blocks_before = Image.core.get_stats()["new_count"]
    with pytest.raises(ImageTooLarge, match=r"6000x6000 = 36000000 pixels, above the limit of 10000000"):
        decode_image(bomb, max_bytes=1 << 20, max_pixels=10_000_000, target_side=224)
    assert Image.core.get_stats()["new_count"] == blocks_before


def test_webp_canvas_is_checked_before_the_decoder_is_created():
    """libwebp allocates the whole canvas when Pillow opens a WebP, so Image.open must not even run."""
    frames = [Image.new("RGB", (64, 48), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:])
    bomb = declare_size(webp, "WEBP", 12_000, 12_000)  # above Pillow's warning threshold
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageTooLarge, match="12000x12000"):
            probe_image(bomb, max_bytes=1 << 20, max_pixels=10_000_000)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pixel_limit_message_names_limit_and_actual(astronaut):
    with pytest.raises(ImageTooLarge, match=r"256x192 = 49152 pixels, above the limit of 49151"):
        probe_image(encode(Image.fromarray(astronaut), "PNG"), max_bytes=1 << 20, max_pixels=49_151)
    assert probe_image(encode(Image.fromarray(astronaut), "PNG"), max_bytes=1 << 20, max_pixels=49_152)


def test_byte_limit(astronaut):
    data = encode(Image.fromarray(astronaut), "PNG")
    with pytest.raises(ImageTooLarge, match=rf"{len(data)} bytes, above the limit of {len(data) - 1} bytes"):
        decode_image(data, max_bytes=len(data) - 1, max_pixels=10**6)
    header = probe_image(data, max_bytes=len(data), max_pixels=10**6)
    with pytest.raises(ImageTooLarge):  # a header is re-checked against the limits it is decoded under
        decode_image(header, max_bytes=len(data) - 1, max_pixels=10**6)


# --- invalid and unsupported input ---------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_images_are_invalid(astronaut, fmt, keep):
    data = encode(Image.fromarray(astronaut), fmt)
    truncated = data[: int(len(data) * keep)]
    header = probe_image(truncated, **LIMITS)  # the header is intact, the pixel data is not
    with pytest.raises(InvalidImage, match="corrupt or truncated") as caught:
        decode_image(header, **LIMITS)
    assert caught.value.status == 400 and caught.value.code == "invalid_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_truncated_header_is_invalid(astronaut, fmt):
    with pytest.raises(InvalidImage):
        probe_image(encode(Image.fromarray(astronaut), fmt)[:20], **LIMITS)


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_invalid(seed):
    noise = np.random.default_rng(seed).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidImage, match="not a recognisable image"):
        decode_image(noise, **LIMITS)


@pytest.mark.parametrize("body", [b"", b'{"image": "cat.jpg"}', b"<html></html>"])
def test_empty_and_non_image_bodies_are_invalid(body):
    with pytest.raises(InvalidImage):
        probe_image(body, **LIMITS)


@pytest.mark.parametrize(("fmt", "name"), [("TIFF", "TIFF"), ("ICO", "ICO"), ("PPM", "PPM")])
def test_valid_images_of_other_formats_are_unsupported(astronaut, fmt, name):
    data = encode(Image.fromarray(astronaut), fmt)
    with pytest.raises(UnsupportedImageType, match=rf"{name} images are not accepted") as caught:
        decode_image(data, **LIMITS)
    assert caught.value.status == 415 and caught.value.code == "unsupported_media_type"


def test_error_hierarchy_is_one_family():
    assert all(issubclass(cls, ImageError) for cls in (ImageTooLarge, UnsupportedImageType, InvalidImage))
    assert len({cls.code for cls in (ImageTooLarge, UnsupportedImageType, InvalidImage)}) == 3


@pytest.mark.parametrize(
    "content_type", [None, "", "image/jpeg", "IMAGE/PNG; q=1", "application/octet-stream"]
)
def test_image_content_types_pass(content_type):
    check_content_type(content_type)


@pytest.mark.parametrize("content_type", ["application/json", "text/plain; charset=utf-8", "video/mp4"])
def test_other_content_types_are_unsupported(content_type):
    with pytest.raises(UnsupportedImageType, match="not an image"):
        check_content_type(content_type)


# --- reduced-scale decoding ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    coffee = Image.fromarray(skdata.coffee()).resize((2400, 1600), Image.Resampling.BICUBIC)
    return encode(coffee, "JPEG", quality=90)


@pytest.mark.parametrize(
    ("target", "mode", "expected"),
    [
        (224, "crop", (600, 400)),
        (224, "pad", (300, 200)),
        (384, "crop", (600, 400)),
        (384, "pad", (600, 400)),
        (600, "crop", (1200, 800)),
    ],
)
def test_draft_decodes_large_jpeg_at_reduced_scale(large_jpeg, target, mode, expected):
    decoded = decode_image(large_jpeg, **LIMITS, target_side=target, mode=mode)
    height, width = decoded.pixels.shape[:2]
    assert (width, height) == expected
    assert decoded.original_size == (2400, 1600)
    mapped = max(width, height) if mode == "pad" else min(width, height)
    assert target <= mapped < 2 * target  # never below what the resize needs, no larger than useful
    full = Image.fromarray(decode(large_jpeg)).resize((width, height), Image.Resampling.BOX)
    assert np.abs(decoded.pixels.astype(int) - np.asarray(full)).mean() < 3.0


def test_draft_respects_orientation_and_reuses_header(large_jpeg):
    image = Image.open(io.BytesIO(large_jpeg))
    exif = Image.Exif()
    exif[0x0112] = 6
    header = probe_image(encode(image, "JPEG", quality=90, exif=exif), **LIMITS)
    first = decode_image(header, **LIMITS, target_side=300, mode="crop")
    again = decode_image(header, **LIMITS, target_side=300, mode="crop")  # re-opens the bytes
    assert first.original_size == (1600, 2400)
    assert first.pixels.shape == (600, 400, 3)  # portrait after rotation, short side 400 >= 300
    np.testing.assert_array_equal(first.pixels, again.pixels)


def test_other_formats_are_box_reduced_but_keep_the_reducing_gap(astronaut):
    big = Image.fromarray(astronaut).resize((2048, 1536), Image.Resampling.BILINEAR)
    decoded = decode_image(encode(big, "PNG", compress_level=1), **LIMITS, target_side=100, mode="pad")
    assert decoded.original_size == (2048, 1536)
    assert decoded.pixels.shape == (256, 342, 3)  # factor 6 = int(2048 / (3 * 100)), sizes rounded up
    assert decoded.pixels.shape[1] >= REDUCING_GAP * 100


def test_mpo_from_phone_cameras_is_a_draftable_jpeg():
    pictures = [Image.new("RGB", (1600, 1200), colour) for colour in [(200, 10, 10), (10, 10, 200)]]
    mpo = encode(pictures[0], "MPO", save_all=True, append_images=pictures[1:])
    decoded = decode_image(mpo, **LIMITS, target_side=300, mode="crop")
    assert decoded.format == "JPEG"
    assert decoded.pixels.shape == (300, 400, 3)
    np.testing.assert_allclose(decoded.pixels[150, 200], (200, 10, 10), atol=4)


@pytest.mark.parametrize(
    ("size", "target", "mode", "expected"),
    [
        ((4000, 3000), 384, "crop", 4),
        ((4000, 3000), 384, "pad", 8),
        ((4000, 3000), 224, "crop", 8),
        ((767, 1000), 384, "crop", 1),
        ((768, 1000), 384, "crop", 2),
        ((300, 200), 384, "pad", 1),
    ],
)
def test_draft_reduction_table(size, target, mode, expected):
    assert draft_reduction(*size, target, mode) == expected
