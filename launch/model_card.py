#!/usr/bin/env python
"""The model card of a weights file: what `restorer restore` gives on the BSDS500 test split.

For every test image and quality (RGB, 8-bit, peak 255, no border crop; mean of per-image values):
- **single**: the image compressed once by Pillow at q (4:2:0, baseline);
- **double**: a camera-like first save at q90, the photo cropped by 4 px at the top and left (so the
  second 8x8 grid is shifted against the first, as when a photo is cropped between two saves), then
  saved again at q (the chain ``90>s4>q``); the reference is the original cropped the same way;
- **chain**: the real-world chains of ``bench/realworld.py`` (``30>80``, ``30>s4>80``,
  ``40>x0.75>85``, ``90>30``; ``restorer.data.degrade.parse_chain`` syntax), first 100 images.
Each restored image goes through what `restore` does by default (``--quality auto``): the quality
the model is told and whether its output is projected onto the file's quantisation set are chosen
by ``restorer.infer.autoquality.choose`` (the tables and the projection, or, when the pixels carry
an earlier, stronger save's quantisation lattice, that save's quality without projection); "raw
net gain" is the network's output before any projection.
Columns: JPEG PSNR, restored PSNR, gain, raw-network gain, SSIM and PSNR-B (JPEG -> restored), and
the mean colour shift (mean of restored - original per channel, in 8-bit levels; the largest
channel's, signed).

The release step between training and launch/package_weights.py (``make release-weights``): the
``--json`` it writes is the card that package_weights.py puts into restorer/weights/NAME.json.

examples:
  .venv/bin/python launch/model_card.py --weights fast --json restorer/weights/fast.card.json
  .venv/bin/python launch/model_card.py --weights runs/release_fast/model.safetensors --limit 20

The last line is ``min_gain_db: <the smallest gain over all rows>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from restorer.data.degrade import apply_chain, parse_chain
from restorer.errors import cli_entry
from restorer.estimator import Estimator, load_estimator
from restorer.fsutil import atomic_write_text
from restorer.imageio import open_image
from restorer.infer.autoquality import choose, tables_quality
from restorer.infer.engine import load_restorers, pick_device
from restorer.infer.evaluate import image_metrics, list_images, resolve_images_dir
from restorer.infer.options import resolve_precision
from restorer.infer.projection import project

REPO = Path(__file__).resolve().parents[1]
QUALITIES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
DOUBLE_QUALITIES = (30, 50, 70, 90)
CHAINS = ("30>80", "30>s4>80", "40>x0.75>85", "90>30")
FIRST_QUALITY, CROP = 90, 4
Key = tuple[str, int | str]


def jobs() -> list[tuple[str, int | str, str]]:
    """(case, the table's q column, chain spec) of every row."""
    return (
        [("single", q, f"{q}") for q in QUALITIES]
        + [("double", q, f"{FIRST_QUALITY}>s{CROP}>{q}") for q in DOUBLE_QUALITIES]
        + [("chain", spec, spec) for spec in CHAINS]
    )


def cases(ref: np.ndarray, spec: str):
    """(reference, decoded JPEG pixels, JPEG bytes) of one case."""
    jpeg, clean, data = apply_chain(ref, parse_chain(spec))
    return clean, jpeg, data


def build_parser() -> argparse.ArgumentParser:
    head, _, rest = (__doc__ or "").strip().partition("\n\n")
    parser = argparse.ArgumentParser(
        description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", default="fast", help="fast | quality | a model.safetensors")
    parser.add_argument("--images", default=str(REPO.parent / "shared/datasets/BSR"), help="BSR root or image folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="first N images (default: all)")
    parser.add_argument("--double-limit", type=int, default=100, help="first N images for the double and chain rows")
    parser.add_argument("--estimator", default=None, help="quality estimator (default: the packaged one)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="write the card's figures here")
    return parser


def case_row(restorer, estimator: Estimator, ref_full: np.ndarray, spec: str) -> dict[str, float]:
    """The figures of one image in one case, as `restore` would treat the JPEG by default."""
    ref, jpeg, data = cases(ref_full, spec)
    choice = choose(jpeg, tables_quality(data), None, estimator, is_jpeg=True)
    raw = restorer.restore(jpeg, choice.quality)
    out = project(raw, data) if choice.project else raw
    jm, rm = image_metrics(jpeg, ref), image_metrics(out, ref)
    raw_psnr = image_metrics(raw, ref, which=("psnr",))["psnr_rgb"]
    shift = (out.astype(np.float64) - ref).reshape(-1, 3).mean(axis=0)
    jshift = (jpeg.astype(np.float64) - ref).reshape(-1, 3).mean(axis=0)
    return {
        "jpeg_psnr": jm["psnr_rgb"],
        "psnr": rm["psnr_rgb"],
        "raw_psnr": raw_psnr,
        "jpeg_ssim": jm["ssim_rgb"],
        "ssim": rm["ssim_rgb"],
        "jpeg_psnrb": jm["psnrb_rgb"],
        "psnrb": rm["psnrb_rgb"],
        "shift_r": shift[0],
        "shift_g": shift[1],
        "shift_b": shift[2],
        "told_quality": choice.quality,
        "projected": float(choice.project),
        "jpeg_shift_r": jshift[0],
        "jpeg_shift_g": jshift[1],
        "jpeg_shift_b": jshift[2],
        "images": 1,
    }


def measure(restorer, estimator: Estimator, refs: list[Path], double_limit: int) -> dict[Key, dict[str, float]]:
    """Sums of every case's figures over the images (the double and chain rows: the first ``double_limit``)."""
    sums: dict[Key, dict[str, float]] = {}
    for i, path in enumerate(tqdm(refs, unit="img", file=sys.stderr)):
        ref_full = open_image(path).pixels
        for kind, q, spec in jobs():
            if kind != "single" and i >= double_limit:
                continue
            row = case_row(restorer, estimator, ref_full, spec)
            acc = sums.setdefault((kind, q), {k: 0.0 for k in row})
            for k, v in row.items():
                acc[k] += float(v)
    return sums


def table_rows(sums: dict[Key, dict[str, float]]) -> list[dict]:
    """The card's rows: the means of each case."""
    table: list[dict] = []
    for (kind, q), acc in sums.items():
        n = acc.pop("images")
        m = {k: v / n for k, v in acc.items()}
        shift = max((m["shift_r"], m["shift_g"], m["shift_b"]), key=abs)
        table.append(
            {
                "case": kind,
                "quality": q,
                "images": int(n),
                "jpeg_psnr": m["jpeg_psnr"],
                "psnr": m["psnr"],
                "gain": m["psnr"] - m["jpeg_psnr"],
                "raw_gain": m["raw_psnr"] - m["jpeg_psnr"],
                "jpeg_ssim": m["jpeg_ssim"],
                "ssim": m["ssim"],
                "jpeg_psnrb": m["jpeg_psnrb"],
                "psnrb": m["psnrb"],
                "colour_shift": shift,
                "colour_shift_rgb": [m["shift_r"], m["shift_g"], m["shift_b"]],
                "told_quality": m["told_quality"],
                "projected": m["projected"],
                "jpeg_colour_shift_rgb": [m["jpeg_shift_r"], m["jpeg_shift_g"], m["jpeg_shift_b"]],
            }
        )
    return table


def print_table(table: list[dict], heading: str) -> None:
    print(heading)
    print(
        "| case | q | images | JPEG dB | restored dB | gain | raw net gain | SSIM | PSNR-B dB | colour shift "
        "| told q | projected |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|")
    for r in table:
        print(
            f"| {r['case']} | {r['quality']} | {r['images']} | {r['jpeg_psnr']:.2f} | {r['psnr']:.2f} | "
            f"{r['gain']:+.2f} | {r['raw_gain']:+.2f} | {r['jpeg_ssim']:.3f} -> {r['ssim']:.3f} | "
            f"{r['jpeg_psnrb']:.2f} -> {r['psnrb']:.2f} | {r['colour_shift']:+.2f} | {r['told_quality']:.1f} "
            f"| {100 * r['projected']:.0f}% |"
        )


def card_doc(args: argparse.Namespace, table: list[dict], images: int, estimator: Estimator, device, precision) -> dict:
    """The card as --json writes it: the protocol and the rows."""
    return {
        "protocol": {
            "images": f"BSDS500 {args.split} ({images} images; double and chain rows: first "
            f"{min(images, args.double_limit)})",
            "metric": "RGB, 8-bit peak 255, no border crop, mean of per-image values",
            "jpeg": "Pillow, 4:2:0, baseline",
            "double": f"q{FIRST_QUALITY}, crop {CROP} px top/left, then q",
            "chain": "restorer.data.degrade.parse_chain specs; reference through the same crops/resizes",
            "restored": "restore's default (--quality auto): told quality and projection by "
            "restorer.infer.autoquality (tables, or an earlier save's lattice)",
            "estimator": estimator.describe(),
            "device": str(device),
            "precision": precision.value,
        },
        "rows": table,
    }


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    precision = resolve_precision("auto", device)
    restorers, errors = load_restorers([args.weights], device, precision=str(precision.value))
    if errors or not restorers:
        sys.exit("error: " + "; ".join(errors or ["no weights"]))
    restorer, estimator = restorers[0], load_estimator(args.estimator, device)
    refs = list_images(resolve_images_dir(Path(args.images), args.split))[: args.limit]
    t0 = time.perf_counter()
    table = table_rows(measure(restorer, estimator, refs, args.double_limit))
    seconds = time.perf_counter() - t0
    print_table(
        table,
        f"\n{restorer.describe()}; estimator {estimator.describe()}; {device}, {precision.value}; BSDS500 "
        f"{args.split}, RGB, no border crop; double = q{FIRST_QUALITY} then cropped {CROP} px then q; "
        f"{seconds / 60:.1f} min",
    )
    if args.json:
        doc = card_doc(args, table, len(refs), estimator, device, precision)
        atomic_write_text(args.json, json.dumps(doc, indent=1) + "\n")
    print(f"min_gain_db: {min(r['gain'] for r in table):+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
