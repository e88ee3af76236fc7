"""The options ``restore``, ``eval`` and ``compare`` share, each declared once as a typed field
(:func:`restorer.config.option`: one default, one help, one check), and the setup they share:
threads -> device -> precision -> weights.

:class:`ModelOptions` (``--weights --device --tile --tile-overlap --threads --precision (--bf16)
--max-pixels --no-progress -v``) and :class:`RuleOptions` (``--quality-rule --no-projection``) are
dataclasses every command's options class inherits, so each flag is the same field object in every
command; :class:`QualityOptions` adds the ``--quality auto|Q`` that ``restore`` and ``compare`` take
(``eval``'s ``--quality Q...`` is a list, with the same :data:`QUALITY_CHECK`). :func:`parse_options`
parses a command line (and ``--config YAML``) into a command's class through
:func:`restorer.config.parse_config`, the trainer's machinery. :func:`load_models` sets the threads,
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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from restorer import weights as packaged
from restorer.config import at_least, option, parse_config, positive, within
from restorer.errors import UserError, setup_logging
from restorer.estimator import Estimator, load_estimator
from restorer.hardware import PRECISIONS, Choice, canonical_precision, choose_precision
from restorer.imageio import DEFAULT_MAX_PIXELS
from restorer.infer.autoquality import DEFAULT_RULE, RULES, QualityChoice, choose
from restorer.infer.engine import (
    DEFAULT_TILE,
    INFERENCE_PRECISIONS,
    Restorer,
    load_restorers,
    pick_device,
    set_threads,
)
from restorer.infer.projection import project, project_upright

log = logging.getLogger("restorer.infer.options")

T = TypeVar("T")

# The one check of every --quality of restore, eval and compare (a told or a compression quality).
QUALITY_CHECK = within(1, 100)


def quality_arg(text: str | int) -> int | None:
    """``--quality``: ``auto`` -> None (the rule decides), else the number."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number 1..100, got {text!r}") from None


def inference_precision(value: str) -> str | None:
    """The check of ``--precision``: the vocabulary is the trainer's; inference runs auto|fp32|bf16."""
    if value in ("auto", *INFERENCE_PRECISIONS):
        return None
    return f"{value} is for training (with loss scaling); inference runs in auto, {', '.join(INFERENCE_PRECISIONS)}"


@dataclasses.dataclass(kw_only=True)
class ModelOptions:
    """The weights and how they run: the flags shared by ``restore``, ``eval`` and ``compare``."""

    weights: list[str] | None = option(
        None,
        "'fast' or 'quality' (the models shipped with restorer), model.safetensors file(s) "
        "or folder(s) of them, or 'none' (the JPEG itself); default: 'quality' on a GPU, "
        "'fast' on a CPU. With several, the one trained nearest to each image's JPEG "
        "quality is used",
        metavar="W",
    )
    device: str = option("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    tile: int = option(
        DEFAULT_TILE, "tile side in pixels for bounded memory; 0 = whole image at once", check=at_least(0)
    )
    tile_overlap: int | None = option(
        None,
        "context pixels around each tile (default: the model's receptive radius, "
        "which makes tiled output equal to whole-image output)",
        check=at_least(0),
    )
    threads: int | None = option(None, "CPU threads for torch (default: all cores)", check=at_least(1))
    precision: str = option(
        "auto",
        "auto: bf16 on GPUs that support it and on CPUs that compute bf16 natively (AVX512-BF16 / AMX / "
        "Arm BF16), else fp32; bf16 is faster there but not bit-identical to fp32 ('no' is accepted for fp32; "
        "fp16 is for training only)",
        choices=PRECISIONS,
        parse=canonical_precision,
        check=inference_precision,
    )
    bf16: bool = option(False, "same as --precision bf16 (kept for old scripts)", switch=True)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "refuse images declaring more pixels than this", check=positive)
    no_progress: bool = option(False, "no progress bar", switch=True)
    verbose: bool = option(False, "debug logging", switch=True, short="-v")

    def validate(self) -> None:
        if self.bf16 and self.precision not in ("auto", "bf16"):
            raise UserError(f"--bf16 means --precision bf16; it contradicts --precision {self.precision}")


@dataclasses.dataclass(kw_only=True)
class RuleOptions:
    """How the quality told to the model is chosen and whether the output is projected."""

    quality_rule: str = option(
        DEFAULT_RULE,
        "how the quality told to the model is chosen when --quality does not say: auto (default): the "
        "JPEG's quantisation tables, projected, unless its pixels carry an earlier, stronger save "
        "(restorer/infer/resave.py): then that save's quality, not projected; tables: always the tables, "
        "projected. Either way an image without tables (a PNG screenshot of a JPEG) gets the strongest "
        "JPEG save found in its pixels, else the pixel estimate (restorer/estimator.py), not projected",
        choices=RULES,
    )
    no_projection: bool = option(
        False,
        "keep the model's raw output; by default the output of a JPEG input is projected "
        "onto the quantisation intervals of the JPEG's own DCT coefficients, which cannot "
        "move it away from the original (restorer/infer/projection.py)",
        switch=True,
    )


