"""Image rules shared by the shard builder (``shard_tools``) and ``restorer`` itself.

It imports nothing from the project: ``shard_tools`` imports it, and ``restorer`` never imports
``shard_tools``, so DataLoader workers and the inference commands load no builder code.

* :data:`IMAGE_SUFFIXES`: file suffixes read as images, everywhere in the project.
* :data:`TILE_ENCODINGS`: the lossless encodings the builder writes tiles in (tar member suffixes).
* :data:`ORIENTATION_TAG`: the EXIF tag every reader applies and resets.
* :func:`to_rgb8`: any Pillow mode -> 8-bit RGB; gray is replicated, palette expanded, alpha
  composited on white ``(c*a + 255*(255-a) + 127) // 255``, 16-bit gray scaled ``round(v/257)``.
* :func:`open_declared`: the decompression-bomb rule of every image reader in the project. The
  declared width x height is read from the header and checked against ``max_pixels`` *before* any
  pixel is decoded; Pillow's own check (``Image.MAX_IMAGE_PIXELS``: a warning, then an error at
  twice it) is off meanwhile, so that a limit above Pillow's works and the message names ours.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".tif",
    ".tiff",
    ".bmp",
    ".webp",
    ".ppm",
    ".pgm",
    ".pnm",
    ".gif",
)
TILE_ENCODINGS = ("webp", "png", "ppm")
ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 = upright


class UnsupportedMode(ValueError):
    """A pixel mode with no 8-bit RGB rule (float images, unknown modes)."""


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    c = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any supported mode to 8-bit RGB; :class:`UnsupportedMode` otherwise."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("1", "L"):
        return img.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(arr[..., None], 3, axis=2), "RGB")
    if mode == "F":
        raise UnsupportedMode("unsupported pixel mode F (floating point)")
    if mode == "P":
        if "transparency" in img.info:
            return to_rgb8(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = np.asarray(img.convert("RGBA"))
        return Image.fromarray(composite_on_white(rgba), "RGB")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    raise UnsupportedMode(f"unsupported pixel mode {mode}")


class DeclaredSizeError(ValueError):
    """The header declares an empty image, or more pixels than allowed (a decompression bomb)."""


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f}" if pixels >= 100_000 else f"{pixels / 1e6:.3g}"


def check_declared_size(size: tuple[int, int], max_pixels: int) -> None:
    """:class:`DeclaredSizeError` when ``size`` (w, h, from a header) is empty or over ``max_pixels``."""
    w, h = size
    if w <= 0 or h <= 0:
        raise DeclaredSizeError(f"image declares an empty size {w}x{h}")
    if w * h > max_pixels:
        raise DeclaredSizeError(
            f"decompression bomb: declares {w}x{h} = {megapixels(w * h)} megapixels, "
            f"over the limit of {megapixels(max_pixels)} (--max-pixels)"
        )


@contextlib.contextmanager
def open_declared(
    fp: str | os.PathLike | IO[bytes], max_pixels: int, formats: list[str] | tuple[str, ...] | None = None
) -> Iterator[Image.Image]:
    """``Image.open`` (header only), its declared size checked by :func:`check_declared_size`;
    Pillow's own limit is off for the whole block (decoding included) and restored after it.
    Pillow's errors on garbage (``UnidentifiedImageError``, ``SyntaxError`` ...) propagate."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(fp, formats=formats) as img:
            check_declared_size(img.size, max_pixels)
            yield img
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
