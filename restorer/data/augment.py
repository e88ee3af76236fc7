"""Patch augmentation for the training stream (the JPEG degradation is restorer.data.degrade).

The original design augments a training image like this: rescale the whole image (probability
``rescale_p``, a scale drawn from ``rescale_scales``, bicubic), rotate the whole image by 90, 180
or 270 degrees (probability ``rotate_p``, canvas expanded), then take a random ``patch_size``
square crop. Here the same draw is made (:func:`draw`), but only the part of the tile that the
crop will come from is resampled (:func:`crop_first`): Pillow's ``resize(box=...)`` samples the
source at exactly the positions a whole-image resize would (the filter reads the pixels around
the box too), and a 90-degree rotation of a square patch is an exact array rotation. The result
equals the whole-image path (:func:`whole_image`, kept as the reference for the tests and the
loader benchmark) at a fraction of the work: O(patch) instead of O(tile) per patch.

Tiles smaller than the patch raise :class:`TileTooSmall` (the stream skips and counts them);
tiles too small for the drawn down-scale get the smallest scale that still fits.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from restorer.imagecore import to_rgb8

BICUBIC = Image.Resampling.BICUBIC


class TileTooSmall(ValueError):
    """The decoded tile cannot hold one patch."""


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    patch_size: int = 128
    rescale_p: float = 0.5
    rescale_scales: tuple = (0.9, 0.8, 0.7, 0.6)
    rotate_p: float = 0.5
    flip_p: float = 0.0

    def validate(self) -> None:
        if self.patch_size < 8:
            raise ValueError(f"patch_size must be at least 8, got {self.patch_size}")
        for name in ("rescale_p", "rotate_p", "flip_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        if not self.rescale_scales or any(not 0.0 < s <= 1.0 for s in self.rescale_scales):
            raise ValueError(f"rescale_scales must be non-empty scales in (0, 1], got {self.rescale_scales}")


@dataclasses.dataclass(frozen=True)
class Draw:
    """Everything random about one patch. ``y, x`` is the crop's top-left corner in the image as
    rescaled (to ``size``) and then rotated by ``rot`` quarter turns counter-clockwise."""

    scale: float  # the scale asked for (1.0 = not rescaled)
    size: tuple  # (height, width) of the rescaled, unrotated image
    rot: int  # 0..3 quarter turns counter-clockwise
    flip: bool  # horizontal flip of the final patch
    y: int
    x: int


def decode_image(data: bytes, grayscale: bool = False) -> Image.Image:
    """Decode a lossless tile (png/webp/ppm) to a loaded RGB (or L) Pillow image. Modes other than
    RGB (the builder writes RGB) follow the builder's own rules (:func:`restorer.imagecore.to_rgb8`)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if grayscale and img.mode == "L":
        return img
    rgb = to_rgb8(img)
    return rgb.convert("L") if grayscale else rgb


def draw(rng: np.random.Generator, height: int, width: int, params: AugmentParams) -> Draw:
    """Draw the rescale, rotation, flip and crop position of one patch from a ``height x width`` tile."""
    p = params.patch_size
    short = min(height, width)
    if short < p:
        raise TileTooSmall(f"tile {width}x{height} is smaller than the {p} px patch")
    scale = 1.0
    if rng.random() < params.rescale_p:
        scale = float(params.rescale_scales[int(rng.integers(len(params.rescale_scales)))])
    rot = int(rng.integers(1, 4)) if rng.random() < params.rotate_p else 0
    flip = bool(rng.random() < params.flip_p)
    eff = scale
    if round(short * eff) < p:  # the drawn down-scale leaves no room for a patch: the smallest that fits
        eff = p / short
    size = (height, width) if eff == 1.0 else (max(p, round(height * eff)), max(p, round(width * eff)))
    h, w = (size[1], size[0]) if rot % 2 else size
    y = int(rng.integers(h - p + 1))
    x = int(rng.integers(w - p + 1))
    return Draw(scale=scale, size=size, rot=rot, flip=flip, y=y, x=x)


def _source_region(d: Draw, p: int) -> tuple[int, int]:
    """Top-left (row, col) in the rescaled, unrotated image of the square that ends up as the patch."""
    h, w = d.size
    if d.rot == 0:
        return d.y, d.x
    if d.rot == 1:
        return d.x, w - d.y - p
    if d.rot == 2:
        return h - d.y - p, w - d.x - p
    return h - d.x - p, d.y


def _finish(patch: np.ndarray, d: Draw) -> np.ndarray:
    if d.rot:
        patch = np.rot90(patch, d.rot)
    if d.flip:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(patch)


def crop_first(img: Image.Image, d: Draw, p: int, array: np.ndarray | None = None) -> np.ndarray:
    """The patch of ``d``, resampling only the region it comes from. ``array`` is ``np.asarray(img)``
    when the caller already has it (saves a conversion per patch when there is no rescale)."""
    ry, rx = _source_region(d, p)
    if d.size == (img.height, img.width):
        src = np.asarray(img) if array is None else array
        patch = src[ry : ry + p, rx : rx + p]
    else:
        sy, sx = d.size[0] / img.height, d.size[1] / img.width
        box = (rx / sx, ry / sy, (rx + p) / sx, (ry + p) / sy)
        patch = np.asarray(img.resize((p, p), BICUBIC, box=box))
    return _finish(patch, d)


_TRANSPOSE = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}


def whole_image(img: Image.Image, d: Draw, p: int) -> np.ndarray:
    """Reference: the original design's order (rescale the whole image, rotate it with expand,
    crop). Same output as :func:`crop_first`; used by the tests and by bench/loader.py's baseline."""
    if d.size != (img.height, img.width):
        img = img.resize((d.size[1], d.size[0]), BICUBIC)
    if d.rot:
        img = img.transpose(_TRANSPOSE[d.rot])
    patch = np.asarray(img.crop((d.x, d.y, d.x + p, d.y + p)))
    return np.ascontiguousarray(patch[:, ::-1]) if d.flip else patch


def random_patches(img: Image.Image, n: int, rng: np.random.Generator, params: AugmentParams) -> list[np.ndarray]:
    """``n`` independently augmented patches from one decoded tile (crop first, then resample)."""
    array = None
    out = []
    for _ in range(n):
        d = draw(rng, img.height, img.width, params)
        if array is None and d.size == (img.height, img.width):
            array = np.asarray(img)
        out.append(crop_first(img, d, params.patch_size, array))
    return out
