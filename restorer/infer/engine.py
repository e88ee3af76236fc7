"""Tiled inference: restore an image of any size in bounded memory, equal to whole-image inference.

The networks are fully convolutional with stride 1 and zero padding, so an output pixel depends
only on input pixels within the *receptive radius* r (:func:`restorer.model.receptive_radius`, each
network computes its own). Multi-scale networks (U-Net) also have an *alignment* a: their pixel
grid repeats every a pixels, so tile origins, overlaps and cores are kept multiples of a
(:func:`tile_spans`), which puts every tile on the whole image's grid. We cut the image
into tiles of ``tile`` x ``tile`` input pixels; each tile keeps only its centre (the "core") and
discards ``overlap`` pixels on every side that has a neighbour. Tiles at the image edge are clamped
to the edge, so they see the same zero padding as the whole image. With ``overlap >= r`` every kept
pixel saw exactly the context it would see in whole-image inference: the result equals it up to
floating-point summation order (well below 1/255; checked in tests), with no seams and no blending.

Output is written tile by tile into a uint8 array, so memory is input + output (3 bytes/pixel each)
plus one tile's activations, whatever the image size.

Colour handling
---------------
* 3-channel model, RGB image: direct.
* 3-channel model, grayscale image: the gray plane is replicated to R=G=B, restored, and the
  mean of the three output channels is taken back as the gray result.
* 1-channel model, grayscale image: direct.
* 1-channel model, RGB image: the luma Y of YCbCr (JPEG's own full-range BT.601 transform, as
  Pillow converts) is restored; Cb and Cr are kept as decoded.

Quality
-------
A quality-conditioned model needs the JPEG quality: read from the file's quantisation tables
(``degrade.estimate_quality``), or given with ``--quality``. Among several weights files, the one
whose training quality range (``facts["quality_range"]`` in model.json, e.g. [10, 90], else the
spec ``facts["quality"]``, e.g. "10" or "10-90") is nearest to the image's quality is used; see
:func:`choose_restorer`. :meth:`Restorer.covers` tells whether a quality lies inside that range
(``restore`` passes images outside it through unchanged unless ``--force``).

Precision and memory format
---------------------------
``precision`` is "fp32" or "bf16" (autocast); ``channels_last=None`` follows
:func:`restorer.hardware.choose_channels_last` for the device and precision. Both are decided by
the caller (``restorer.infer.options``), never hard-coded here.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from restorer import weights as packaged
from restorer.data.degrade import parse_quality
from restorer.errors import UserError, describe
from restorer.hardware import choose_channels_last
from restorer.model import alignment, receptive_radius
from restorer.modelfile import WEIGHTS_NAME, load_weights

log = logging.getLogger("restorer.infer.engine")

DEFAULT_TILE = 512
INFERENCE_PRECISIONS = ("fp32", "bf16")  # of restorer.hardware.PRECISIONS, those inference runs in


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:1 ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return dev


def set_threads(n: int | None) -> None:
    """``--threads``: CPU threads for torch (default: torch's own choice, all cores). On a machine
    shared with other jobs, fewer threads than cores avoids OpenMP spin-waiting, which can make
    inference several times slower."""
    if n is not None:
        if n < 1:
            raise UserError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def tile_spans(length: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int, int, int]]:
    """Along one axis: (input start, input end, core start, core end) of each tile. Cores
    partition [0, length); each input span is its core grown by ``overlap`` (clamped), and never
    longer than ``tile``. With ``align`` > 1 the overlap is rounded up and the core down to
    multiples of ``align``, so every input start is a multiple of ``align``."""
    if tile <= 0 or tile >= length:
        return [(0, length, 0, length)]
    overlap = -(-overlap // align) * align
    core = (tile - 2 * overlap) // align * align
    if core <= 0:
        raise UserError(
            f"--tile {tile} must be larger than twice --tile-overlap ({overlap}"
            f"{f', a multiple of the model alignment {align}' if align > 1 else ''})"
        )
    spans = []
    for c0 in range(0, length, core):
        c1 = min(c0 + core, length)
        spans.append((max(0, c0 - overlap), min(length, c1 + overlap), c0, c1))
    return spans


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """[C, H, W] float in [0, 1] -> [H, W, C] uint8 (rounded, clamped)."""
    return t.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


_MALLOC_TUNED = False


def reuse_freed_memory() -> None:
    """Ask glibc to keep large freed blocks for reuse instead of returning each to the OS.

    By default every conv activation of every tile above the mmap threshold is mmapped, page-
    faulted in and unmapped again: measured here, a third of CPU restore time went to the kernel
    (default preset, 1024x768, 512 px tiles: 9.2 s -> 6.0 s with this, 2.7M -> 0.14M page faults).
    Tiles repeat the same sizes, so the kept memory is reused and the peak does not grow.
    Best effort: a no-op where libc is not glibc."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, ctypes.c_int(1 << 30))
        libc.mallopt(m_trim_threshold, ctypes.c_int(1 << 30))
    except (OSError, AttributeError):
        pass


@dataclasses.dataclass
class Restorer:
    """One loaded weights file, ready to restore uint8 images."""

    model: nn.Module | None  # None: IdentityRestorer (the JPEG itself)
    meta: dict
    path: Path
    device: torch.device
    tile: int = DEFAULT_TILE
    overlap: int | None = None  # None = the receptive radius
    precision: str = "fp32"  # or "bf16" (autocast)
    channels_last: bool | None = None  # None = restorer.hardware's rule for device + precision

    def __post_init__(self) -> None:
        if self.precision not in INFERENCE_PRECISIONS:
            raise ValueError(f"precision must be one of {INFERENCE_PRECISIONS}, got {self.precision!r}")
        if self.model is None:
            raise ValueError("a Restorer needs a model (IdentityRestorer is the one without)")
        self.radius = receptive_radius(self.model)
        self.align = alignment(self.model)
        if self.overlap is None:
            self.overlap = self.radius
        elif self.overlap < self.radius:
            log.warning(
                "tile overlap %d is below the receptive radius %d of %s: tiled output may "
                "differ from whole-image output near tile borders",
                self.overlap,
                self.radius,
                self.path,
            )
        cfg = self.meta.get("model", {})
        self.in_channels = int(cfg.get("in_channels", 3))
        self.conditioned = bool(cfg.get("condition_on_quality", False))
        self.quality_range = trained_quality_range(self.meta.get("facts") or {}, self.path)
        if self.channels_last is None:
            self.channels_last = bool(choose_channels_last("auto", self.device, self.precision).value)
        if self.channels_last:
            # torch's stubs omit Module.to(memory_format=...), which torch accepts
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self.device.type == "cpu":
            reuse_freed_memory()

    @property
    def name(self) -> str:
        return str(self.path)

    def describe(self) -> str:
        rng = self.quality_range
        trained = (
            "quality unknown"
            if rng is None
            else (f"quality {rng[0]}" if rng[0] == rng[1] else f"quality {rng[0]}-{rng[1]}")
        )
        return f"{self.path} (trained on {trained})"

    def covers(self, quality: int) -> bool:
        """Whether ``quality`` lies inside the trained range (True when the range is unknown)."""
        lo, hi = self.quality_range or (1, 100)
        return lo <= quality <= hi

    def default_quality(self) -> int:
        """Quality to condition on when the image's is unknown: the middle of the trained range."""
        lo, hi = self.quality_range or (1, 100)
        return (lo + hi) // 2

    # -- inference -------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, quality: int | None) -> torch.Tensor:
        assert self.model is not None, "IdentityRestorer has no forward"
        q = None
        if self.conditioned:
            q = torch.full(
                (x.shape[0],), float(quality if quality is not None else self.default_quality()), device=x.device
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16":
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                return self.model(x, q).float()
        return self.model(x, q)

    def apply_planes(
        self,
        planes: np.ndarray,
        fn: Callable[[torch.Tensor], torch.Tensor],
        tile: int | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> np.ndarray:
        """Run ``fn`` ([1, C, h, w] float -> [1, C', h, w] float) over ``planes`` ([H, W, C] uint8)
        tile by tile; return [H, W, C'] uint8."""
        tile = self.tile if tile is None else tile
        h, w = planes.shape[:2]
        out: np.ndarray | None = None
        overlap = self.radius if self.overlap is None else self.overlap
        rows = tile_spans(h, tile, overlap, self.align)
        cols = tile_spans(w, tile, overlap, self.align)
        with torch.inference_mode():
            for y0, y1, cy0, cy1 in rows:
                for x0, x1, cx0, cx1 in cols:
                    chunk = torch.from_numpy(np.array(planes[y0:y1, x0:x1], copy=True))
                    x = chunk.to(self.device).permute(2, 0, 1).unsqueeze(0).float().div_(255)
                    y = fn(x)[0, :, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
                    if out is None:
                        out = np.empty((h, w, y.shape[0]), dtype=np.uint8)
                    out[cy0:cy1, cx0:cx1] = to_uint8(y)
                    del x, y
                    if progress is not None:
                        progress((cy1 - cy0) * (cx1 - cx0))
        assert out is not None
        return out

    def restore(
        self,
        pixels: np.ndarray,
        quality: int | None = None,
        tile: int | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> np.ndarray:
        """Restore a uint8 image ([H, W] gray or [H, W, 3] RGB); returns the same shape, uint8."""
        gray = pixels.ndim == 2
        if not gray and (pixels.ndim != 3 or pixels.shape[2] != 3):
            raise ValueError(f"expected [H, W] or [H, W, 3] uint8 pixels, got shape {pixels.shape}")
        if self.in_channels == 3:
            if gray:

                def fn(x):
                    return self._forward(x.expand(-1, 3, -1, -1), quality).mean(dim=1, keepdim=True)

                return self.apply_planes(pixels[:, :, None], fn, tile, progress)[:, :, 0]
            return self.apply_planes(pixels, lambda x: self._forward(x, quality), tile, progress)
        if self.in_channels == 1:
            if gray:
                return self.apply_planes(pixels[:, :, None], lambda x: self._forward(x, quality), tile, progress)[
                    :, :, 0
                ]
            ycc = np.asarray(Image.fromarray(pixels).convert("YCbCr")).copy()
            ycc[:, :, 0] = self.apply_planes(ycc[:, :, :1], lambda x: self._forward(x, quality), tile, progress)[
                :, :, 0
            ]
            return np.asarray(Image.fromarray(ycc, mode="YCbCr").convert("RGB"))
        raise UserError(f"{self.path}: models with {self.in_channels} input channels are not supported")


class IdentityRestorer(Restorer):
    """``--weights none``: the JPEG itself (a baseline for eval, a check for compare)."""

    def __init__(self) -> None:  # no model
        self.path = Path("none")
        self.meta, self.model, self.device = {}, None, torch.device("cpu")
        self.quality_range, self.conditioned, self.in_channels, self.radius, self.overlap = None, False, 3, 0, 0
        self.align = 1
        self.precision, self.channels_last = "fp32", False

    def describe(self) -> str:
        return "none (the JPEG itself)"

    def restore(self, pixels, quality=None, tile=None, progress=None):
        return pixels.copy()


def trained_quality_range(facts: dict, path: Path) -> tuple[int, int] | None:
    """(lo, hi) from model.json's ``facts``: ``quality_range`` [lo, hi] if present, else the
    ``quality`` spec ("10", "10-90"); None (with a warning) when neither is readable."""
    rng = facts.get("quality_range")
    if rng is not None:
        try:
            lo, hi = (int(v) for v in rng)
            if 1 <= lo <= hi <= 100:
                return lo, hi
        except (TypeError, ValueError):
            pass
        log.warning("%s: ignoring unreadable facts.quality_range %r", path, rng)
    spec = facts.get("quality")
    if spec is not None:
        try:
            return parse_quality(spec)
        except ValueError:
            log.warning("%s: ignoring unreadable facts.quality %r", path, spec)
    return None


def weights_files(spec: str) -> list[Path]:
    """A weights argument -> files: ``fast`` / ``quality`` -> the packaged model
    (:mod:`restorer.weights`); a file as is; a folder -> its model.safetensors if present, else
    every *.safetensors directly inside, else every */model.safetensors one level down."""
    if spec in packaged.NAMES:
        return [packaged.packaged_path(spec)]
    p = Path(spec)
    if p.is_dir():
        if (p / WEIGHTS_NAME).is_file():
            return [p / WEIGHTS_NAME]
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob(f"*/{WEIGHTS_NAME}"))
        if not files:
            raise UserError(f"{p}: no .safetensors weights in this folder")
        return files
    return [p]


def load_restorers(
    specs: list[str],
    device: torch.device,
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    precision: str = "fp32",
) -> tuple[list[Restorer], list[str]]:
    """Load every weights file named (packaged names, files or folders). Returns the usable ones
    and one error line per file that could not be used; ``none`` gives the identity."""
    restorers: list[Restorer] = []
    errors: list[str] = []
    for spec in specs:
        if spec.lower() == "none":
            restorers.append(IdentityRestorer())
            continue
        try:
            files = weights_files(spec)
        except UserError as exc:
            errors.append(str(exc))
            continue
        for f in files:
            try:
                model, meta = load_weights(f, device)
                restorers.append(Restorer(model, meta, f, device, tile, overlap, precision))
            except UserError as exc:
                errors.append(str(exc))
            except Exception as exc:  # a header that parses but describes nonsense
                errors.append(f"{f}: unusable weights ({describe(exc)})")
    return restorers, errors


def quality_distance(rng: tuple[int, int] | None, quality: int | None) -> tuple[float, float]:
    """Sort key: (distance from ``quality`` to the range, width of the range). Weights without a
    recorded range count as blind (1-100). An unknown quality prefers the widest range."""
    lo, hi = rng or (1, 100)
    if quality is None:
        return (0.0, -(hi - lo))
    dist = lo - quality if quality < lo else (quality - hi if quality > hi else 0)
    return (float(dist), float(hi - lo))


def choose_restorer(restorers: list[Restorer], quality: int | None) -> Restorer:
    """The weights trained nearest to ``quality`` (inside the range = distance 0; ties go to the
    narrower, more specialised range, then to the order given)."""
    if not restorers:
        raise UserError("no usable weights")
    return min(restorers, key=lambda r: quality_distance(r.quality_range, quality))
