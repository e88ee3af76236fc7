"""``restorer compare IMAGE --weights W --quality 10 -o panel.png``: JPEG | restored | original.

IMAGE is the clean original; it is compressed with Pillow at ``--quality`` (or ``--jpeg FILE``
supplies an existing JPEG of it), restored, and a crop of the three is shown side by side,
enlarged with nearest-neighbour (so pixels and 8x8 blocks stay visible), each captioned with its
PSNR against the original over the whole image and over the crop. The crop is ``--crop x,y,w,h``
or, automatically, the window where the JPEG's error is largest (aligned to the 8x8 JPEG grid).
``--versus-tables`` adds, before the restored pane, the same model told what the JPEG's
quantisation tables say and projected (``--quality-rule tables``): on a re-saved JPEG, the
difference the default rule makes.

A ``--jpeg`` that is not a JPEG of IMAGE (another size, or a PSNR to IMAGE below
``MIN_JPEG_PSNR`` dB: a different photo) is an error, not a meaningless panel. The panel is never
written over IMAGE or the ``--jpeg`` file, even with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from restorer import metrics
from restorer.config import at_least, option, options_parser, within
from restorer.data.degrade import decoded_jpeg
from restorer.errors import UserError, cli_entry, describe
from restorer.imageio import SaveOptions, open_image, save_image
from restorer.infer.engine import choose_restorer
from restorer.infer.evaluate import uint8_tensor
from restorer.infer.options import (
    InferOptions,
    InputFiles,
    Models,
    OverwriteOptions,
    QualityOptions,
    choose_quality,
    load_models,
    parse_options,
    project_output,
    report_weight_errors,
)

# Below this PSNR to the original, a --jpeg is not a JPEG of it (q5 of a real photo is ~22 dB;
# a different photo of the same size, ~13 dB).
MIN_JPEG_PSNR = 15.0

PROG = "restorer compare"
DESCRIPTION = "Side-by-side panel: JPEG | restored | original."

EXAMPLES = """\
examples:
  restorer compare photo.png --weights runs/demo/model.safetensors --quality 10 -o panel.png
  restorer compare photo.png --weights w.safetensors --quality 20 --crop 120,80,96,96 --zoom 4 -o panel.png
  restorer compare photo.png --jpeg photo_q10.jpg --weights w.safetensors -o panel.png
  restorer compare photo.png --jpeg resaved.jpg --weights quality --versus-tables -o panel.png
"""


@dataclasses.dataclass(kw_only=True)
class CompareOptions(InferOptions, QualityOptions, OverwriteOptions):
    """``restorer compare``'s options: the shared ones (restorer.infer.options) and these."""

    image: str = option(help="the clean original image", positional=True, metavar="IMAGE")
    jpeg: str | None = option(None, "an existing JPEG of IMAGE to use instead of compressing it", metavar="FILE")
    output: str = option(help="panel PNG to write", short="-o", metavar="PNG")
    crop: str | None = option(None, "crop box in pixels (default: automatic)", metavar="X,Y,W,H")
    crop_size: int = option(96, "side of the automatic crop", check=at_least(8))
    zoom: int = option(3, "nearest-neighbour enlargement", check=within(1, 16))
    versus_tables: bool = option(
        False,
        "also show the model told the JPEG tables' quality, projected (--quality-rule tables): what "
        "the default rule changes on a re-saved JPEG",
        switch=True,
    )


def parse(argv: Sequence[str] | None = None) -> CompareOptions:
    return parse_options(CompareOptions, argv, PROG, DESCRIPTION, EXAMPLES)


def build_parser() -> argparse.ArgumentParser:
    """The command line parser (for --help and the option checks of tests/test_options.py)."""
    return options_parser(CompareOptions, PROG, DESCRIPTION, EXAMPLES)


def parse_crop(text: str, width: int, height: int) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--crop must be X,Y,W,H in pixels, got {text!r}") from None
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise UserError(f"--crop {text} does not fit inside the {width}x{height} image")
    return x, y, w, h


