"""Safe image reading and atomic writing, shared by ``restorer restore / eval / compare``.

:func:`open_image` turns any file into a :class:`LoadedImage` or raises a one-line
:class:`~restorer.errors.UserError` naming the file: unreadable, truncated, not an image, or
declaring more pixels than ``max_pixels`` (checked from the header, *before* decoding, so a
decompression bomb never allocates its pixels). It also

* applies the EXIF orientation (pixels come back upright; the EXIF kept for the output has its
  Orientation reset to 1),
* keeps the ICC profile and EXIF bytes so the output can carry them,
* splits off an alpha channel (restoration never touches it),
* reports the JPEG quality estimated from the quantisation tables (``degrade.estimate_quality``).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from restorer import imagecore
from restorer.data.degrade import estimate_quality
from restorer.errors import UserError, first_line
from restorer.fsutil import atomic_write
from restorer.imagecore import IMAGE_SUFFIXES, ORIENTATION_TAG  # noqa: F401  (IMAGE_SUFFIXES re-exported: one list for the project)
from restorer.pngio import write_png

# 200 megapixels: a 24 MP photo is far below, a 50000x50000 "bomb" far above. --max-pixels changes it.
DEFAULT_MAX_PIXELS = 200_000_000


@dataclasses.dataclass
class LoadedImage:
    path: Path
    pixels: np.ndarray  # uint8 [H, W] (gray) or [H, W, 3] (RGB), upright
    alpha: np.ndarray | None  # uint8 [H, W] or None
    format: str  # Pillow's format name: "JPEG", "PNG", ...
    quality: int | None  # estimated JPEG quality, None when not a JPEG
    icc_profile: bytes | None
    exif: bytes | None  # with Orientation reset to 1
    orientation: int  # the Orientation the file carried (1 = none)
    notes: list[str]  # lossy conversions made while reading (e.g. 16-bit -> 8-bit)
    data: bytes | None = None  # a JPEG's bytes, exactly those decoded (for its DCT coefficients)

    @property
    def is_gray(self) -> bool:
        return self.pixels.ndim == 2

    @property
    def is_jpeg(self) -> bool:
        return self.format in ("JPEG", "MPO")

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]


def open_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read ``path`` safely (see module docstring). Raises :class:`UserError` with one line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not an image")
    try:
        # the project's one decompression-bomb rule, from the header (restorer.imagecore)
        with open(path, "rb") as fh, imagecore.open_declared(fh, max_pixels) as img:
            fmt = img.format or "unknown"
            quality = estimate_quality(img) if fmt in ("JPEG", "MPO") else None
            img.load()  # decode now: truncation and corrupt data surface here
            icc = img.info.get("icc_profile") or None
            exif = img.getexif()
            orientation = int(exif.get(ORIENTATION_TAG, 1) or 1)
            upright = ImageOps.exif_transpose(img) if orientation != 1 else img
            pixels, alpha, notes = _to_arrays(upright)
            if orientation != 1:
                exif[ORIENTATION_TAG] = 1
            exif_bytes = exif.tobytes() if len(exif) else None
            if img.mode == "CMYK" and icc:
                notes.append("CMYK converted to RGB; its ICC profile (for CMYK) was dropped")
                icc = None
            data = _reread(fh) if fmt in ("JPEG", "MPO") else None
    except UserError:
        raise
    except imagecore.DeclaredSizeError as exc:
        raise UserError(f"{path}: {exc}") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"{path}: not an image Pillow can read") from None
    except MemoryError:
        raise UserError(f"{path}: not enough memory to decode this image") from None
    except Exception as exc:  # truncated (OSError), corrupt headers (SyntaxError, ValueError, ...)
        raise UserError(f"{path}: unreadable image ({type(exc).__name__}: {first_line(exc)})") from None
    return LoadedImage(path, pixels, alpha, fmt, quality, icc, exif_bytes, orientation, notes, data)


def _reread(fh) -> bytes:
    """The whole file from the handle Pillow decoded (the same file, even if renamed meanwhile)."""
    fh.seek(0)
    return fh.read()


def _to_arrays(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Pixels as uint8 L or RGB, alpha split off; other modes converted (with a note)."""
    notes: list[str] = []
    mode = img.mode
    alpha = None
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La"):
        img = img.convert("LA") if mode == "La" else img
        alpha = np.asarray(img.getchannel("A")).copy()
        return np.asarray(img.getchannel("L")).copy(), alpha, notes
    if mode in ("RGBA", "RGBa"):
        img = img.convert("RGBA") if mode == "RGBa" else img
        alpha = np.asarray(img.getchannel("A")).copy()
        return np.asarray(img.convert("RGB")), alpha, notes
    if mode == "L":
        return np.asarray(img).copy(), None, notes
    if mode == "1":
        return np.asarray(img.convert("L")).copy(), None, notes
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64) if mode != "I" else np.asarray(img).astype(np.float64)
        scale = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        notes.append(f"{mode} pixels reduced to 8 bits")
        return np.clip(np.round(arr / scale * 255.0), 0, 255).astype(np.uint8), None, notes
    if mode == "RGB":
        return np.asarray(img).copy(), None, notes
    notes.append(f"{mode} converted to RGB")
    return np.asarray(img.convert("RGB")).copy(), None, notes


