"""Decode one input file into normalised 8-bit RGB tiles, losslessly encoded.

Rules (the README repeats them):

* **Formats** read: JPEG, PNG, WebP, TIFF, BMP, PPM/PGM, GIF (first frame). Anything else, and
  anything Pillow cannot identify, is skipped with a reason.
* **Bombs**: a file larger than ``max_file_bytes`` is skipped before it is read; an image whose
  *declared* width x height exceeds ``max_pixels`` is skipped before its pixels are decoded
  (the project's one rule, :func:`restorer.imagecore.open_declared`, which ``restorer``'s own
  image reader applies too).
* **Orientation**: the EXIF orientation tag is applied (``ImageOps.exif_transpose``). When the
  source gives an explicit rotation (Open Images' CSV), that rotation is applied *instead*: it
  was derived from the original upload's EXIF, so applying both would rotate twice.
  Open Images' ``Rotation`` is the angle in degrees, **counter-clockwise**, by which the image
  must be rotated to be upright (storage.googleapis.com/openimages/web/2018-05-17-rotation-
  information.html); PIL's ``rotate`` / ``ROTATE_90`` are counter-clockwise too.
* **Colour**: everything becomes 8-bit RGB. Gray (1, L) is replicated into R=G=B; palette is
  expanded (through RGBA when it has transparency); CMYK, YCbCr, LAB, HSV use Pillow's conversion
  (ICC profiles are not applied: pixel values are kept as stored). Alpha (RGBA, LA, PA, P with
  transparency) is **composited on white**: ``out = (c*a + 255*(255-a) + 127) // 255``.
  16-bit gray (I;16*, I) is scaled ``round(v / 257)`` (65535 -> 255); 16-bit RGB PNGs are read by
  Pillow as RGB keeping the high byte. Float images (mode F) are skipped as unsupported.
* **Size**: images whose shorter side (after orientation and any downscale) is below
  ``min_size`` are skipped.
* **Lossy downscale**: when ``downscale`` < 1 (the builder uses it for Open Images JPEGs), the
  image is resized by that factor with Pillow's bicubic filter (antialiased), which attenuates the
  source's own 8x8 block artifacts.
* **Tiles**: the image is cut into a grid of ``tile`` x ``tile`` tiles from the top-left corner;
  the remainder column/row becomes narrower tiles, kept when both sides are >= ``min_size`` and
  dropped otherwise. Tile keys use pixel offsets ``<y>_<x>``.

Encoding (chosen by measurement, ``bench/shards.py``; 512 px RGB tiles of real photos, Pillow 13,
one core of a shared 2-core machine; decode ms per tile / encode ms per tile / bytes per pixel):
WebP lossless method 0 3.51 / 6.4 / 1.255, WebP lossless method 4 3.59 / 82.5 / 1.138,
PNG level 1 5.83 / 15.4 / 1.670, PNG level 6 5.69 / 50.7 / 1.584, PNG level 9 7.83 / 113.4 / 1.572,
PPM 0.30 / 0.2 / 3.000. **Default: WebP lossless, method 0**: 1.25-1.33x smaller than PNG and
>= 1.6x faster to decode than any PNG level, 2.4x smaller than PPM, and as cheap to encode as PNG level 1
(method 4 saves 9% more bytes for 13x the encode time). PPM decodes ~12x faster and is the
better choice when shards sit on fast local disk and the loader is decode-bound
(``--encoding ppm``); PNG is offered for tools without WebP.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image, ImageOps, UnidentifiedImageError

from restorer import imagecore
from restorer.errors import first_line

log = logging.getLogger("shard_tools.images")
Image.init()  # register every plugin, so that formats= below can name them

ALLOWED_FORMATS = ["JPEG", "PNG", "WEBP", "TIFF", "BMP", "PPM", "GIF"]
IMAGE_EXTENSIONS = frozenset(imagecore.IMAGE_SUFFIXES)  # one list for the whole project
ENCODINGS = imagecore.TILE_ENCODINGS


class Skip(Exception):
    """This input cannot become a sample; the message is the reason recorded in the manifest."""


@dataclass
class Tile:
    y: int
    x: int
    h: int
    w: int
    data: bytes


@dataclass
class Decoded:
    orig_size: tuple[int, int]  # (w, h) after orientation, before any downscale
    size: tuple[int, int]  # (w, h) that was tiled
    sha256: str
    orig_mode: str
    orig_format: str
    rotation: int  # counter-clockwise degrees applied (EXIF or explicit)
    tiles: list[Tile] = field(default_factory=list)


def encode(img: Image.Image, encoding: str) -> bytes:
    """Losslessly encode an RGB image."""
    buf = io.BytesIO()
    if encoding == "webp":
        img.save(buf, "WEBP", lossless=True, quality=0, method=0, exact=True)
    elif encoding == "png":
        img.save(buf, "PNG", compress_level=1)
    elif encoding == "ppm":
        img.save(buf, "PPM")
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    return buf.getvalue()


def to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any supported mode to 8-bit RGB (:func:`restorer.imagecore.to_rgb8`); :class:`Skip` otherwise."""
    try:
        return imagecore.to_rgb8(img)
    except imagecore.UnsupportedMode as exc:
        raise Skip(str(exc)) from None