def auto_crop(error: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """The size x size window (top-left on the 8-px grid) with the largest summed ``error``."""
    h, w = error.shape
    cw, ch = min(size, w), min(size, h)
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = error.cumsum(0).cumsum(1)
    best, best_xy = -1.0, (0, 0)
    for y in list(range(0, h - ch + 1, 8)) or [0]:
        for x in list(range(0, w - cw + 1, 8)) or [0]:
            s = integral[y + ch, x + cw] - integral[y, x + cw] - integral[y + ch, x] + integral[y, x]
            if s > best:
                best, best_xy = s, (x, y)
    return best_xy[0], best_xy[1], cw, ch


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB, peak 255) of two uint8 images: restorer.metrics.psnr, the one used by eval."""
    return float(metrics.psnr(uint8_tensor(a), uint8_tensor(b)))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled font: no download
    except Exception:
        return ImageFont.load_default()


def make_panel(crops: list[np.ndarray], captions: list[list[str]], zoom: int, gap: int = 8) -> Image.Image:
    tiles = [
        Image.fromarray(c).convert("RGB").resize((c.shape[1] * zoom, c.shape[0] * zoom), Image.Resampling.NEAREST)
        for c in crops
    ]
    font = _font(max(12, min(18, tiles[0].width // 18)))
    line_h = int(font.getbbox("Ag")[3] + 6) if hasattr(font, "getbbox") else 16
    cap_h = line_h * max(len(c) for c in captions) + 8
    width = sum(t.width for t in tiles) + gap * (len(tiles) + 1)
    height = tiles[0].height + cap_h + 2 * gap
    panel = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(panel)
    x = gap
    for tile, lines in zip(tiles, captions):
        panel.paste(tile, (x, gap))
        for i, line in enumerate(lines):
            tw = draw.textlength(line, font=font)
            draw.text((x + (tile.width - tw) / 2, gap + tile.height + 4 + i * line_h), line, fill="black", font=font)
        x += tile.width + gap
    return panel


@dataclasses.dataclass
class Inputs:
    """The original, its JPEG (pixels and where its bytes are), and what the model is told."""

    ref: np.ndarray
    jpeg: np.ndarray
    source: Path | bytes  # the --jpeg file, or the bytes compressed here
    label: str
    quality: int | None  # from the tables of --jpeg, or the quality compressed at
    given: int | None  # --quality with --jpeg
    is_jpeg: bool


def read_inputs(args: CompareOptions) -> Inputs:
    """IMAGE, and --jpeg (checked to be a JPEG of IMAGE) or IMAGE compressed at --quality (auto: 10)."""
    ref = open_image(args.image, args.max_pixels).pixels
    if not args.jpeg:
        quality = args.quality or 10
        jpeg, data = decoded_jpeg(ref, quality)
        return Inputs(ref, jpeg, data, f"JPEG q{quality}", quality, None, True)
    jimg = open_image(args.jpeg, args.max_pixels)
    if jimg.pixels.shape != ref.shape:
        raise UserError(f"{args.jpeg}: its size or colour mode differs from {args.image}")
    psnr = _psnr(jimg.pixels, ref)
    if psnr < MIN_JPEG_PSNR:
        raise UserError(
            f"{args.jpeg}: PSNR {psnr:.2f} dB to {args.image}, below {MIN_JPEG_PSNR:.0f} dB: not a JPEG of that image"
        )
    label = f"JPEG (q{jimg.quality})" if jimg.quality else "JPEG"
    return Inputs(ref, jimg.pixels, Path(args.jpeg), label, jimg.quality, args.quality, jimg.is_jpeg)


def restore_input(inp: Inputs, models: Models, args: CompareOptions) -> tuple[np.ndarray, str, str]:
    """The restored image (projected as ``restore`` would), the weights used, and what they were told."""
    try:
        choice = choose_quality(inp.jpeg, inp.quality, inp.is_jpeg, inp.given, models, args)
    except UserError as exc:
        raise UserError(f"{args.jpeg}: {exc}") from None
    restorer = choose_restorer(models.restorers, choice.quality)
    try:
        restored = restorer.restore(inp.jpeg, choice.quality)
        restored = project_output(restored, inp.source, args) if choice.project else restored
    except Exception as exc:  # RuntimeError (out of memory, ...): one line, not a traceback
        if os.environ.get("RESTORER_DEBUG"):
            raise
        raise UserError(f"{args.image}: failed ({describe(exc)})") from None
    return restored, restorer.describe(), f"told q{choice.quality}: {choice.why}"


def panel_of(inp: Inputs, panes: list[tuple[str, np.ndarray]], args: CompareOptions) -> tuple[Image.Image, str]:
    """The panel of the crop (--crop, or where the JPEG's error is largest) and its crop box:
    the JPEG, each (caption, restored image) of ``panes``, the original."""
    ref, jpeg = inp.ref, inp.jpeg
    h, w = ref.shape[:2]
    if args.crop:
        box = parse_crop(args.crop, w, h)
    else:
        diff = (jpeg.astype(np.float64) - ref.astype(np.float64)) ** 2
        box = auto_crop(diff if diff.ndim == 2 else diff.mean(axis=2), args.crop_size)
    x, y, cw, ch = box
    ref_crop = ref[y : y + ch, x : x + cw]
    crops, cap = [], []
    for label, image in [(inp.label, jpeg), *panes]:
        crops.append(image[y : y + ch, x : x + cw])
        cap.append([label, f"{_psnr(image, ref):.2f} dB (crop {_psnr(crops[-1], ref_crop):.2f})"])
    crops.append(ref_crop)
    cap.append(["original", f"crop {x},{y},{cw},{ch}"])
    return make_panel(crops, cap, args.zoom), f"{x},{y},{cw},{ch}"


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.output)
    InputFiles(Path(p) for p in (args.image, args.jpeg) if p).check(out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: output exists (use --overwrite to replace it)")
    if args.versus_tables and args.jpeg and args.quality:
        raise UserError("--versus-tables compares how the quality is chosen; drop --quality to use it")
    models = load_models(args)
    report_weight_errors(models, lambda line: print(f"error: {line}", file=sys.stderr))
    inp = read_inputs(args)
    panes, lines = [], []
    if args.versus_tables:
        tables = dataclasses.replace(args, quality_rule="tables")
        restored, _, told = restore_input(inp, models, tables)
        panes.append(("restored, tables rule", restored))
        lines.append(f"tables rule {_psnr(restored, inp.ref):.2f} dB ({told})")
    restored, weights, told = restore_input(inp, models, args)
    panes.append(("restored, default rule" if args.versus_tables else "restored", restored))
    lines.append(f"restored {_psnr(restored, inp.ref):.2f} dB ({weights}; {told})")
    panel, box = panel_of(inp, panes, args)
    save_image(np.asarray(panel), None, out, SaveOptions(fmt="png", overwrite=args.overwrite))
    print(f"{out}: {inp.label} {_psnr(inp.jpeg, inp.ref):.2f} dB, {', '.join(lines)}, crop {box}")
    return 1 if models.errors else 0


if __name__ == "__main__":
    sys.exit(main())
