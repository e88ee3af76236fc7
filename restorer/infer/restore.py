"""``restorer restore INPUT... [-o OUT] [--weights fast|quality|W...]``: restore JPEG photos, any
size, keeping metadata, never touching an input.

Guarantees (each tested in tests/test_restore.py):

* No input is ever written over: an output that is (or links to) any input file is refused, even
  with ``--overwrite``. An existing output is replaced only with ``--overwrite``; every write is
  atomic.
* Where outputs go: no ``-o`` -> ``NAME.restored.png`` beside each input; ``-o`` ending in an image
  suffix (``.png .tif .tiff .jpg .jpeg .webp``) -> that one file (an error when there are several
  input images); anything else -> a folder (created if needed). The format follows ``--format``
  or the ``-o`` suffix; ``-o out.png --format jpeg`` is an error, never JPEG bytes in a .png.
* The JPEG quality the model is told: ``--quality N``, else (``--quality auto``, the default) the
  rule of :mod:`restorer.infer.autoquality` chosen by ``--quality-rule``: ``auto`` (default) reads
  a JPEG's quantisation tables (projected) unless its pixels carry an earlier, stronger save
  (:mod:`restorer.infer.resave`; then that save's quality, unprojected); ``tables`` always reads
  the tables. A file that is not a JPEG (a PNG or WebP screenshot of one) gets the strongest JPEG
  save found in its pixels, else the pixel estimate, under either rule. The value, its
  source and why are printed per photo; ``--json`` records them with the projection decision.
* A model is applied only inside the quality range it was trained on (model.json
  ``facts.quality_range``); outside it the decoded image is written unchanged (lossless for PNG,
  TIFF, WebP) with one ``note:`` line, unless ``--force``.

The processing path (:func:`_load` -> :func:`_process` -> :func:`_finish`, run by
:func:`restorer.infer.pipeline.run_photos`): each file is read once (its bytes give both the
pixels and the DCT coefficients of the projection); the network and the projection run on the
main thread; for several photos, the decoding of the next one and the writing of the previous one
run on one background thread beside the network (at most two photos held; ``--sequential``: one
at a time, the same files byte for byte).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from restorer.config import option, options_parser
from restorer.errors import UserError, cli_entry, describe
from restorer.fsutil import atomic_write_text
from restorer.imageio import (
    IMAGE_SUFFIXES,
    OUTPUT_FORMATS,
    LoadedImage,
    SaveOptions,
    find_images,
    format_for_suffix,
    open_image,
    save_image,
)
from restorer.infer.autoquality import QualityChoice
from restorer.infer.engine import Restorer, choose_restorer
from restorer.infer.options import (
    InferOptions,
    InputFiles,
    Models,
    OverwriteOptions,
    QualityOptions,
    choose_quality,
    load_models,
    parse_options,
    report_weight_errors,
)
from restorer.infer.pipeline import run_photos
from restorer.infer.projection import JpegCoefficients, project_upright, read_coefficients

log = logging.getLogger("restorer.infer.restore")

PROG = "restorer restore"
RESTORED_TAG = ".restored"  # photo.jpg -> photo.restored.png when no -o is given

EXAMPLES = """\
examples:
  restorer restore photo.jpg                         # -> photo.restored.png beside it ('fast' on CPU, 'quality' on GPU)
  restorer restore photo.jpg -o photo_clean.png --weights quality
  restorer restore holiday/ -o restored/ --weights runs/demo/model.safetensors
  restorer restore 'scans/**/*.jpg' -o restored/ --weights q10/ q30/ q50/   # nearest quality per image
  restorer restore big.jpg -o out/ --tile 256 --device cpu --precision fp32
  restorer restore screenshot.png                    # not a JPEG: the quality is estimated from the pixels
  restorer restore scan.png --quality 30             # or say what quality it was compressed at
  restorer restore photo.jpg -o out/ --weights w.safetensors --quality 20 --overwrite