def _orient(img: Image.Image, rotation: int | None) -> tuple[Image.Image, int]:
    """Apply an explicit counter-clockwise rotation, or else the EXIF orientation."""
    if rotation:
        if rotation % 90:
            raise Skip(f"rotation {rotation} is not a multiple of 90 degrees")
        op = (
            {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}[
                rotation % 360
            ]
            if rotation % 360
            else None
        )
        return (img.transpose(op) if op else img), rotation % 360
    try:
        orientation = img.getexif().get(0x0112, 1)
        out = ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF: keep the stored orientation
        log.debug("EXIF orientation unreadable (%s); kept as stored", exc)
        return img, 0
    rot = {3: 180, 6: 270, 8: 90}.get(int(orientation) if isinstance(orientation, int) else 1, 0)
    return (out if out is not None else img), rot


def tile_grid(w: int, h: int, tile: int, min_size: int) -> Iterator[tuple[int, int, int, int]]:
    """(y, x, h, w) of each tile, row-major; remainder tiles below ``min_size`` dropped."""
    for y in range(0, h, tile):
        th = min(tile, h - y)
        if th < min_size:
            continue
        for x in range(0, w, tile):
            tw = min(tile, w - x)
            if tw < min_size:
                continue
            yield y, x, th, tw


def _open_checked(stack: contextlib.ExitStack, data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only (:func:`restorer.imagecore.open_declared`, open until ``stack``
    closes); refuse what is not an allowed image or declares more than ``max_pixels``."""
    try:
        return stack.enter_context(imagecore.open_declared(io.BytesIO(data), max_pixels, ALLOWED_FORMATS))
    except imagecore.DeclaredSizeError as exc:
        raise Skip(str(exc)) from None
    except UnidentifiedImageError:
        raise Skip("not an image (unrecognised or unsupported format)") from None
    except Exception as exc:  # header parsers raise many types on garbage
        raise Skip(f"corrupt header ({type(exc).__name__}: {exc})") from None


def decode(
    data: bytes,
    *,
    encoding: str = "webp",
    tile: int = 512,
    min_size: int = 128,
    max_pixels: int = 100_000_000,
    rotation: int | None = None,
    downscale: float = 1.0,
    skip_tiles: int = 0,
) -> Decoded:
    """Decode ``data`` and return its tiles (encoded). Raises :class:`Skip` with a reason.

    ``skip_tiles``: the first N tiles are computed but not encoded (resume inside an image).
    ``max_pixels`` is the one limit on the declared size (the project's rule,
    :func:`restorer.imagecore.open_declared`).
    """
    if not data:
        raise Skip("empty file (0 bytes)")
    with contextlib.ExitStack() as stack:
        img = _open_checked(stack, data, max_pixels)
        return _decode(img, hashlib.sha256(data).hexdigest(), encoding, tile, min_size, rotation, downscale, skip_tiles)


def _decode(
    img: Image.Image,
    sha: str,
    encoding: str,
    tile: int,
    min_size: int,
    rotation: int | None,
    downscale: float,
    skip_tiles: int,
) -> Decoded:
    fmt, mode = img.format or "?", img.mode
    try:
        img.load()
    except MemoryError:
        raise Skip("out of memory while decoding") from None
    except Exception as exc:
        raise Skip(f"corrupt or truncated ({first_line(exc)})") from None
    img, rot = _orient(img, rotation)
    img = to_rgb8(img)
    orig_size = img.size
    if downscale and downscale < 1.0:
        nw, nh = max(1, round(img.width * downscale)), max(1, round(img.height * downscale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    if min(img.size) < min_size:
        raise Skip(f"too small: {img.width}x{img.height} (shorter side < min_size {min_size})")
    out = Decoded(orig_size=orig_size, size=img.size, sha256=sha, orig_mode=mode, orig_format=fmt, rotation=rot)
    for i, (y, x, th, tw) in enumerate(tile_grid(img.width, img.height, tile, min_size)):
        if i < skip_tiles:
            continue
        out.tiles.append(Tile(y, x, th, tw, encode(img.crop((x, y, x + tw, y + th)), encoding)))
    return out


def count_tiles(w: int, h: int, tile: int, min_size: int) -> int:
    return sum(1 for _ in tile_grid(w, h, tile, min_size))
