"""Untrusted image bytes -> RGB pixels, with limits enforced before any pixel is allocated.

The gateway decodes in two steps so that routing needs no pixels: `probe_image` parses only the
header (format, oriented size, EXIF orientation) and checks the byte and pixel limits; the router
picks a bucket from that size; `decode_image` then decodes the same opened handle, at reduced scale
when the bucket is much smaller (libjpeg DCT scaling through Pillow's draft mode for JPEG, an
integer box reduction for every format), so full-size pixels rarely exist at all.

Conventions, chosen once:
- Transparency (RGBA, LA, PA, palette or colour-key transparency) is composited on white, as a
  browser shows it on a page; dropping alpha would expose whatever colours hide under transparent
  pixels (often black or garbage).
- 16-bit grayscale is scaled to 8 bits by rounding value * 255 / 65535. Pillow's own conversion
  clips at 255 instead of scaling; 16-bit RGB(A) PNGs are reduced to their high byte by Pillow.
- EXIF orientation (all eight values) is applied, and every reported size is the oriented size.
  For PNG only an eXIf chunk before the pixel data counts (the PNG specification requires that
  position), so probing never has to decode pixels.
- MPO (the multi-picture JPEG many phone cameras write) is reported as JPEG and decoded as its
  first picture; GIF, animated PNG and animated WebP decode as their first frame.
- Truncated or corrupt data fails with `InvalidImage`; Pillow's LOAD_TRUNCATED_IMAGES stays off.
- Pillow's own decompression-bomb guard (Image.MAX_IMAGE_PIXELS) still applies on top of
  `max_pixels` and maps to the same `ImageTooLarge`.
"""

from __future__ import annotations

import io
import math
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import ExifTags, Image

from service.preprocess import REDUCING_GAP, ResizeMode

ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
ACCEPTED_CONTENT_TYPES: tuple[str, ...] = ("image/", "application/octet-stream")

_ACCEPTED_NAMES = "JPEG, PNG, WebP, BMP or GIF"
_DRAFT_REDUCTIONS = (8, 4, 2)
_WHITE = (255, 255, 255)
# What Pillow raises on corrupt or truncated input (zlib.error escapes from compressed PNG chunks).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """Base of the errors the HTTP layer turns into a JSON error with `status` and `code`."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "invalid_image"


class ImageTooLarge(ImageError):
    """The body has more bytes, or the image more pixels, than the service accepts."""

    status = 413
    code = "image_too_large"


class UnsupportedImageType(ImageError):
    """A valid image in a format the service does not accept, or a body that is not an image type."""

    status = 415
    code = "unsupported_media_type"


class InvalidImage(ImageError):
    """Empty, corrupt or truncated image data."""

    status = 400
    code = "invalid_image"