Outputs are lossless PNG (or --format tiff / webp / jpeg) named after the input, written
atomically: without -o, NAME.restored.png beside each input; an -o ending in .png/.tif/.jpg/.webp
is one file, any other -o a folder. No input file is ever written over, even with --overwrite; an
existing output is left alone unless --overwrite. EXIF orientation is applied (the output is
upright, Orientation reset to 1); ICC profile, EXIF and alpha are kept; grayscale stays grayscale.
Images whose JPEG quality lies outside the weights' trained range are written unchanged, with a
note, unless --force. Each unreadable input or weights file gets one 'error:' line; the rest are
still processed, and the exit status is 1 if anything failed (2 for a usage error or no usable
weights).
"""


@dataclasses.dataclass(kw_only=True)
class RestoreOptions(InferOptions, QualityOptions, OverwriteOptions):
    """``restorer restore``'s options: the shared ones (restorer.infer.options) and these."""

    inputs: list[str] = option(help="image files, folders, or quoted globs", positional=True, metavar="INPUT")
    output: str | None = option(
        None,
        f"output file (a name ending in an image suffix; one input image only) or folder; "
        f"default: NAME{RESTORED_TAG}.png beside each input",
        short="-o",
        metavar="OUT",
    )
    json: str | None = option(None, "write one record per photo: quality used and why, projection", metavar="PATH")
    force: bool = option(
        False,
        "apply the weights even outside the JPEG quality range they were trained on "
        "(default: such images are written unchanged, with a note)",
        switch=True,
    )
    format: str | None = option(
        None, "output format (default: from the -o file name's suffix, else png)", choices=tuple(sorted(OUTPUT_FORMATS))
    )
    recursive: bool = option(
        False, "descend into sub-folders of folder inputs (their structure is mirrored under OUT)", switch=True
    )
    sequential: bool = option(
        False,
        "one photo at a time: no reading or writing of the neighbours while the network runs "
        "(the same output files; slower on folders, and only one photo in memory instead of two)",
        switch=True,
    )


def parse(argv: Sequence[str] | None = None) -> RestoreOptions:
    return parse_options(RestoreOptions, argv, PROG, "Remove JPEG artifacts from photos.", EXAMPLES)


def build_parser() -> argparse.ArgumentParser:
    """The command line parser (for --help and the option checks of tests/test_options.py)."""
    return options_parser(RestoreOptions, PROG, "Remove JPEG artifacts from photos.", EXAMPLES)


class OutputPlan:
    """Where each input's output goes, decided once from ``-o`` and ``--format`` (see the module
    doc); raises UserError for a contradiction before anything is read or written."""

    def __init__(self, output: str | None, fmt: str | None, n_images: int):
        self.beside = output is None
        self.out = None if output is None else Path(output)
        self.single_file = False
        if self.out is not None:
            names_folder = (output or "").endswith(("/", os.sep)) or self.out.is_dir()
            suffix = self.out.suffix.lower()
            if not names_folder and suffix in IMAGE_SUFFIXES:
                wanted = format_for_suffix(self.out)
                if wanted is None:
                    raise UserError(
                        f"{self.out}: cannot write {suffix} images; name the output "
                        f"{' / '.join(sorted(set(s for _, s in OUTPUT_FORMATS.values())))}"
                    )
                if fmt is not None and fmt != wanted:
                    raise UserError(
                        f"{self.out}: the name says {wanted} but --format {fmt}; make them agree "
                        f"(e.g. -o {self.out.with_suffix(OUTPUT_FORMATS[fmt][1])})"
                    )
                if n_images > 1:
                    raise UserError(
                        f"{self.out}: names one file, but there are {n_images} input images; "
                        f"give a folder (e.g. -o {self.out.with_suffix('')}/)"
                    )
                self.single_file, fmt = True, wanted
            elif self.out.exists() and not self.out.is_dir():
                raise UserError(f"{self.out}: exists and is not a folder (several inputs need an output folder)")
        self.fmt = fmt or "png"
        self.ext = OUTPUT_FORMATS[self.fmt][1]

    def target(self, path: Path, rel: Path) -> Path:
        if self.beside:
            return path.with_name(path.stem + RESTORED_TAG + self.ext)
        assert self.out is not None
        return self.out if self.single_file else self.out / (str(rel) + self.ext)


def earlier_outputs(found: list[tuple[Path, Path]], inputs: list[str]) -> list[Path]:
    """``*.restored.*`` files found inside folder inputs (outputs of an earlier run), unless named
    explicitly: they are not restored again."""
    named = {Path(i).resolve() for i in inputs if Path(i).is_file()}
    return [p for p, _ in found if p.stem.endswith(RESTORED_TAG) and p.resolve() not in named]


