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
  rule of :mod:`restorer.infer.autoquality`: the file's quantisation tables, unless the pixel
  estimate says the photo went through an earlier, stronger compression or a resize (then the
  estimate, and no projection); a file that is not a JPEG (a PNG or WebP screenshot of one) gets
  the estimate. The value, its source and why are printed per photo; ``--json`` records them with
  the projection decision. ``--quality-rule tables`` is the behaviour before the estimator (a
  non-JPEG without ``--quality`` is then skipped with one line, exit status 1).
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
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from restorer.errors import UserError, cli_entry, describe
from restorer.fsutil import atomic_write_text
from restorer.imageio import (
    IMAGE_SUFFIXES,
    OUTPUT_FORMATS,
    LoadedImage,
    find_images,
    format_for_suffix,
    open_image,
    save_image,
)
from restorer.infer.autoquality import QualityChoice
from restorer.infer.engine import Restorer, choose_restorer
from restorer.infer.options import (
    InputFiles,
    Models,
    add_model_args,
    choose_quality,
    load_models,
    parse_args,
    report_weight_errors,
)
from restorer.infer.pipeline import run_photos
from restorer.infer.projection import JpegCoefficients, project_upright, read_coefficients

log = logging.getLogger("restorer.infer.restore")

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="restorer restore",
        description="Remove JPEG artifacts from photos.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, or quoted globs")
    p.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="OUT",
        help=f"output file (a name ending in an image suffix; one input image only) or folder; "
        f"default: NAME{RESTORED_TAG}.png beside each input",
    )
    add_model_args(p)
    p.add_argument(
        "--quality",
        type=quality_arg,
        default=None,
        metavar="auto|Q",
        help="JPEG quality to tell the model: auto (default; the JPEG's quantisation tables, or the pixel "
        "estimate where the photo was compressed harder before or is not a JPEG: see --quality-rule) or 1..100",
    )
    p.add_argument(
        "--json", default=None, metavar="PATH", help="write one record per photo: quality used and why, projection"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="apply the weights even outside the JPEG quality range they were trained on "
        "(default: such images are written unchanged, with a note)",
    )
    p.add_argument(
        "--format",
        choices=sorted(OUTPUT_FORMATS),
        default=None,
        help="output format (default: from the -o file name's suffix, else png)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input)")
    p.add_argument(
        "--recursive",
        action="store_true",
        help="descend into sub-folders of folder inputs (their structure is mirrored under OUT)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="one photo at a time: no reading or writing of the neighbours while the network runs "
        "(the same output files; slower on folders, and only one photo in memory instead of two)",
    )
    return p