@dataclasses.dataclass(kw_only=True)
class InferOptions(ModelOptions, RuleOptions):
    """Every option ``restore``, ``eval`` and ``compare`` share (each command's class inherits it)."""


@dataclasses.dataclass(kw_only=True)
class QualityOptions:
    """``--quality auto|Q``: the JPEG quality to tell the model (``restore``, ``compare``)."""

    quality: int | None = option(
        None,
        "JPEG quality to tell the model: auto (the JPEG's quantisation tables, or an earlier, stronger save "
        "found in the pixels, or the pixel estimate for an image without tables: see --quality-rule) or "
        "1..100; compare without "
        "--jpeg also compresses IMAGE at it (auto: 10)",
        parse=quality_arg,
        metavar="auto|Q",
        check=QUALITY_CHECK,
    )


@dataclasses.dataclass(kw_only=True)
class OverwriteOptions:
    """``--overwrite``: the commands that write files (``restore``, ``compare``)."""

    overwrite: bool = option(False, "replace existing outputs (never an input, even with this)", switch=True)


def parse_options(cls: type[T], argv: Sequence[str] | None, prog: str, description: str, epilog: str) -> T:
    """Parse a command's options (defaults < ``--config`` YAML < flags, each option's check run),
    then set up logging (``-v``): the first lines of every command."""
    opts = parse_config(cls, argv, prog=prog, description=description, epilog=epilog)
    setup_logging(bool(getattr(opts, "verbose", False)))
    return opts


def requested_precision(opts: ModelOptions) -> str:
    return "bf16" if opts.bf16 else opts.precision


def resolve_precision(requested: str, device: torch.device) -> Choice:
    """``auto`` | ``fp32`` | ``bf16`` (or an alias) -> the inference precision on ``device``, with its
    reason. ``auto`` follows :func:`restorer.hardware.choose_precision`; where that would pick fp16 (a
    GPU without bf16), inference stays in fp32."""
    try:
        requested = canonical_precision(requested)
    except ValueError as exc:
        raise UserError(f"--{exc}") from None
    problem = inference_precision(requested)
    if problem:
        raise UserError(f"--precision {problem}")
    if requested != "auto":
        return Choice(requested, "set explicitly")
    choice = choose_precision("auto", device)
    if choice.value == "bf16":
        return Choice("bf16", choice.reason)
    return Choice("fp32", choice.reason if choice.value == "fp32" else f"{choice.reason}; inference uses fp32")


@dataclasses.dataclass
class Models:
    restorers: list[Restorer]
    errors: list[str]  # one line per weights file that could not be used
    device: torch.device
    precision: Choice
    specs: list[str]  # the weights as resolved (the default name filled in)
    estimator: Estimator | None = None  # the pixel quality estimate (images without JPEG tables)

    @property
    def identity(self) -> bool:
        return all(r.model is None for r in self.restorers)


def load_models(args: InferOptions) -> Models:
    """threads -> device -> precision -> weights, the same for every command. Raises UserError
    when no weights are usable (after the per-file lines in ``errors``)."""
    set_threads(args.threads)
    device = pick_device(args.device)
    precision = resolve_precision(requested_precision(args), device)
    specs = list(args.weights) if args.weights else [packaged.default_name(device.type)]
    restorers, errors = load_restorers(specs, device, args.tile, args.tile_overlap, str(precision.value))
    models = Models(restorers, errors, device, precision, specs, packaged_estimator(device))
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


def packaged_estimator(device: torch.device) -> Estimator | None:
    """The packaged quality estimator (both rules may need it: images without JPEG tables); None,
    with a warning, when it cannot be loaded (the tables are used then, and an image without them
    needs --quality)."""
    try:
        return load_estimator(None, device)
    except UserError as exc:
        log.warning("%s; only the JPEG tables can give the quality", exc)
        return None


def choose_quality(
    pixels: np.ndarray, tables: int | None, is_jpeg: bool, given: int | None, models: Models, args: RuleOptions
) -> QualityChoice:
    """:func:`restorer.infer.autoquality.choose` with the command's flags; ``--no-projection``
    turns the projection off whatever the rule says."""
    choice = choose(pixels, tables, given, models.estimator, is_jpeg, args.quality_rule)
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


def project_output(restored: np.ndarray, jpeg: Path | bytes, args: RuleOptions, *, upright: bool = True) -> np.ndarray:
    """The model's output as the commands write and measure it: projected onto the JPEG's
    quantisation set (``jpeg``: the file, or its bytes) unless ``--no-projection``. ``upright``:
    ``restored`` is EXIF-upright (as ``restorer.imageio.open_image`` returns a file's pixels);
    JPEG bytes made in memory have no orientation, so either works for them. A JPEG the
    projection cannot read (CMYK, unusual sampling) keeps the raw output, with a warning."""
    if args.no_projection:
        return restored
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