def find_images(inputs: list[str], recursive: bool = False) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Expand files, folders and globs into (file, relative output stem) pairs, plus one error
    line per input that matched nothing. Folder contents are filtered by image suffix; a file
    named explicitly is always tried (its content decides, not its extension)."""

    found: list[tuple[Path, Path]] = []
    errors: list[str] = []
    seen: set[Path] = set()

    def add(p: Path, rel: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append((p, rel))

    for item in inputs:
        p = Path(item)
        if p.is_file():
            add(p, Path(p.stem))
        elif p.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(f for f in p.glob(pattern) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                errors.append(f"{p}: no images in this folder")
            for f in files:
                add(f, f.relative_to(p).with_suffix(""))
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                errors.append(f"{item}: no files match this pattern")
            for f in files:
                add(f, Path(f.stem))
        else:
            errors.append(f"{p}: no such file or folder")
    return found, errors


OUTPUT_FORMATS = {"png": ("PNG", ".png"), "tiff": ("TIFF", ".tif"), "jpeg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}
SUFFIX_FORMATS = {".png": "png", ".tif": "tiff", ".tiff": "tiff", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def format_for_suffix(path: Path) -> str | None:
    """The output format a file name asks for (``.png`` -> png, ``.jpg`` -> jpeg ...), or None."""
    return SUFFIX_FORMATS.get(path.suffix.lower())


@dataclasses.dataclass(frozen=True)
class SaveOptions:
    """How :func:`save_image` writes: the format, the metadata kept, whether an existing file may
    be replaced, and the quality of a JPEG output."""

    fmt: str = "png"
    icc_profile: bytes | None = None
    exif: bytes | None = None
    overwrite: bool = False
    jpeg_quality: int = 95


def save_image(pixels: np.ndarray, alpha: np.ndarray | None, out: Path, how: SaveOptions = SaveOptions()) -> list[str]:
    """Write atomically (temporary file in the same folder, then rename); never replaces an
    existing file unless ``how.overwrite``. PNG (:mod:`restorer.pngio`: level 1, deflated on every
    core), TIFF (LZW) and WebP are lossless; JPEG is written at ``how.jpeg_quality`` with 4:4:4
    chroma. Every error names ``out`` (or its folder). Returns notes about what could not be kept."""
    fmt, icc_profile, exif, overwrite = how.fmt, how.icc_profile, how.exif, how.overwrite
    pil_format, _ = OUTPUT_FORMATS[fmt]
    notes: list[str] = []
    if alpha is not None and pil_format == "JPEG":
        notes.append("JPEG output cannot hold alpha; alpha dropped")
        alpha = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out.parent}: cannot create the output folder ({exc.strerror or exc})") from None
    if out.exists() and not overwrite:
        raise UserError(f"{out}: output exists (use --overwrite to replace it)")
    if pil_format == "PNG":

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                write_png(fh, pixels, alpha, icc_profile, exif)

    else:
        write = _pillow_writer(pixels, alpha, pil_format, icc_profile, exif, how.jpeg_quality)
    try:  # no-clobber unless --overwrite: hard-linked into place, so even a race cannot clobber
        atomic_write(out, write, replace=overwrite)
    except FileExistsError:
        raise UserError(f"{out}: output exists (use --overwrite to replace it)") from None
    return notes


def _pillow_writer(pixels, alpha, pil_format: str, icc_profile, exif, jpeg_quality: int):
    """``write(tmp)`` for the formats Pillow writes (TIFF, WebP, JPEG)."""
    img = Image.fromarray(pixels)
    if alpha is not None:
        img.putalpha(Image.fromarray(alpha))
    kwargs: dict = {}
    if icc_profile:
        kwargs["icc_profile"] = icc_profile
    if exif:
        kwargs["exif"] = exif
    if pil_format == "JPEG":
        kwargs.update(quality=jpeg_quality, subsampling=0)
    elif pil_format == "TIFF":
        kwargs["compression"] = "tiff_lzw"
    elif pil_format == "WEBP":
        kwargs.update(lossless=True, quality=80, method=4)
    return lambda tmp: img.save(tmp, format=pil_format, **kwargs)
