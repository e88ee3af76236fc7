"""The options ``restore``, ``eval`` and ``compare`` share, each defined and checked once, and the
setup they share: threads -> device -> precision -> weights.

:func:`add_model_args` adds ``--weights --device --tile --tile-overlap --threads --precision
(--bf16) --max-pixels --no-progress -v``; :func:`check_model_args` checks them (one
:class:`~restorer.errors.UserError` line per bad value); :func:`load_models` sets the threads,
picks the device and the precision, resolves the weights (the packaged ``fast`` / ``quality``
names, files, folders, ``none``) and loads them. It logs one line naming the device, the
precision and the reason for it, and the weights.

:class:`InputFiles` is the one rule every writer of the three commands applies: an output path
that is (or resolves to, or is a link of) one of the inputs is refused, with or without
``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from restorer import weights as packaged
from restorer.errors import UserError, setup_logging
from restorer.estimator import Estimator, load_estimator
from restorer.hardware import Choice, choose_precision
from restorer.imageio import DEFAULT_MAX_PIXELS
from restorer.infer.autoquality import MARGIN, RULES, QualityChoice, choose
from restorer.infer.engine import DEFAULT_TILE, PRECISIONS, Restorer, load_restorers, pick_device, set_threads

log = logging.getLogger("restorer.infer.options")

PRECISION_CHOICES = ("auto",) + PRECISIONS


def add_model_args(p: argparse.ArgumentParser, weights_help: str = "") -> None:
    """The flags shared by ``restore``, ``eval`` and ``compare``."""
    p.add_argument(
        "--weights",
        nargs="+",
        default=None,
        metavar="W",
        help="'fast' or 'quality' (the models shipped with restorer), model.safetensors file(s) "
        "or folder(s) of them, or 'none' (the JPEG itself); default: 'quality' on a GPU, "
        "'fast' on a CPU. With several, the one trained nearest to each image's JPEG "
        "quality is used" + weights_help,
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    p.add_argument(
        "--tile",
        type=int,
        default=DEFAULT_TILE,
        help=f"tile side in pixels for bounded memory; 0 = whole image at once (default {DEFAULT_TILE})",
    )
    p.add_argument(
        "--tile-overlap",
        type=int,
        default=None,
        help="context pixels around each tile (default: the model's receptive radius, "
        "which makes tiled output equal to whole-image output)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default=None,
        help="auto (default): bf16 on GPUs that support it and on CPUs that compute bf16 "
        "natively (AVX512-BF16 / AMX / Arm BF16), else fp32; bf16 is faster there but "
        "not bit-identical to fp32",
    )
    p.add_argument("--bf16", action="store_true", help="same as --precision bf16 (kept for old scripts)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images declaring more pixels than this (default {DEFAULT_MAX_PIXELS:,})",
    )
    p.add_argument(
        "--no-projection",
        action="store_true",
        help="keep the model's raw output; by default the output of a JPEG input is projected "
        "onto the quantisation intervals of the JPEG's own DCT coefficients, which cannot "
        "move it away from the original (restorer/infer/projection.py)",
    )
    p.add_argument(
        "--quality-rule",
        choices=RULES,
        default="auto",
        help="how the quality told to the model is chosen when --quality does not say: auto (default): the "
        "JPEG's tables, unless the pixel estimate (restorer/estimator.py) is lower by more than "
        f"{MARGIN:g} (an earlier, stronger save or a resize: then the estimate, not projected); images without "
        "tables get the estimate; tables: the tables only, always projected (the behaviour before the estimator)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def check_model_args(args: argparse.Namespace) -> None:
    """One check per shared flag; raises a one-line UserError."""
    if args.tile < 0:
        raise UserError(f"--tile must be >= 0 (0 = whole image), got {args.tile}")
    if args.tile_overlap is not None and args.tile_overlap < 0:
        raise UserError(f"--tile-overlap must be >= 0, got {args.tile_overlap}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.max_pixels <= 0:
        raise UserError(f"--max-pixels must be positive, got {args.max_pixels}")
    if args.bf16 and args.precision not in (None, "bf16"):
        raise UserError(f"--bf16 means --precision bf16; it contradicts --precision {args.precision}")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, set up logging (``-v``) and check the shared flags: the first lines of every command."""
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    check_model_args(args)
    return args


def requested_precision(args: argparse.Namespace) -> str:
    return "bf16" if args.bf16 else (args.precision or "auto")


def resolve_precision(requested: str, device: torch.device) -> Choice:
    """``auto`` | ``fp32`` | ``bf16`` -> the inference precision on ``device``, with its reason.
    ``auto`` follows :func:`restorer.hardware.choose_precision`; where that would pick fp16 (a GPU
    without bf16), inference stays in fp32."""
    if requested not in PRECISION_CHOICES:
        raise UserError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return Choice(requested, "set explicitly")
    choice = choose_precision("auto", device)
    if choice.value == "bf16":
        return Choice("bf16", choice.reason)
    return Choice("fp32", choice.reason if choice.value == "no" else f"{choice.reason}; inference uses fp32")


