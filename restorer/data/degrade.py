"""JPEG degradation: the one place that compresses images, so training, eval and tests agree.

Everything here works on uint8 RGB (or L) numpy arrays and Pillow's libjpeg, the encoder the
published BSDS500/LIVE1 JPEG rows use.

Training degradations (:class:`Degradation`, drawn per patch by :func:`draw_degradation`, applied
by :func:`degrade`): the quality is drawn over a range; with probability ``double_p`` the patch is
compressed twice, first at another quality drawn from the same range, and in half of those cases
the second compression's 8x8 grid is shifted by 0-7 px (not both 0) against the first, as when a
photo was cropped between two saves; the chroma subsampling is drawn from a list. The quality the
model is told is always the LAST compression's, which is what ``restorer restore`` reads from a
file's quantisation tables.
"""
from __future__ import annotations

import dataclasses
import functools
import io
from typing import Optional, Sequence

import numpy as np
from PIL import Image

SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def parse_quality(spec: "str | int") -> tuple[int, int]:
    """``"10"`` -> (10, 10); ``"10-90"`` -> (10, 90). Qualities are Pillow's 1..100."""
    text = str(spec).strip()
    try:
        lo, _, hi = text.partition("-")
        lo_q, hi_q = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"quality must be a number or a range like 10-90, got {spec!r}") from None
    if not (1 <= lo_q <= hi_q <= 100):
        raise ValueError(f"quality must lie in 1..100 with low <= high, got {spec!r}")
    return lo_q, hi_q


def parse_subsampling(spec: str) -> tuple[str, ...]:
    """``"4:2:0"`` -> ("4:2:0",); ``"4:2:0,4:4:4"`` -> both (one is drawn per patch)."""
    names = tuple(part.strip() for part in str(spec).split(",") if part.strip())
    bad = [n for n in names if n not in SUBSAMPLING]
    if not names or bad:
        raise ValueError(f"chroma_subsampling must be one or more of {', '.join(SUBSAMPLING)} separated by ',', "
                         f"got {spec!r}")
    return names


def jpeg_bytes(img: "np.ndarray | Image.Image", quality: int, subsampling: str = "4:2:0") -> bytes:
    """Encode with Pillow at ``quality`` (baseline, no optimisation: what users' cameras/tools do)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    kwargs = {} if img.mode == "L" else {"subsampling": SUBSAMPLING[subsampling]}
    img.save(buf, format="JPEG", quality=int(quality), **kwargs)
    return buf.getvalue()


def jpeg_roundtrip(img: "np.ndarray | Image.Image", quality: int, subsampling: str = "4:2:0") -> np.ndarray:
    """Compress and decompress: returns the degraded image as a uint8 array of the input's shape."""
    return decoded_jpeg(img, quality, subsampling)[0]


def decoded_jpeg(img: "np.ndarray | Image.Image", quality: int, subsampling: str = "4:2:0") -> tuple[np.ndarray, bytes]:
    """(decoded uint8 pixels, the JPEG bytes) of one compression of ``img``."""
    data = jpeg_bytes(img, quality, subsampling)
    with Image.open(io.BytesIO(data)) as out:
        return np.asarray(out), data


@functools.lru_cache(maxsize=None)
def _reference_tables() -> dict[int, np.ndarray]:
    """Luminance quantisation table that Pillow/libjpeg writes at each quality 1..100."""
    tiny = Image.new("L", (8, 8), 128)
    tables = {}
    for q in range(1, 101):
        with Image.open(io.BytesIO(jpeg_bytes(tiny, q))) as im:
            tables[q] = np.asarray(im.quantization[0], dtype=np.int64)
    return tables


def estimate_quality(img: Image.Image) -> Optional[int]:
    """The IJG quality (1..100) whose luminance table is nearest to this JPEG's, or None when
    ``img`` carries no quantisation tables (not a JPEG). Exact for files written by libjpeg
    with standard tables (Pillow, most software); the nearest match for camera tables."""
    tables = getattr(img, "quantization", None)
    if not tables or 0 not in tables:
        return None
    luma = np.asarray(tables[0], dtype=np.int64)
    if luma.size != 64:
        return None
    refs = _reference_tables()
    return min(refs, key=lambda q: (int(np.abs(refs[q] - luma).sum()), -q))


# ----------------------------------------------------------------------------- training degradations

GRID_SHIFT_P = 0.5  # share of the double-compression cases whose second grid is shifted


@dataclasses.dataclass(frozen=True)
class Degradation:
    """How one training patch is compressed. ``quality`` is the last (or only) compression's and the
    label the model sees; ``first_quality`` is set for a double compression, whose second encode
    runs on a grid shifted by ``shift`` = (dy, dx) px against the first."""

    quality: int
    subsampling: str = "4:2:0"
    first_quality: Optional[int] = None
    shift: tuple = (0, 0)


def draw_quality(rng: np.random.Generator, qrange: Sequence[int]) -> int:
    lo, hi = qrange
    return lo if lo == hi else int(rng.integers(lo, hi + 1))


def draw_degradation(rng: np.random.Generator, qrange: Sequence[int], double_p: float = 0.0,
                     subsamplings: Sequence[str] = ("4:2:0",)) -> Degradation:
    """One patch's :class:`Degradation`. With a single quality and no double compression or
    subsampling choice, exactly one draw is made (the quality's, none when it is fixed)."""
    quality = draw_quality(rng, qrange)
    sub = subsamplings[int(rng.integers(len(subsamplings)))] if len(subsamplings) > 1 else subsamplings[0]
    if not double_p or rng.random() >= double_p:
        return Degradation(quality, sub)
    lo, hi = qrange
    first = quality
    if hi > lo:  # another quality of the same range
        first = int(rng.integers(lo, hi))
        first += first >= quality
    shift = (0, 0)
    if rng.random() < GRID_SHIFT_P:
        k = int(rng.integers(1, 64))  # (dy, dx) in 0..7 x 0..7, not both 0
        shift = (k // 8, k % 8)
    return Degradation(quality, sub, first, shift)


def jpeg_shifted(img: np.ndarray, quality: int, subsampling: str, shift: Sequence[int]) -> np.ndarray:
    """JPEG round trip on a grid shifted by ``shift`` = (dy, dx): the image is padded by dy rows
    and dx columns (edge pixels repeated) at its top-left, so its pixel (0, 0) sits at (dy, dx) of
    the encoded image and the block borders fall at y = 8k - dy, x = 8k - dx; the padding is cut
    off again after decoding."""
    dy, dx = int(shift[0]), int(shift[1])
    if not dy and not dx:
        return jpeg_roundtrip(img, quality, subsampling)
    pad = ((dy, 0), (dx, 0)) + (((0, 0),) if img.ndim == 3 else ())
    out = jpeg_roundtrip(np.pad(img, pad, mode="edge"), quality, subsampling)
    return np.ascontiguousarray(out[dy:dy + img.shape[0], dx:dx + img.shape[1]])


def degrade(img: np.ndarray, d: Degradation) -> np.ndarray:
    """Apply :class:`Degradation` ``d`` to a uint8 patch (same shape out)."""
    if d.first_quality is not None:
        img = jpeg_roundtrip(img, d.first_quality, d.subsampling)
        return jpeg_shifted(img, d.quality, d.subsampling, d.shift)
    return jpeg_roundtrip(img, d.quality, d.subsampling)
