"""Image rules shared by the shard builder (``shard_tools``) and ``restorer`` itself.

It imports nothing from the project: ``shard_tools`` imports it, and ``restorer`` never imports
``shard_tools``, so DataLoader workers and the inference commands load no builder code.

* :data:`IMAGE_SUFFIXES`: file suffixes read as images, everywhere in the project.
* :data:`TILE_ENCODINGS`: the lossless encodings the builder writes tiles in (tar member suffixes).
* :func:`to_rgb8`: any Pillow mode -> 8-bit RGB; gray is replicated, palette expanded, alpha
  composited on white ``(c*a + 255*(255-a) + 127) // 255``, 16-bit gray scaled ``round(v/257)``.
"""

from __future__ import annotations

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