class ImageHeader:
    """What the header says about an image, plus the opened (not yet decoded) handle to decode later.

    `width` and `height` are after EXIF orientation. The handle is handed to the first
    `decode_image` call; a later decode of the same header re-opens the bytes, so a header may be
    decoded more than once, from any thread.
    """

    __slots__ = ("format", "width", "height", "orientation", "_data", "_image", "_lock")

    def __init__(self, fmt: str, width: int, height: int, orientation: int, data: bytes, image: Image.Image):
        self.format = fmt
        self.width = width
        self.height = height
        self.orientation = orientation
        self._data = data
        self._image: Image.Image | None = image
        self._lock = threading.Lock()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) after EXIF orientation."""
        return self.width, self.height

    @property
    def pixel_count(self) -> int:
        return self.width * self.height

    def __repr__(self) -> str:
        return (
            f"ImageHeader(format={self.format!r}, width={self.width}, height={self.height}, "
            f"orientation={self.orientation})"
        )

    def _take_image(self) -> Image.Image:
        with self._lock:
            image, self._image = self._image, None
        return image if image is not None else _open_accepted(self._data)


@dataclass(frozen=True)
class DecodedImage:
    """Decoded RGB pixels and where they came from.

    `pixels` is (H, W, 3) uint8, C-contiguous and read-only; it is smaller than `original_size`
    when decoded at reduced scale for a `target_side`. `original_size` is the (width, height) the
    header declared, after EXIF orientation; pass it to `preprocess(original_size=...)`.
    """

    pixels: np.ndarray
    original_size: tuple[int, int]
    format: str
    exif_transposed: bool


def check_content_type(content_type: str | None) -> None:
    """Reject bodies declared as something other than an image before reading them.

    A missing content type is allowed: the bytes are sniffed anyway.
    """
    if not content_type:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if not media_type.startswith(ACCEPTED_CONTENT_TYPES):
        raise UnsupportedImageType(
            f"content type {media_type!r} is not an image; send the raw image bytes with "
            f"Content-Type: image/jpeg (or the matching image/* type for {_ACCEPTED_NAMES})"
        )


def probe_image(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageHeader:
    """Parse only the header of `data` and enforce the limits; no pixel data is decoded."""
    if not data:
        raise InvalidImage(f"the request body is empty; send the image bytes ({_ACCEPTED_NAMES})")
    _check_bytes(len(data), max_bytes)
    webp_size = _webp_canvas_size(data)
    if webp_size is not None:
        _check_pixels(*webp_size, max_pixels)
    image = _open_accepted(data)
    try:
        orientation = _orientation(image)
        width, height = image.size
        if orientation >= 5:
            width, height = height, width
        fmt = "JPEG" if image.format == "MPO" else image.format or ""
        header = ImageHeader(fmt, width, height, orientation, data, image)
        _check_pixels(width, height, max_pixels)
    except BaseException:
        image.close()
        raise
    return header


def decode_image(
    source: bytes | ImageHeader,
    *,
    max_bytes: int,
    max_pixels: int,
    target_side: int | None = None,
    mode: ResizeMode = "crop",
) -> DecodedImage:
    """Decode to RGB uint8 pixels, applying EXIF orientation.

    `source` is the raw bytes or the header `probe_image` returned (its opened handle is reused;
    the limits are checked again, which costs nothing). `target_side` is the bucket the pixels will
    be resized to in `mode`; with it, large images are decoded at reduced scale while the side that
    the resize maps onto the bucket (the long side for "pad", the short side for "crop") stays at
    least `target_side` pixels long:
    - JPEG at the largest libjpeg DCT scale (1/2, 1/4, 1/8) allowed (`draft_reduction`);
    - then any format by the integer box reduction that `preprocess` would otherwise make through
      Pillow's `reducing_gap`, done here so the full-size pixels never become a numpy array.
    """
    header = (
        source
        if isinstance(source, ImageHeader)
        else probe_image(source, max_bytes=max_bytes, max_pixels=max_pixels)
    )
    _check_bytes(len(header._data), max_bytes)
    _check_pixels(header.width, header.height, max_pixels)
    image = header._take_image()
    try:
        if target_side is not None and header.format == "JPEG":
            reduction = draft_reduction(header.width, header.height, target_side, mode)
            if reduction > 1:
                image.draft(image.mode, (image.width // reduction, image.height // reduction))
        image.load()
        rgb = _to_rgb(image)
        if target_side is not None:
            rgb = _box_reduce(rgb, target_side, mode)
        if header.orientation in _ORIENTATION_TRANSPOSE:
            rgb = rgb.transpose(_ORIENTATION_TRANSPOSE[header.orientation])
        pixels = np.asarray(rgb)
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"the image has more pixels than the decoder accepts: {error}") from error
    except _DECODE_ERRORS as error:
        raise InvalidImage(
            f"the {header.format} image data is corrupt or truncated ({error}); send the complete file"
        ) from error
    finally:
        image.close()
    return DecodedImage(pixels, header.size, header.format, header.orientation in _ORIENTATION_TRANSPOSE)


def draft_reduction(width: int, height: int, target_side: int, mode: ResizeMode) -> int:
    """Largest JPEG DCT reduction (8, 4, 2 or 1) that keeps the bucket-mapped side >= `target_side`.

    libjpeg rounds scaled sizes up, so side / reduction >= target_side is sufficient.
    """
    if target_side < 1:
        raise ValueError(f"target_side must be a positive number of pixels, got {target_side}")
    side = _mapped_side(width, height, mode)
    for reduction in _DRAFT_REDUCTIONS:
        if side >= reduction * target_side:
            return reduction
    return 1


def _box_reduce(rgb: Image.Image, target_side: int, mode: ResizeMode) -> Image.Image:
    """Shrink by the integer factor Pillow's resize(reducing_gap=REDUCING_GAP) would use first."""
    factor = int(_mapped_side(rgb.width, rgb.height, mode) / (REDUCING_GAP * target_side))
    return rgb.reduce(factor) if factor > 1 else rgb


def _mapped_side(width: int, height: int, mode: ResizeMode) -> int:
    """The side that resizing maps onto the bucket: the long one when padding, the short one when cropping."""
    return max(width, height) if mode == "pad" else min(width, height)


def _open_accepted(data: bytes) -> Image.Image:
    """Open lazily with only the accepted format parsers; classify what they reject."""
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"the image has more pixels than the decoder accepts: {error}") from error
    except Image.UnidentifiedImageError:
        raise _classify_rejected(data) from None
    except _DECODE_ERRORS as error:
        raise InvalidImage(
            f"the image header is corrupt or truncated ({error}); send the complete file"
        ) from error


def _classify_rejected(data: bytes) -> ImageError:
    """Tell a well-formed image of another format (415) from bytes that are no image at all (400).

    Only the header is parsed (Image.open is lazy); the pixels of other formats are never decoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as other:
            found = other.format
    except Exception:  # any failure here just means "not an image we can recognise"
        found = None
    if found is None:
        return InvalidImage(f"the body is not a recognisable image; send {_ACCEPTED_NAMES} bytes")
    return UnsupportedImageType(f"{found} images are not accepted; convert the image to {_ACCEPTED_NAMES}")


def _orientation(image: Image.Image) -> int:
    """EXIF orientation 1..8 from the header; invalid or absent values mean 1 (as stored)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # PngImageFile.getexif() would decode the pixels to look for a late eXIf chunk
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        return 1  # a broken EXIF block does not make the pixels unusable
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_bytes(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageTooLarge(
            f"the image is {size} bytes, above the limit of {max_bytes} bytes; "
            "send a smaller or more compressed image"
        )


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise InvalidImage(f"the image declares an empty size {width}x{height}")
    if width * height > max_pixels:
        side = math.isqrt(max_pixels)
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} pixels; downscale it (about {side}x{side} fits)"
        )


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP header, read by hand: libwebp allocates the canvas as soon as Pillow
    opens the file, so the limit has to be checked before Image.open (other formats open lazily)."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode of the accepted formats to RGB (see the module conventions)."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I"):
        return _sixteen_bit_gray_to_rgb(image)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, _WHITE)
        rgb.paste(rgba, mask=rgba)
        return rgb
    return image.convert("RGB")


def _sixteen_bit_gray_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit grayscale (modes I;16* and I, which PNG uses for 16-bit gray) to 8-bit RGB."""
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
    gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