class Run:
    """One ``restore`` run: the options, where outputs go, and the problems counted so far."""

    def __init__(self, args: RestoreOptions, found: list[tuple[Path, Path]], models: Models):
        self.args, self.found, self.models = args, found, models
        self.plan = OutputPlan(args.output, args.format, len(found))
        self.inputs = InputFiles(p for p, _ in found)
        self.targets: dict[Path, Path] = {}
        self.records: list[dict] = []
        self.failures = 0
        self.bar = tqdm(total=len(found), unit="img", disable=args.no_progress or len(found) < 2, file=sys.stderr)

    def err(self, msg: str) -> None:
        self.failures += 1
        _write(f"error: {msg}", sys.stderr)

    def load(self, item: tuple[Path, Path]) -> Loaded:
        path, rel = item
        target = self.plan.target(path, rel)
        self.inputs.check(target)
        if target in self.targets:
            raise UserError(f"{path}: would write {target}, already written for {self.targets[target]} (rename one)")
        self.targets[target] = path
        if target.exists() and not self.args.overwrite:
            raise UserError(f"{target}: output exists (use --overwrite to replace it)")
        return _load(path, target, self.args, self.models)

    def finish(self, done: Restored) -> None:
        self.records.append(_finish(done, self.plan.fmt, self.args))
        self.bar.update(1)

    def failed(self, item: tuple[Path, Path], exc: BaseException) -> None:
        self.bar.update(1)
        if isinstance(exc, UserError):
            self.err(str(exc))
            return
        if os.environ.get("RESTORER_DEBUG"):  # keep going with the other images unless debugging
            raise exc
        self.err(f"{item[0]}: failed ({describe(exc)})")


def find_inputs(args: RestoreOptions) -> tuple[list[tuple[Path, Path]], list[str]]:
    """The input images (earlier outputs inside folder inputs left out, with a note) and one error
    line per input that could not be used."""
    found, input_errors = find_images(args.inputs, args.recursive)
    skipped = set(earlier_outputs(found, args.inputs))
    if skipped:
        _write(
            f"note: skipped {len(skipped)} earlier output(s) named *{RESTORED_TAG}.* in the input folders", sys.stderr
        )
    return [(p, rel) for p, rel in found if p not in skipped], input_errors


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    found, input_errors = find_inputs(args)
    models = load_models(args)
    run = Run(args, found, models)
    report_weight_errors(models, run.err)
    for line in input_errors:
        run.err(line)
    process = functools.partial(_process, models=models, args=args)
    run_photos(found, run.load, process, run.finish, run.failed, not args.sequential)
    run.bar.close()
    if args.json:
        atomic_write_text(Path(args.json), json.dumps({"photos": run.records}, indent=1) + "\n")
    if not found:
        _write("error: no input images", sys.stderr)
        return 1
    if run.failures:
        _write(f"{len(found)} image(s) found, {run.failures} problem(s): see the error lines above", sys.stderr)
    return 1 if run.failures else 0


def _write(msg: str, stream) -> None:
    tqdm.write(msg, file=stream)


def image_quality(img: LoadedImage, models: Models, args: RestoreOptions) -> QualityChoice:
    """The quality to tell the model and whether to project (restorer.infer.autoquality); a
    UserError naming the file when neither the tables nor the estimate can say."""
    try:
        return choose_quality(img.pixels, img.quality, img.is_jpeg, args.quality, models, args)
    except UserError as exc:
        raise UserError(f"{img.path}: {exc}" + ("" if img.is_jpeg else f" ({img.format})")) from None


def describe_choice(choice: QualityChoice, verbose: bool) -> str:
    """``quality 31 (why)`` for the per-photo line; ``-v`` adds the projection decision."""
    if choice.source == "--quality":
        why = "--quality"
    elif choice.source == "tables":
        why = "quantisation tables"
    elif choice.source == "earlier save":
        why = f"an earlier, stronger save found in the pixels; the tables say {choice.tables}"
    elif choice.source == "lattice":
        why = "a JPEG save found in the pixels: no JPEG tables"
    else:
        why = "estimated from the pixels: no JPEG tables"
    text = f"quality {choice.quality} ({why})"
    if verbose or not choice.project:
        text += "; projected onto the JPEG's quantisation set" if choice.project else "; not projected"
    return text


# -- the processing path: load (background) -> network + projection (this thread) -> write (background)
@dataclasses.dataclass
class Loaded:
    """A decoded input, with what its projection needs (read beside the network of another photo)."""

    img: LoadedImage
    target: Path
    started: float  # perf_counter when its loading began
    choice: QualityChoice  # the quality to tell the model (its lattice test runs beside the network)
    coefs: JpegCoefficients | None = None  # None: not a JPEG, --no-projection, or unreadable
    coefs_error: str | None = None  # why a JPEG's coefficients could not be read