def quality_arg(text: str) -> int | None:
    """``--quality``: ``auto`` -> None (the rule decides), else the number."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number 1..100, got {text!r}") from None


class OutputPlan:
    """Where each input's output goes, decided once from ``-o`` and ``--format`` (see the module
    doc); raises UserError for a contradiction before anything is read or written."""

    def __init__(self, output: str | None, fmt: str | None, n_images: int):
        self.beside = output is None
        self.out = None if output is None else Path(output)
        self.single_file = False
        if self.out is not None:
            names_folder = output.endswith(("/", os.sep)) or self.out.is_dir()
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


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if args.quality is not None and not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be 1..100, got {args.quality}")
    failures = 0

    def err(msg: str) -> None:
        nonlocal failures
        failures += 1
        _write(f"error: {msg}", sys.stderr)

    found, input_errors = find_images(args.inputs, args.recursive)
    skipped = set(earlier_outputs(found, args.inputs))
    found = [(p, rel) for p, rel in found if p not in skipped]
    if skipped:
        _write(
            f"note: skipped {len(skipped)} earlier output(s) named *{RESTORED_TAG}.* in the input folders", sys.stderr
        )
    plan = OutputPlan(args.output, args.format, len(found))

    models = load_models(args)
    report_weight_errors(models, err)
    for line in input_errors:
        err(line)

    inputs = InputFiles(p for p, _ in found)
    targets: dict[Path, Path] = {}
    records: list[dict] = []
    from tqdm import tqdm

    bar = tqdm(total=len(found), unit="img", disable=args.no_progress or len(found) < 2, file=sys.stderr)

    def load(item: tuple[Path, Path]) -> Loaded:
        path, rel = item
        target = plan.target(path, rel)
        inputs.check(target)
        if target in targets:
            raise UserError(f"{path}: would write {target}, already written for {targets[target]} (rename one)")
        targets[target] = path
        if target.exists() and not args.overwrite:
            raise UserError(f"{target}: output exists (use --overwrite to replace it)")
        return _load(path, target, args)

    def finish(done: Restored) -> None:
        records.append(_finish(done, plan.fmt, args))
        bar.update(1)

    def failed(item: tuple[Path, Path], exc: BaseException) -> None:
        bar.update(1)
        if isinstance(exc, UserError):
            err(str(exc))
            return
        if os.environ.get("RESTORER_DEBUG"):  # keep going with the other images unless debugging
            raise exc
        err(f"{item[0]}: failed ({describe(exc)})")

    run_photos(found, load, lambda ld: _process(ld, models, args), finish, failed, not args.sequential)
    bar.close()
    if args.json:
        atomic_write_text(Path(args.json), json.dumps({"photos": records}, indent=1) + "\n")
    if not found:
        _write("error: no input images", sys.stderr)
        return 1
    if failures:
        _write(f"{len(found)} image(s) found, {failures} problem(s): see the error lines above", sys.stderr)
    return 1 if failures else 0


def _write(msg: str, stream) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=stream)


def image_quality(img: LoadedImage, models: Models, args) -> QualityChoice:
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
        why = "quantisation tables" + ("" if choice.estimate is None else f", the pixels agree: q{choice.estimate:.0f}")
    elif choice.tables is None:
        why = "estimated from the pixels: no JPEG tables"
    else:
        why = f"estimated from the pixels; the tables say {choice.tables}: an earlier, stronger compression or a resize"
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


def _load(path: Path, target: Path, args) -> Loaded:
    started = time.perf_counter()
    img = open_image(path, args.max_pixels)
    for note in img.notes:
        _write(f"warning: {path}: {note}", sys.stderr)
    loaded = Loaded(img, target, started)
    if img.is_jpeg and img.data is not None and not args.no_projection:
        try:
            loaded.coefs = read_coefficients(img.data, decoded=(str(path), img.orientation))
        except UserError as exc:
            loaded.coefs_error = str(exc)
    return loaded


def _process(loaded: Loaded, models: Models, args) -> Restored:
    img, path = loaded.img, loaded.img.path
    choice = image_quality(img, models, args)
    quality, restorers = choice.quality, models.restorers
    restorer = choose_restorer(restorers, quality)
    w, h = img.size
    if restorer.covers(quality) or args.force:
        pixels = _apply(restorer, img, choice, args, loaded)
        action = ""
    else:
        lo, hi = restorer.quality_range  # covers() is True when the range is unknown
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


def _finish(done: Restored, fmt: str, args) -> dict:
    img = done.img
    notes = save_image(
        done.pixels,
        img.alpha,
        done.target,
        fmt=fmt,
        icc_profile=img.icc_profile,
        exif=img.exif,
        overwrite=args.overwrite,
    )
    for note in notes:
        _write(f"warning: {img.path}: {note}", sys.stderr)
    seconds = time.perf_counter() - done.started
    _write(f"{done.line} [{seconds:.1f}s]", sys.stdout)
    return {**done.record, "seconds": round(seconds, 3)}


def _apply(restorer: Restorer, img: LoadedImage, choice: QualityChoice, args, loaded: Loaded) -> np.ndarray:
    """The model on one decoded image, with a per-tile bar for big photos (minutes on a CPU),
    then, for a JPEG where ``choice`` allows it, the projection onto the file's own quantisation
    set (``--no-projection`` and a re-saved photo skip it): the one place every restored image
    passes through."""
    from tqdm import tqdm

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
