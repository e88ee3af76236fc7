"""JPEG degradation: the one place that compresses images, so training, eval and tests agree.

Everything here works on uint8 RGB (or L) numpy arrays and Pillow's libjpeg, the encoder the
published BSDS500/LIVE1 JPEG rows use.
"""
from __future__ import annotations

import functools
import io
from typing import Optional

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