@dataclasses.dataclass
class Restored:
    """What is written for one photo: the output pixels and metadata, and its summary line."""

    pixels: np.ndarray
    img: LoadedImage  # metadata only: its pixels are dropped once restored
    target: Path
    started: float
    line: str
    record: dict  # the photo's entry in --json output (its seconds added when written)


def _load(path: Path, target: Path, args: RestoreOptions, models: Models) -> Loaded:
    started = time.perf_counter()
    img = open_image(path, args.max_pixels)
    for note in img.notes:
        _write(f"warning: {path}: {note}", sys.stderr)
    loaded = Loaded(img, target, started, image_quality(img, models, args))
    if img.is_jpeg and img.data is not None and not args.no_projection:
        try:
            loaded.coefs = read_coefficients(img.data, decoded=(str(path), img.orientation))
        except UserError as exc:
            loaded.coefs_error = str(exc)
    return loaded


def _process(loaded: Loaded, models: Models, args: RestoreOptions) -> Restored:
    img, path, choice = loaded.img, loaded.img.path, loaded.choice
    quality, restorers = choice.quality, models.restorers
    restorer = choose_restorer(restorers, quality)
    w, h = img.size
    if restorer.covers(quality) or args.force:
        pixels = _apply(restorer, img, choice, args, loaded)
        action = ""
    else:
        lo, hi = restorer.quality_range or (1, 100)  # covers() is True when the range is unknown
        pixels, action = img.pixels, "; written unchanged (outside the trained range)"
        choice = dataclasses.replace(choice, project=False)
        _write(
            f"note: {path}: JPEG quality {quality} is outside the range {lo}-{hi} that {restorer.path.name} "
            f"was trained on: written unchanged (--force applies it anyway)",
            sys.stderr,
        )
    extras = [
        s
        for s in (
            "gray" if img.is_gray else "",
            "alpha kept" if img.alpha is not None else "",
            f"orientation {img.orientation} applied" if img.orientation != 1 else "",
        )
        if s
    ]
    chosen = f"; weights {restorer.describe()}" if len(restorers) > 1 or args.verbose else ""
    line = (
        f"{path} -> {loaded.target}: {w}x{h}, {describe_choice(choice, args.verbose)}{chosen}"
        f"{'; ' + ', '.join(extras) if extras else ''}{action}"
    )
    record = {
        "input": str(path),
        "output": str(loaded.target),
        "width": w,
        "height": h,
        **choice.as_dict(),
        "weights": str(restorer.path),
        "unchanged": bool(action),
    }
    meta = dataclasses.replace(img, pixels=np.empty((0,) * img.pixels.ndim, np.uint8), data=None)
    return Restored(pixels, meta, loaded.target, loaded.started, line, record)


def _finish(done: Restored, fmt: str, args: RestoreOptions) -> dict:
    img = done.img
    how = SaveOptions(fmt=fmt, icc_profile=img.icc_profile, exif=img.exif, overwrite=args.overwrite)
    notes = save_image(done.pixels, img.alpha, done.target, how)
    for note in notes:
        _write(f"warning: {img.path}: {note}", sys.stderr)
    seconds = time.perf_counter() - done.started
    _write(f"{done.line} [{seconds:.1f}s]", sys.stdout)
    return {**done.record, "seconds": round(seconds, 3)}


def _apply(
    restorer: Restorer, img: LoadedImage, choice: QualityChoice, args: RestoreOptions, loaded: Loaded
) -> np.ndarray:
    """The model on one decoded image, with a per-tile bar for big photos (minutes on a CPU),
    then, for a JPEG where ``choice`` allows it, the projection onto the file's own quantisation
    set (``--no-projection`` and a re-saved photo skip it): the one place every restored image
    passes through."""
    w, h = img.size
    with tqdm(
        total=w * h,
        unit="px",
        unit_scale=True,
        leave=False,
        file=sys.stderr,
        desc=img.path.name,
        disable=args.no_progress or w * h < 4_000_000,
    ) as tiles:
        restored = restorer.restore(img.pixels, choice.quality, progress=tiles.update)
    if not img.is_jpeg or args.no_projection or not choice.project:
        return restored
    if loaded.coefs is None:  # a JPEG the projection cannot read (CMYK, unusual sampling)
        log.warning("%s; output not projected", loaded.coefs_error)
        return restored
    return project_upright(restored, loaded.coefs, restorer.device)


if __name__ == "__main__":
    sys.exit(main())
