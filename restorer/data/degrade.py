"""JPEG degradation: the one place that compresses images, so training, eval and tests agree.

Everything here works on uint8 RGB (or L) numpy arrays and Pillow's libjpeg, the encoder the
published BSDS500/LIVE1 JPEG rows use.

Training degradations (:class:`Degradation`, drawn per patch by :func:`draw_degradation`, applied
by :func:`degrade`): the quality is drawn over a range; with probability ``double_p`` the patch is
compressed twice, first at another quality drawn from the same range, and in half of those cases
the second compression's 8x8 grid is shifted by 0-7 px (not both 0) against the first, as when a
photo was cropped between two saves; the chroma subsampling is drawn from a list. With
``double_jpeg_p`` the model is told the LAST compression's quality, which is what ``restorer
restore`` reads from a file's quantisation tables.

Real-world chains (:class:`ChainParams`, ``chain_p`` > 0): a patch saved 2-3 times as a photo
passed between apps is: each save at its own quality drawn from the range (the first lower or
higher than the last) and its own chroma subsampling; between two saves, possibly one resize
(scale drawn from ``scales``, kernel from ``kernels``: bilinear, bicubic, lanczos, area) and/or
an 8x8 grid shift (a crop of 1-7 rows/columns at the top-left, as when a photo is cropped). The
reference is the clean patch through the same resize and crops. Such a patch is labelled with
the chain's *effective quality* (:func:`effective_quality`): the lowest quality of the chain,
raised to the quality of the last save when the resize made the earlier saves' damage milder; see
its docstring and ``bench/effective_quality.py`` for the measurement behind the rule. A resize
needs more pixels than the patch, so with chains the stream cuts ``source_size`` px and
:func:`apply` returns the ``patch_size`` pair from its top-left corner, on the last save's grid.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def parse_quality(spec: str | int) -> tuple[int, int]:
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


def parse_names(spec: str, allowed, option: str) -> tuple[str, ...]:
    """``"a,b"`` -> ("a", "b"), each one of ``allowed``; ValueError naming ``option`` otherwise."""
    names = tuple(part.strip() for part in str(spec).split(",") if part.strip())
    if not names or any(n not in allowed for n in names):
        raise ValueError(f"{option} must be one or more of {', '.join(allowed)} separated by ',', got {spec!r}")
    return names


def parse_subsampling(spec: str) -> tuple[str, ...]:
    """``"4:2:0"`` -> ("4:2:0",); ``"4:2:0,4:4:4"`` -> both (one is drawn per patch)."""
    return parse_names(spec, SUBSAMPLING, "chroma_subsampling")


def jpeg_bytes(img: np.ndarray | Image.Image, quality: int, subsampling: str = "4:2:0") -> bytes:
    """Encode with Pillow at ``quality`` (baseline, no optimisation: what users' cameras/tools do)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    kwargs = {} if img.mode == "L" else {"subsampling": SUBSAMPLING[subsampling]}
    img.save(buf, format="JPEG", quality=int(quality), **kwargs)
    return buf.getvalue()


def jpeg_roundtrip(img: np.ndarray | Image.Image, quality: int, subsampling: str = "4:2:0") -> np.ndarray:
    """Compress and decompress: returns the degraded image as a uint8 array of the input's shape."""
    return decoded_jpeg(img, quality, subsampling)[0]


def decoded_jpeg(img: np.ndarray | Image.Image, quality: int, subsampling: str = "4:2:0") -> tuple[np.ndarray, bytes]:
    """(decoded uint8 pixels, the JPEG bytes) of one compression of ``img``."""
    data = jpeg_bytes(img, quality, subsampling)
    with Image.open(io.BytesIO(data)) as out:
        return np.asarray(out), data


@functools.cache
def reference_tables() -> dict[int, np.ndarray]:
    """Luminance quantisation table that Pillow/libjpeg writes at each quality 1..100."""
    tiny = Image.new("L", (8, 8), 128)
    tables = {}
    for q in range(1, 101):
        with Image.open(io.BytesIO(jpeg_bytes(tiny, q))) as im:
            tables[q] = np.asarray(im.quantization[0], dtype=np.int64)
    return tables


def estimate_quality(img: Image.Image) -> int | None:
    """The IJG quality (1..100) whose luminance table is nearest to this JPEG's, or None when
    ``img`` carries no quantisation tables (not a JPEG). Exact for files written by libjpeg
    with standard tables (Pillow, most software); the nearest match for camera tables."""
    tables = getattr(img, "quantization", None)
    if not tables or 0 not in tables:
        return None
    luma = np.asarray(tables[0], dtype=np.int64)
    if luma.size != 64:
        return None
    refs = reference_tables()
    return min(refs, key=lambda q: (int(np.abs(refs[q] - luma).sum()), -q))


# ----------------------------------------------------------------------------- training degradations

GRID_SHIFT_P = 0.5  # share of the double-compression cases whose second grid is shifted


@dataclasses.dataclass(frozen=True)
class Degradation:
    """How one training patch is compressed. ``quality`` is the label the model sees: the last (or
    only) compression's, or a chain's effective quality. ``first_quality`` is set for a double
    compression, whose second encode runs on a grid shifted by ``shift`` = (dy, dx) px against the
    first; ``chain`` holds the saves of a real-world chain (then ``subsampling`` is its last
    save's). ``size``: the side of the pair :func:`apply` returns (None: the patch's own)."""

    quality: int
    subsampling: str = "4:2:0"
    first_quality: int | None = None
    shift: tuple = (0, 0)
    chain: tuple = ()
    size: int | None = None
    chain_label: str = "effective"


def draw_quality(rng: np.random.Generator, qrange: Sequence[int]) -> int:
    lo, hi = qrange
    return lo if lo == hi else int(rng.integers(lo, hi + 1))


def draw_degradation(
    rng: np.random.Generator,
    qrange: Sequence[int],
    double_p: float = 0.0,
    subsamplings: Sequence[str] = ("4:2:0",),
    chain: ChainParams | None = None,
) -> Degradation:
    """One patch's :class:`Degradation`. With a single quality and no double compression, chain or
    subsampling choice, exactly one draw is made (the quality's, none when it is fixed); without
    chains (``chain`` None or ``chain.p`` 0) the draws are those of a stream without the option."""
    quality = draw_quality(rng, qrange)
    sub = subsamplings[int(rng.integers(len(subsamplings)))] if len(subsamplings) > 1 else subsamplings[0]
    size = chain.patch_size if chain is not None and chain.p else None
    if not double_p or rng.random() >= double_p:
        if chain is None or size is None or rng.random() >= chain.p:  # chain None: size is None too
            return Degradation(quality, sub, size=size)
        saves = draw_chain(rng, qrange, subsamplings, chain, (quality, sub))
        return Degradation(quality, sub, chain=saves, size=size, chain_label=chain.label)
    lo, hi = qrange
    first = quality
    if hi > lo:  # another quality of the same range
        first = int(rng.integers(lo, hi))
        first += first >= quality
    shift = (0, 0)
    if rng.random() < GRID_SHIFT_P:
        k = int(rng.integers(1, 64))  # (dy, dx) in 0..7 x 0..7, not both 0
        shift = (k // 8, k % 8)
    return Degradation(quality, sub, first, shift, size=size)


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
    return np.ascontiguousarray(out[dy : dy + img.shape[0], dx : dx + img.shape[1]])


def degrade(img: np.ndarray, d: Degradation) -> np.ndarray:
    """Apply the single or double compression of ``d`` to a uint8 patch (same shape out)."""
    if d.first_quality is not None:
        img = jpeg_roundtrip(img, d.first_quality, d.subsampling)
        return jpeg_shifted(img, d.quality, d.subsampling, d.shift)
    return jpeg_roundtrip(img, d.quality, d.subsampling)


def apply(patch: np.ndarray, d: Degradation) -> tuple[np.ndarray, np.ndarray, int]:
    """(degraded, clean, label) of one training patch: the stream's JPEG stage. With ``d.size``
    the pair is the top-left ``size`` x ``size`` of the result (a chain ran on the whole cut
    patch first, so its resize and crops had room); the label is ``d.quality``, or for a chain its
    :func:`effective_quality` (``d.chain_label`` "effective") or :func:`restore_label` ("restore")."""
    n = d.size
    if not d.chain:
        clean = np.ascontiguousarray(patch if n is None else patch[:n, :n])
        return degrade(clean, d), clean, d.quality
    degraded, clean, _ = apply_chain(patch, d.chain)
    if n is not None:
        degraded, clean = np.ascontiguousarray(degraded[:n, :n]), np.ascontiguousarray(clean[:n, :n])
    if d.chain_label == "restore":
        return degraded, clean, restore_label(d.chain)
    return degraded, clean, effective_quality(clean, degraded, d.chain)


# ----------------------------------------------------------------------------- real-world chains

KERNELS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,  # Pillow's box filter: the mean over each output pixel's area
}
MAX_SAVES, MAX_SHIFT = 3, 7
CHAIN_LABELS = ("effective", "restore")  # what a chain's patch is labelled with: apply()


def parse_scales(spec: str | Sequence[float]) -> tuple[float, float]:
    """``"0.5-1.0"`` -> (0.5, 1.0); a single number is a fixed scale. Scales lie in (0, 1]."""
    if isinstance(spec, (list, tuple)):
        lo, hi = (float(spec[0]), float(spec[-1]))
    else:
        text = str(spec).strip()
        try:
            lo_t, sep, hi_t = text.partition("-")
            lo, hi = float(lo_t), float(hi_t if sep else lo_t)
        except ValueError:
            raise ValueError(f"chain_scales must be a scale or a range like 0.5-1.0, got {spec!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"chain_scales must lie in (0, 1] with low <= high, got {spec!r}")
    return lo, hi


def parse_kernels(spec: str) -> tuple[str, ...]:
    """``"bicubic,area"`` -> ("bicubic", "area"): the resize kernels a chain draws from."""
    return parse_names(spec, KERNELS, "chain_kernels")


@dataclasses.dataclass(frozen=True)
class Save:
    """One save of a chain, and what happened to the image since the save before it: resized by
    ``scale`` with ``kernel`` (1.0: not resized), then cropped by ``shift`` = (dy, dx) rows and
    columns at the top-left, which shifts this save's 8x8 grid against the previous one's. The
    first save of a chain has neither."""

    quality: int
    subsampling: str = "4:2:0"
    scale: float = 1.0
    kernel: str = "bicubic"
    shift: tuple = (0, 0)


@dataclasses.dataclass(frozen=True)
class ChainParams:
    """How the stream draws real-world chains (the StreamConfig ``chain_*`` options)."""

    p: float = 0.0  # share of patches that go through a chain
    three_p: float = 0.3  # share of chains with three saves (else two)
    resize_p: float = 0.5  # share of chains resized once between two saves
    scales: tuple = (0.5, 1.0)  # the resize's scale, drawn uniformly
    kernels: tuple = tuple(KERNELS)
    shift_p: float = 0.5  # per gap between two saves: share shifting the grid by a crop
    patch_size: int = 128  # side of the (degraded, clean) pair the stream wants
    label: str = "effective"  # one of CHAIN_LABELS

    def source_size(self) -> int:
        """Side of the clean patch to cut so that any chain still leaves ``patch_size`` px: up to
        two crops of 7 px and one resize by the smallest scale."""
        if not self.p:
            return self.patch_size
        gaps = MAX_SAVES - 1
        s = self.scales[0] if self.resize_p else 1.0
        return int(np.ceil((self.patch_size + gaps * MAX_SHIFT) / s)) + MAX_SHIFT + 1


def draw_chain(
    rng: np.random.Generator,
    qrange: Sequence[int],
    subsamplings: Sequence[str],
    params: ChainParams,
    last: tuple[int, str],
) -> tuple[Save, ...]:
    """The saves of one chain; ``last`` = (quality, subsampling) of its last save (already drawn)."""
    k = 3 if rng.random() < params.three_p else 2
    saves = []
    resize_gap = int(rng.integers(1, k)) if rng.random() < params.resize_p else 0
    for i in range(k):
        if i == k - 1:
            quality, sub = last
        else:
            quality = draw_quality(rng, qrange)
            sub = subsamplings[int(rng.integers(len(subsamplings)))] if len(subsamplings) > 1 else subsamplings[0]
        scale, kernel, shift = 1.0, "bicubic", (0, 0)
        if i and i == resize_gap:
            scale = round(float(rng.uniform(params.scales[0], params.scales[1])), 3)
            kernel = params.kernels[int(rng.integers(len(params.kernels)))]
        if i and rng.random() < params.shift_p:
            j = int(rng.integers(1, 64))  # (dy, dx) in 0..7 x 0..7, not both 0
            shift = (j // 8, j % 8)
        saves.append(Save(int(quality), sub, scale, kernel, shift))
    return tuple(saves)


def _resize(img: np.ndarray, scale: float, kernel: str) -> np.ndarray:
    h, w = img.shape[:2]
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, KERNELS[kernel]))


def apply_chain(img: np.ndarray, saves: Sequence[Save]) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Run ``img`` through the saves of a chain: (the last save's decoded pixels, the clean image
    through the same resizes and crops (the reference), the last save's JPEG bytes). Works on
    whole photos (bench/realworld.py) as on training patches."""
    degraded, clean, data = img, img, b""
    for i, s in enumerate(saves):
        if i and s.scale != 1.0:
            degraded, clean = _resize(degraded, s.scale, s.kernel), _resize(clean, s.scale, s.kernel)
        dy, dx = (int(v) for v in s.shift) if i else (0, 0)
        if dy or dx:
            degraded, clean = degraded[dy:, dx:], clean[dy:, dx:]
        degraded, data = decoded_jpeg(np.ascontiguousarray(degraded), s.quality, s.subsampling)
    return degraded, np.ascontiguousarray(clean), data


def parse_chain(spec: str) -> tuple[Save, ...]:
    """``"30>s4>80"`` -> the saves of a chain: numbers are saves at that quality; between two saves,
    ``sN`` crops N px at the top and left (``sDY,DX`` for different amounts) and ``xS`` or
    ``xS:KERNEL`` resizes by S (bicubic unless named). A ``:SUB`` after a quality sets its chroma
    subsampling (``90:4:4:4``; default 4:2:0). ``"50"`` is a single save."""
    saves: list[Save] = []
    scale, kernel, shift = 1.0, "bicubic", (0, 0)
    try:
        for token in (t.strip() for t in str(spec).split(">")):
            if token.startswith("s"):
                parts = [int(v) for v in token[1:].split(",")]
                shift = (parts[0], parts[-1])
                if not all(0 <= v <= MAX_SHIFT for v in shift):
                    raise ValueError
            elif token.startswith("x"):
                value, _, name = token[1:].partition(":")
                scale, kernel = float(value), name or "bicubic"
                if kernel not in KERNELS or not 0.0 < scale <= 1.0:
                    raise ValueError
            else:
                q, _, sub = token.partition(":")
                if (
                    not 1 <= int(q) <= 100
                    or (sub and sub not in SUBSAMPLING)
                    or not saves
                    and (scale, shift) != (1.0, (0, 0))
                ):
                    raise ValueError
                saves.append(Save(int(q), sub or "4:2:0", scale, kernel, shift))
                scale, kernel, shift = 1.0, "bicubic", (0, 0)
    except ValueError:
        saves = []
    if not saves or scale != 1.0 or shift != (0, 0):
        raise ValueError(f"not a chain: {spec!r} (e.g. 30>80, 30>s4>80, 40>x0.75>85, 40>x0.5:area>85)")
    return tuple(saves)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * np.log10(255.0**2 / max(mse, 1e-10))


def effective_quality(clean: np.ndarray, degraded: np.ndarray, saves: Sequence[Save]) -> int:
    """The quality a chain's output is labelled with: the single-save quality (Pillow, the last
    save's subsampling, on ``clean``'s grid) whose PSNR against ``clean`` is closest to the
    chain's, searched over 1 .. the last save's quality (a chain is not better than its last save).
    A single save is labelled with its own quality. Measured against the alternatives (the lowest
    quality; the last) in ``bench/effective_quality.py``."""
    last = saves[-1]
    if len(saves) == 1:
        return int(last.quality)
    target = _psnr(degraded, clean)
    lo, hi = 1, int(last.quality)
    while lo < hi:  # PSNR rises with the quality: the first q whose PSNR reaches the chain's
        mid = (lo + hi) // 2
        if _psnr(jpeg_roundtrip(clean, mid, last.subsampling), clean) >= target:
            hi = mid
        else:
            lo = mid + 1
    return int(lo)


def restore_label(saves: Sequence[Save]) -> int:
    """The quality ``restorer restore --quality auto`` tells the model for a chain, from the
    chain's facts: the strongest earlier save whose quantisation lattice survives to the last save
    (no resize after it) and stronger than the last save by :func:`restorer.infer.resave.is_stronger`
    (what that module can find), else the last save's quality (read from the file's tables).
    Training on this label teaches the model what the quality it is told means at restore time,
    where a resize has hidden the earlier saves."""
    from restorer.infer.resave import is_stronger  # resave imports this module

    last = int(saves[-1].quality)
    found = [
        int(s.quality)
        for i, s in enumerate(saves[:-1])
        if all(t.scale == 1.0 for t in saves[i + 1 :]) and is_stronger(int(s.quality), last)
    ]
    return min(found) if found else last
