"""Never worse than the JPEG: project a restored image back onto what the JPEG file says.

A baseline JPEG stores, for every 8x8 block of every component (Y, Cb, Cr at their stored
resolution), the integers ``k = round(DCT(block) / Q)``. So the block the encoder saw had its
coefficients in the box ``[(k - 1/2) Q, (k + 1/2) Q]``. The set of images whose blocks lie in those
boxes is convex and contains the original (up to the encoder's integer rounding), so the
orthogonal projection onto it never moves a restored image away from the original; at high
qualities the boxes are narrow, and the projection keeps the output near the JPEG.

What ``project`` does, per component (coefficients read exactly, with ``jpeglib``):

1. RGB -> YCbCr with the JFIF full-range matrix (libjpeg's, without its integer rounding).
2. Chroma at its stored resolution: the full-resolution plane, edge-padded to the block grid, is
   box-averaged by the sampling factor (2x2 for 4:2:0, 2x1 for 4:2:2), as libjpeg's encoder does.
3. Per 8x8 block (after the level shift of -128): orthonormal DCT (= the JPEG DCT), clamp each
   coefficient into its box, inverse DCT of the *change* only.
4. The change is spread back to full resolution by replication (the adjoint of the box average
   divided by its gain), and added to the restored image: the output keeps its own detail
   wherever it was already consistent with the file. Then YCbCr changes -> RGB changes, clip to
   [0, 255], round.

Guarantees (tested): for a plane whose size is a multiple of the block grid (8 px, or 16 px for
4:2:0 chroma), step 3-4 is the exact orthogonal projection in that plane's float pixel space, so
``||P(x) - o|| <= ||x - o||`` for every ``o`` in the set; clipping to [0, 255] is a projection
too, so it keeps that. What is approximate: (a) the RGB distance (YCbCr is not an orthonormal
transform of RGB, and the projections are per YCbCr plane); (b) blocks cut by the image border,
which are projected with their padding fixed to edge replication, as the encoder padded, not
optimised; (c) the final rounding to uint8 (at most half a level per channel); (d) libjpeg's own
integer rounding in its colour conversion, downsampling and DCT, which can put the true original
slightly outside the boxes (within about one level).

Orientation: ``project`` works in the file's *stored* orientation (pixels as decoded, before any
EXIF rotation). The restore pipeline works on EXIF-upright pixels (``restorer.imageio``); for
those use ``project_upright``, which undoes the file's orientation, projects, and redoes it, so
``project_upright(exif_transpose(x)) == exif_transpose(project(x))`` exactly.

Grayscale JPEGs carry no colour: a colour output is projected onto gray (its Y, projected, in all
three channels); a [H, W] output stays [H, W].
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from restorer.errors import UserError, first_line
from restorer.imagecore import ORIENTATION_TAG

JpegSource = str | os.PathLike | bytes

# Luma block rows of a strip: bounds memory. 16 measured fastest on a 6 MP and a 24 MP photo (2026-11-30,
# 2 cores: 64 and 32 slower, 8 and 4 no faster); the bytes do not depend on it.
ROWS_PER_STRIP = 16

# JFIF full-range YCbCr (ITU-R BT.601 coefficients, as libjpeg's jccolor.c / jdcolor.c)
RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168735892, -0.331264108, 0.5], [0.5, -0.418687589, -0.081312411]])
YCC_TO_RGB = np.linalg.inv(RGB_TO_YCC)


def _dct_matrix() -> np.ndarray:
    """The orthonormal 8-point DCT-II matrix; the JPEG 2-D DCT of block B is ``C @ B @ C.T``."""
    n = np.arange(8)
    c = np.cos((2 * n[None, :] + 1) * n[:, None] * np.pi / 16) * np.sqrt(2 / 8)
    c[0] /= np.sqrt(2)
    return c


DCT = _dct_matrix()


@dataclasses.dataclass(frozen=True)
class Component:
    """One stored component: quantised coefficients [rows, cols, 8, 8] (frequency v, u in natural
    order), its quantisation table [8, 8], and how many full-resolution pixels one of its pixels
    covers, (vertical, horizontal): (2, 2) for 4:2:0 chroma, (1, 1) for luma."""

    coef: np.ndarray
    qtable: np.ndarray
    factor: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class JpegCoefficients:
    """What a JPEG file says about its image, read exactly (no decoding of pixels)."""

    name: str  # the file, for messages
    height: int  # stored orientation
    width: int
    components: tuple[Component, ...]  # Y only (grayscale) or Y, Cb, Cr
    orientation: int  # EXIF orientation 1..8 (1 when absent)
    progressive: bool

    @property
    def is_gray(self) -> bool:
        return len(self.components) == 1


# -- reading ----------------------------------------------------------------------------------------
def read_coefficients(src: JpegSource, decoded: tuple[str, int] | None = None) -> JpegCoefficients:
    """Read the quantised DCT coefficients and tables of a JPEG (a path or the file's bytes).

    The file is first decoded once by Pillow, so that truncated or corrupt files fail here with one
    :class:`UserError` naming the file (libjpeg under ``jpeglib`` only warns about them). Baseline,
    progressive, restart markers, any integer sampling factors, 1- and 3-component YCbCr files are
    read; CMYK/YCCK/RGB-coded JPEGs are refused with a UserError.

    ``decoded`` = (name, EXIF orientation) says that the caller has already decoded these very
    bytes with Pillow (``restorer.imageio.open_image`` keeps them as ``LoadedImage.data``): that
    check is not repeated (it cost a third of this function on a 24 MP photo).
    """
    if isinstance(src, bytes):
        data, name = src, "<bytes>"
    else:
        path, name = Path(os.fsdecode(src)), str(src)
        if not path.is_file():
            raise UserError(f"{name}: no such file" if not path.exists() else f"{name}: not a file")
        data = path.read_bytes()
    if decoded is not None and data is src:
        name, orientation = decoded
    else:
        orientation = _check_with_pillow(data, name)
    import jpeglib  # here: 0.35 s to import (measured), needed only once a JPEG is projected

    # jpeglib reads paths only: give it a private temporary copy (the user's file is never touched)
    fd, tmp = tempfile.mkstemp(suffix=".jpg", prefix="restorer-proj-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            j = jpeglib.read_dct(tmp)
            planes = [j.Y] + ([j.Cb, j.Cr] if j.has_chrominance else [])
            space = str(j.jpeg_color_space)
            samp = np.asarray(j.samp_factor, dtype=np.int64).reshape(-1, 2)  # (v, h) per component
            tables = [np.asarray(j.qt[int(t)], dtype=np.float64) for t in j.quant_tbl_no]
            height, width, progressive, ncomp = (
                int(j.height),
                int(j.width),
                bool(j.progressive_mode),
                int(j.num_components),
            )
        except Exception as exc:
            raise UserError(f"{name}: unreadable JPEG coefficients ({first_line(exc)})") from None
    finally:
        os.unlink(tmp)
    if "YCbCr" not in space and "GRAYSCALE" not in space or ncomp not in (1, 3):
        raise UserError(
            f"{name}: JPEG colour space {space.replace('JCS_', '')} with {ncomp} components "
            "is not supported (only grayscale and YCbCr)"
        )
    vmax, hmax = samp[:, 0].max(), samp[:, 1].max()
    comps = []
    for coef, (v, h), q in zip(planes, samp, tables, strict=False):
        if vmax % v or hmax % h:
            raise UserError(f"{name}: sampling factors {samp.tolist()} are not integer ratios")
        comps.append(Component(np.asarray(coef), q, (int(vmax // v), int(hmax // h))))
    if np.any(tables[0] <= 0):
        raise UserError(f"{name}: quantisation table holds zeros")
    return JpegCoefficients(name, height, width, tuple(comps), orientation, progressive)


def _check_with_pillow(data: bytes, name: str) -> int:
    """Decode with Pillow (raising one UserError for anything unreadable); return the EXIF orientation."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("JPEG", "MPO"):
                raise UserError(f"{name}: not a JPEG ({img.format})")
            img.load()  # truncation and corrupt entropy-coded data surface here
            return int(img.getexif().get(ORIENTATION_TAG, 1) or 1)
    except UserError:
        raise
    except Image.UnidentifiedImageError:
        raise UserError(f"{name}: not an image Pillow can read") from None
    except Exception as exc:  # truncated (OSError), corrupt headers (SyntaxError, ValueError, ...)
        raise UserError(f"{name}: unreadable JPEG ({type(exc).__name__}: {first_line(exc)})") from None


# -- the projection, strip by strip -----------------------------------------------------------------------
# vec(C @ B @ C.T) == KRON_DCT @ vec(B) for an 8x8 block B flattened row by row: the 2-D DCT of
# every block as one [blocks, 64] x [64, 64] matrix product (a few dense products instead of the
# many skinny 8-wide ones of the separable form; 4x the multiply-adds, faster on CPUs and GPUs).
KRON_DCT = np.kron(DCT, DCT)


class _Tables:
    """The constant matrices on one device, in one dtype (made once per projection)."""

    def __init__(self, dtype, device) -> None:
        def t(a: np.ndarray):
            return torch.as_tensor(a, dtype=dtype, device=device)

        self.dtype, self.device = dtype, device
        self.kron, self.to_ycc, self.to_rgb = t(KRON_DCT), t(RGB_TO_YCC), t(YCC_TO_RGB)
        self.offset = t(np.array([0.0, 128.0, 128.0]).reshape(3, 1))

    def component(self, comp: Component, r0: int, r1: int):
        """(k Q, Q / 2) of block rows [r0, r1): [blocks, 64], [64], natural order."""
        q = torch.as_tensor(comp.qtable.reshape(64), dtype=self.dtype, device=self.device)
        k = torch.as_tensor(np.ascontiguousarray(comp.coef[r0:r1]).reshape(-1, 64), device=self.device)
        return k.to(self.dtype).mul_(q), q * 0.5


def _change(plane, comp: Component, r0: int, r1: int, tables: _Tables, out=None):
    """The change that projects ``plane`` onto the quantisation set of ``comp``'s block rows
    [r0, r1). ``plane``: a torch tensor of full-resolution rows from the top of block row r0
    (fewer than the blocks cover only at the image's bottom), all columns, float levels 0..255
    (not level-shifted). Returns the change, same shape, dtype and device (written into ``out``
    when given).

    The plane is edge-padded to the block grid (as the encoder padded), box-averaged by
    ``comp.factor`` (libjpeg's h2v1/h2v2 downsampling, without its integer rounding), each block's
    DCT clamped into ``[(k - 1/2) Q, (k + 1/2) Q]``; the inverse DCT of the change is replicated
    back to full resolution (the exact projection's spreading for a box average) and cropped.
    """
    h, w = plane.shape
    rows, cols = r1 - r0, comp.coef.shape[1]
    fv, fh = comp.factor
    ph, pw = rows * 8 * fv, cols * 8 * fh
    if ph < h or pw < w:
        raise ValueError(f"component grid {rows}x{cols} blocks x{comp.factor} does not cover {h}x{w}")
    if (ph, pw) != (h, w):
        plane = torch.nn.functional.pad(plane[None, None], (0, pw - w, 0, ph - h), mode="replicate")[0, 0]
    if fv > 1 or fh > 1:  # a sum of strided views, in a fixed order (no reduction kernel)
        parts = plane.view(ph // fv, fv, pw // fh, fh)
        acc = parts[:, 0, :, 0].clone()
        for i, j in [(i, j) for i in range(fv) for j in range(fh)][1:]:
            acc += parts[:, i, :, j]
        plane = acc.mul_(1.0 / (fv * fh))
    blocks = plane.view(rows, 8, cols, 8).transpose(1, 2).reshape(-1, 64)
    kq, half = tables.component(comp, r0, r1)
    kq[:, 0] += 1024.0  # the level shift: DCT(block - 128) = DCT(block) - 1024 at DC, 0 elsewhere
    # clamp(coef, kQ - Q/2, kQ + Q/2) - coef == d - clamp(d, -Q/2, Q/2) with d = kQ - coef
    d = kq.sub_(blocks @ tables.kron.T)
    change = d - torch.clamp(d, -half, half)
    delta = (change @ tables.kron).view(rows, cols, 8, 8).transpose(1, 2).reshape(rows * 8, cols * 8)
    if out is None:
        if fv > 1 or fh > 1:
            delta = delta[:, None, :, None].expand(rows * 8, fv, cols * 8, fh).reshape(ph, pw)
        return delta[:h, :w]
    for i in range(fv):  # replicated straight into ``out``: no full-resolution temporary
        for j in range(fh):
            out[i::fv, j::fh] = delta[: len(range(i, h, fv)), : len(range(j, w, fh))]
    return out


def _strip_correction(strip: np.ndarray, comp: Component, r0: int, r1: int) -> np.ndarray:
    """:func:`_change` for a numpy plane (same dtype back), on the CPU."""
    tables = _Tables(torch.from_numpy(strip[:0]).dtype, "cpu")
    return _change(torch.from_numpy(np.ascontiguousarray(strip)), comp, r0, r1, tables).numpy()


def _strips(coefs: JpegCoefficients):
    """Yield (y0, y1, [(r0, r1) per component]): MCU-aligned strips of full-resolution rows and the
    block rows of each component that cover them (ROWS_PER_STRIP luma block rows at a time)."""
    mcu = math.lcm(*(8 * c.factor[0] for c in coefs.components))  # full-resolution rows per MCU row
    step = max(1, ROWS_PER_STRIP * 8 // mcu) * mcu
    for y0 in range(0, coefs.height, step):
        y1 = min(coefs.height, y0 + step)
        spans = []
        for c in coefs.components:
            per_row = 8 * c.factor[0]  # full-resolution rows per block row of this component
            spans.append((y0 // per_row, min(c.coef.shape[0], -(-y1 // per_row))))
        yield y0, y1, spans


def project_planes(planes: list[np.ndarray], coefs: JpegCoefficients, dtype=np.float64) -> list[np.ndarray]:
    """Project float YCbCr planes (levels 0..255, stored orientation, one per component) onto the
    file's quantisation set, with no clipping or rounding: the exact orthogonal projection per
    plane where the plane fills whole blocks (see the module docstring)."""
    if len(planes) != len(coefs.components):
        raise ValueError(f"{coefs.name}: {len(planes)} planes for {len(coefs.components)} components")
    out = [np.array(p, dtype=dtype) for p in planes]
    with _one_thread(torch.device("cpu")):
        for y0, y1, spans in _strips(coefs):
            for o, p, c, (r0, r1) in zip(out, planes, coefs.components, spans, strict=True):
                o[y0:y1] += _strip_correction(np.asarray(p[y0:y1], dtype), c, r0, r1)
    return out


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """On a CPU, torch on one thread while projecting, restored afterwards. The products are
    small (a few MB per strip): on a shared 2-core machine a 2-thread pool made a 0.15 MP
    projection 10x slower (0.95 s vs 0.09 s) waiting at its barriers, and a 24 MP one 2.7x slower
    in CPU time (5.5 s vs 2.0 s) under load. Yields the thread count it replaced on a CPU (1 on
    other devices): :meth:`Projector.each_strip` shares the strips among that many Python threads,
    each running torch on one thread. Must run on the thread that runs the network: it sets that
    thread's pool (and the count new threads start with), restored on the way out."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield before if device.type == "cpu" else 1
    finally:
        torch.set_num_threads(before)


class Projector:
    """The projection of one JPEG, strip by strip, on ``device`` (float32): what :func:`project`
    runs over the whole image, and what a caller that has the restored rows in pieces runs per
    strip (:attr:`strips`: MCU-aligned (y0, y1, spans) in the stored orientation). Each strip is
    independent of the others, so any order gives the same bytes."""

    def __init__(self, coefs: JpegCoefficients, device="cpu") -> None:
        self.coefs = coefs
        self.tables = _Tables(torch.float32, torch.device(device))
        self.strips = list(_strips(coefs))

    def levels(self, x: np.ndarray, y0: int, y1: int, spans: list[tuple[int, int]]) -> torch.Tensor:
        """Rows [y0, y1) of ``x`` (stored orientation; uint8 or float32 levels, [h, W, 3] or
        [h, W]) projected: float32 levels, planar ([3, h, W] or [1, h, W]), clipped to [0, 255]."""
        t, coefs = self.tables, self.coefs
        part = x[y0:y1]
        if not (part.flags.writeable and part.flags.c_contiguous):  # torch.from_numpy wants both
            part = np.array(part)
        rows = torch.from_numpy(part)
        xs = torch.empty((rows.shape[2] if rows.ndim == 3 else 1,) + tuple(rows.shape[:2]), device=t.device)
        xs.copy_(rows.permute(2, 0, 1) if rows.ndim == 3 else rows[None])
        if xs.shape[0] == 1:
            xs[0] += _change(xs[0], coefs.components[0], *spans[0], t)
            return xs.clamp_(0, 255)
        flat = xs.view(3, -1)
        if coefs.is_gray:  # the file holds no colour: the projection onto it is gray
            luma = (t.to_ycc[:1] @ flat).view(1, *xs.shape[1:])
            luma[0] += _change(luma[0], coefs.components[0], *spans[0], t)
            return luma.expand(3, -1, -1).clamp(0, 255)
        ycc = torch.addmm(t.offset, t.to_ycc, flat).view(xs.shape)
        change = torch.empty_like(ycc)
        for i, (comp, span) in enumerate(zip(coefs.components, spans, strict=True)):
            _change(ycc[i], comp, *span, t, out=change[i])
        flat.addmm_(t.to_rgb, change.view(3, -1))
        return xs.clamp_(0, 255)

    def project(self, x: np.ndarray) -> np.ndarray:
        """The whole image (stored orientation, as :meth:`levels` takes it) -> uint8, strip by strip."""
        out = np.empty(x.shape, dtype=np.uint8)

        def strip(y0: int, y1: int, spans) -> None:
            out[y0:y1] = self.rows_uint8(x, y0, y1, spans)

        self.each_strip(strip)
        return out

    def each_strip(self, fn) -> None:
        """``fn(y0, y1, spans)`` for every strip. On a CPU, torch runs on one thread per strip
        (see :func:`_one_thread`), and the strips are shared among as many Python threads as torch
        had (``torch.get_num_threads()``: ``--threads``, or 1 per rank under torchrun): each strip
        is computed alone on one thread whatever the count, so the bytes do not depend on it."""
        with _one_thread(self.tables.device) as workers:
            if workers <= 1 or len(self.strips) < 2:
                for y0, y1, spans in self.strips:
                    fn(y0, y1, spans)
                return

            def job(strip) -> None:
                torch.set_num_threads(1)  # this thread's pool (and MKL's), within _one_thread's block
                fn(*strip)

            with ThreadPoolExecutor(min(workers, len(self.strips)), thread_name_prefix="projection") as pool:
                for done in [pool.submit(job, s) for s in self.strips]:
                    done.result()

    def rows_uint8(self, x: np.ndarray, y0: int, y1: int, spans) -> np.ndarray:
        """:meth:`levels` rounded to uint8, in ``x``'s layout ([h, W, 3] or [h, W])."""
        lv = self.levels(x, y0, y1, spans).round_().to(torch.uint8)
        out = lv.permute(1, 2, 0) if x.ndim == 3 else lv[0]
        return out.cpu().numpy()


# -- the public entry points ------------------------------------------------------------------------
def _as_levels(restored) -> np.ndarray:
    """uint8 stays uint8 (levels); float (the project's [0, 1] convention) -> float32 levels."""
    if hasattr(restored, "detach"):  # a torch tensor, [H, W, C] on any device
        restored = restored.detach().cpu().numpy()
    x = np.asarray(restored)
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected uint8 or float pixels, got {x.dtype}")
    if x.size and (np.nanmin(x) < -0.5 or np.nanmax(x) > 1.5):
        raise ValueError(
            "float pixels must be in [0, 1] (the project's convention); "
            f"got values in [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]"
        )
    return x.astype(np.float32) * np.float32(255)


def _checked_levels(restored, coefs: JpegCoefficients) -> np.ndarray:
    x = _as_levels(restored)
    if x.shape[:2] != (coefs.height, coefs.width) or not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 3)):
        raise ValueError(
            f"{coefs.name}: restored image has shape {x.shape}, the JPEG stores "
            f"{coefs.height}x{coefs.width} (stored orientation; for EXIF-upright pixels "
            "use project_upright)"
        )
    if x.ndim == 2 and not coefs.is_gray:
        raise ValueError(f"{coefs.name}: a colour JPEG needs an [H, W, 3] restored image, got [H, W]")
    return x


def project_float(restored, jpeg: JpegSource | JpegCoefficients) -> np.ndarray:
    """Like :func:`project` but returns float32 levels (0..255, clipped, not rounded).

    Works in float32 strip by strip (MCU rows), so only the output is the size of the photo."""
    coefs = jpeg if isinstance(jpeg, JpegCoefficients) else read_coefficients(jpeg)
    x = _checked_levels(restored, coefs)
    proj = Projector(coefs)
    out = np.empty(x.shape, dtype=np.float32)

    def strip(y0: int, y1: int, spans) -> None:
        lv = proj.levels(x, y0, y1, spans)
        out[y0:y1] = (lv.permute(1, 2, 0) if x.ndim == 3 else lv[0]).numpy()

    proj.each_strip(strip)
    return out


def project(restored, jpeg: JpegSource | JpegCoefficients, device="cpu") -> np.ndarray:
    """Project a restored image onto the set of images the JPEG file is consistent with.

    ``restored``: [H, W, 3] RGB (or [H, W] for a grayscale JPEG), uint8 levels or float in [0, 1],
    in the file's STORED orientation (as decoded, before EXIF rotation). ``jpeg``: its path, its
    bytes, or :func:`read_coefficients` of it. Returns uint8 of the same shape: ``project_float``
    rounded, computed strip by strip on ``device`` (a torch device; numpy in and out).
    Projecting the JPEG's own decoded pixels changes them by at most a level or two (a near no-op).
    """
    coefs = jpeg if isinstance(jpeg, JpegCoefficients) else read_coefficients(jpeg)
    x = _checked_levels(restored, coefs)
    return Projector(coefs, device).project(x)


# -- EXIF orientation -----------------------------------------------------------------------------------
def to_upright(a: np.ndarray, orientation: int) -> np.ndarray:
    """Stored -> upright pixels for EXIF ``orientation`` (what PIL.ImageOps.exif_transpose does)."""
    ops = {
        1: lambda t: t,
        2: lambda t: t[:, ::-1],
        3: lambda t: t[::-1, ::-1],
        4: lambda t: t[::-1],
        5: lambda t: t.swapaxes(0, 1),
        6: lambda t: np.rot90(t, -1),
        7: lambda t: np.rot90(t, 2).swapaxes(0, 1),
        8: lambda t: np.rot90(t, 1),
    }
    return np.ascontiguousarray(ops.get(orientation, ops[1])(a))


def to_stored(a: np.ndarray, orientation: int) -> np.ndarray:
    """Upright -> stored pixels: the inverse of :func:`to_upright`."""
    inverse = {6: 8, 8: 6}.get(orientation, orientation)  # 2, 3, 4, 5, 7 are their own inverses
    return to_upright(a, inverse)


def project_upright(restored_upright, jpeg: JpegSource | JpegCoefficients, device="cpu") -> np.ndarray:
    """:func:`project` for pixels in EXIF-upright orientation (what ``restorer.imageio.open_image``
    gives and the restore pipeline writes): undo the orientation, project, redo it."""
    coefs = jpeg if isinstance(jpeg, JpegCoefficients) else read_coefficients(jpeg)
    x = restored_upright.detach().cpu().numpy() if hasattr(restored_upright, "detach") else np.asarray(restored_upright)
    return to_upright(project(to_stored(x, coefs.orientation), coefs, device), coefs.orientation)
