"""``restorer restore INPUT... -o OUT --weights W``: restore JPEG photos, any size, keeping metadata."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from restorer.errors import UserError, cli_entry, describe, setup_logging
from restorer.imageio import DEFAULT_MAX_PIXELS, OUTPUT_FORMATS, find_images, open_image, save_image
from restorer.infer.engine import DEFAULT_TILE, set_threads, choose_restorer, load_restorers, pick_device

log = logging.getLogger("restorer.restore")

EXAMPLES = """\
examples:
  restorer restore photo.jpg -o photo_restored.png --weights runs/demo/model.safetensors
  restorer restore holiday/ -o restored/ --weights runs/demo/model.safetensors
  restorer restore 'scans/**/*.jpg' -o restored/ --weights q10/ q30/ q50/   # nearest quality per image
  restorer restore big.jpg -o out/ --weights w.safetensors --tile 256 --device cpu
  restorer restore photo.jpg -o out/ --weights w.safetensors --quality 20 --overwrite

Outputs are lossless PNG (or --format tiff / jpeg) named after the input, written atomically;
an existing output is left alone unless --overwrite. EXIF orientation is applied (the output is
upright, Orientation reset to 1); ICC profile, EXIF and alpha are kept; grayscale stays grayscale.
Each unreadable input or weights file gets one 'error:' line; the rest are still processed, and
the exit status is 1 if anything failed (2 for a usage error or no usable weights).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="restorer restore", description="Remove JPEG artifacts from photos.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, or quoted globs")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output folder (or a file name when restoring a single image)")
    p.add_argument("--weights", nargs="+", required=True, metavar="W",
                   help="model.safetensors file(s) or folder(s) of them; with several, the one trained "
                        "nearest to each image's JPEG quality is used")
    p.add_argument("--quality", type=int, default=None,
                   help="JPEG quality to assume (default: estimated from each file's quantisation tables)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE,
                   help=f"tile side in pixels for bounded memory; 0 = whole image at once (default {DEFAULT_TILE})")
    p.add_argument("--tile-overlap", type=int, default=None,
                   help="context pixels around each tile (default: the model's receptive radius, "
                        "which makes tiled output equal to whole-image output)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster on recent CPUs/GPUs, "
                   "not bit-identical)")
    p.add_argument("--format", choices=sorted(OUTPUT_FORMATS), default=None,
                   help="output format (default png, or from the -o file name's extension)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders of folder inputs "
                   "(their structure is mirrored under OUT)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images declaring more pixels than this (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


_SUFFIX_FORMATS = {".png": "png", ".tif": "tiff", ".tiff": "tiff", ".jpg": "jpeg", ".jpeg": "jpeg"}


def _suffix_format(path: Path) -> Optional[str]:
    return _SUFFIX_FORMATS.get(path.suffix.lower())


@cli_entry
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.quality is not None and not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be 1..100, got {args.quality}")
    if args.tile < 0 or (args.tile_overlap is not None and args.tile_overlap < 0):
        raise UserError("--tile and --tile-overlap must be >= 0")
    if args.max_pixels <= 0:
        raise UserError("--max-pixels must be positive")
    failures = 0

    def err(msg: str) -> None:
        nonlocal failures
        failures += 1
        _write(f"error: {msg}", sys.stderr)

    set_threads(args.threads)
    device = pick_device(args.device)
    restorers, weight_errors = load_restorers(args.weights, device, args.tile, args.tile_overlap, args.bf16)
    for line in weight_errors:
        err(line)
    if not restorers:
        raise UserError("no usable weights among: " + " ".join(args.weights))

    found, input_errors = find_images(args.inputs, args.recursive)
    for line in input_errors:
        err(line)

    out = Path(args.output)
    single_file = (len(found) == 1 and len(args.inputs) == 1 and Path(args.inputs[0]).is_file()
                   and not out.is_dir() and not args.output.endswith(os.sep) and _suffix_format(out) is not None)
    fmt = args.format or (_suffix_format(out) if single_file else None) or "png"
    ext = OUTPUT_FORMATS[fmt][1]
    if not single_file and out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder (several inputs need an output folder)")

    targets: dict[Path, Path] = {}
    log.info("device %s; weights: %s", device, "; ".join(r.describe() for r in restorers))
    from tqdm import tqdm

    bar = tqdm(total=len(found), unit="img", disable=args.no_progress or len(found) < 2, file=sys.stderr)
    for path, rel in found:
        target = out if single_file else out / (str(rel) + ext)
        try:
            if target in targets:
                raise UserError(f"{path}: would write {target}, already written for {targets[target]} (rename one)")
            targets[target] = path
            if target.exists() and not args.overwrite:
                raise UserError(f"{target}: output exists (use --overwrite to replace it)")
            _restore_one(path, target, fmt, restorers, args)
        except UserError as exc:
            err(str(exc))
        except Exception as exc:  # keep going with the other images; RESTORER_DEBUG=1 for the traceback
            if os.environ.get("RESTORER_DEBUG"):
                raise
            err(f"{path}: failed ({describe(exc)})")
        bar.update(1)
    bar.close()
    if not found:
        _write("error: no input images", sys.stderr)
        return 1
    if failures:
        _write(f"{len(found)} image(s) found, {failures} problem(s): see the error lines above", sys.stderr)
    return 1 if failures else 0


def _write(msg: str, stream) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=stream)


def _restore_one(path: Path, target: Path, fmt: str, restorers, args) -> None:
    t0 = time.perf_counter()
    img = open_image(path, args.max_pixels)
    for note in img.notes:
        _write(f"warning: {path}: {note}", sys.stderr)
    if not img.is_jpeg:
        _write(f"warning: {path}: not a JPEG ({img.format}); restoring anyway", sys.stderr)
    quality, source = (args.quality, "--quality") if args.quality is not None else (img.quality, "quantisation tables")
    restorer = choose_restorer(restorers, quality)
    if restorer.conditioned and quality is None:
        quality, source = restorer.default_quality(), "unknown; middle of the trained range"
    from tqdm import tqdm

    w, h = img.size
    # a per-tile bar for big photos (minutes on a CPU); the per-file bar covers many small ones
    with tqdm(total=w * h, unit="px", unit_scale=True, leave=False, file=sys.stderr, desc=path.name,
              disable=args.no_progress or w * h < 4_000_000) as tiles:
        pixels = restorer.restore(img.pixels, quality, progress=tiles.update)
    notes = save_image(pixels, img.alpha, target, fmt=fmt, icc_profile=img.icc_profile, exif=img.exif,
                       overwrite=args.overwrite)
    for note in notes:
        _write(f"warning: {path}: {note}", sys.stderr)
    q_text = f"quality {quality} ({source})" if quality is not None else "quality unknown"
    extras = [s for s in ("gray" if img.is_gray else "", "alpha kept" if img.alpha is not None else "",
                          f"orientation {img.orientation} applied" if img.orientation != 1 else "") if s]
    chosen = f"; weights {restorer.describe()}" if len(restorers) > 1 or args.verbose else ""
    _write(f"{path} -> {target}: {w}x{h}, {q_text}{chosen}{'; ' + ', '.join(extras) if extras else ''} "
           f"[{time.perf_counter() - t0:.1f}s]", sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