@dataclasses.dataclass
class Models:
    restorers: list[Restorer]
    errors: list[str]  # one line per weights file that could not be used
    device: torch.device
    precision: Choice
    specs: list[str]  # the weights as resolved (the default name filled in)
    estimator: Estimator | None = None  # the pixel quality estimate of --quality-rule auto

    @property
    def identity(self) -> bool:
        return all(r.model is None for r in self.restorers)


def load_models(args: argparse.Namespace) -> Models:
    """threads -> device -> precision -> weights, the same for every command. Raises UserError
    when no weights are usable (after the per-file lines in ``errors``)."""
    set_threads(args.threads)
    device = pick_device(args.device)
    precision = resolve_precision(requested_precision(args), device)
    specs = list(args.weights) if args.weights else [packaged.default_name(device.type)]
    restorers, errors = load_restorers(specs, device, args.tile, args.tile_overlap, str(precision.value))
    models = Models(restorers, errors, device, precision, specs, load_rule_estimator(args, device))
    if restorers and not models.identity:
        default = "" if args.weights else f" (default on {device.type}; --weights to choose)"
        log.info(
            "device %s, precision %s (%s); weights%s: %s",
            device,
            precision.value,
            precision.reason,
            default,
            "; ".join(r.describe() for r in restorers),
        )
    return models


def load_rule_estimator(args: argparse.Namespace, device: torch.device) -> Estimator | None:
    """The packaged quality estimator when ``--quality-rule auto`` may need it; None (with a warning:
    the tables are used then) when it cannot be loaded."""
    if getattr(args, "quality_rule", "auto") != "auto":
        return None
    try:
        return load_estimator(None, device)
    except UserError as exc:
        log.warning("%s; --quality auto falls back to the JPEG tables", exc)
        return None


def choose_quality(
    pixels: np.ndarray, tables: int | None, is_jpeg: bool, given: int | None, models: Models, args: argparse.Namespace
) -> QualityChoice:
    """:func:`restorer.infer.autoquality.choose` with the command's flags; ``--no-projection``
    turns the projection off whatever the rule says."""
    choice = choose(pixels, tables, given, models.estimator, is_jpeg, getattr(args, "quality_rule", "auto"))
    if args.no_projection and choice.project:
        choice = dataclasses.replace(choice, project=False)
    return choice


def report_weight_errors(models: Models, err: Callable[[str], None]) -> None:
    """Pass each weights error line to ``err``; when no weights are usable, raise instead: the
    one line itself if there was only one (``--weights fast`` not installed), else a summary
    after the per-file lines."""
    if not models.restorers:
        if len(models.errors) == 1:
            raise UserError(models.errors[0])
        for line in models.errors:
            err(line)
        raise UserError("no usable weights among: " + " ".join(models.specs))
    for line in models.errors:
        err(line)


def project_output(
    restored: np.ndarray, jpeg: Path | bytes, args: argparse.Namespace, *, upright: bool = True
) -> np.ndarray:
    """The model's output as the commands write and measure it: projected onto the JPEG's
    quantisation set (``jpeg``: the file, or its bytes) unless ``--no-projection``. ``upright``:
    ``restored`` is EXIF-upright (as ``restorer.imageio.open_image`` returns a file's pixels);
    JPEG bytes made in memory have no orientation, so either works for them. A JPEG the
    projection cannot read (CMYK, unusual sampling) keeps the raw output, with a warning."""
    if args.no_projection:
        return restored
    from restorer.infer.projection import project, project_upright

    try:
        return project_upright(restored, jpeg) if upright else project(restored, jpeg)
    except UserError as exc:
        log.warning("%s; output not projected", exc)
        return restored


class InputFiles:
    """The input files of a run, to refuse any output that would write over one of them: the same
    resolved path, or the same file through a hard or symbolic link (same device and inode).
    Applies with and without ``--overwrite``. Lookups are O(1), so a folder of 100k photos is fine."""

    def __init__(self, paths: Iterable[Path]):
        self.by_path: dict[Path, Path] = {}
        self.by_inode: dict[tuple[int, int], Path] = {}
        for p in paths:
            self.by_path[Path(os.path.abspath(p)).resolve()] = p
            try:
                st = os.stat(p)
                self.by_inode[(st.st_dev, st.st_ino)] = p
            except OSError:
                pass

    def check(self, target: Path) -> None:
        """UserError naming ``target`` and the input when ``target`` is one of the inputs."""
        src = self.by_path.get(Path(os.path.abspath(target)).resolve())
        if src is None:
            try:
                st = os.stat(target)
                src = self.by_inode.get((st.st_dev, st.st_ino))
            except OSError:
                pass
        if src is not None:
            raise UserError(
                f"{target}: is the input {src}; refusing to write over an input "
                f"(even with --overwrite): choose another -o"
            )
