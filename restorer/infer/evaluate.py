"""``restorer eval``: PSNR / SSIM / PSNR-B of JPEG and restored images against references.

Protocol (stated in every table): each reference image is compressed with Pillow at each
``--quality`` (``degrade.jpeg_roundtrip``, 4:2:0 chroma subsampling, baseline, the encoder of the
published BSDS500/LIVE1 JPEG rows), restored as ``restore`` would (the quality told to the model
and the projection decided by ``--quality-rule``, ``auto`` by default, restorer.infer.autoquality;
``--json`` rows record both), and rounded to 8 bits like a saved output. Metrics
are computed per image, then averaged per quality (mean of per-image values, not PSNR of the mean
MSE), on RGB and on BT.601 Y (Y = 16 + 65.481 R + 128.553 G + 24.966 B for RGB in [0, 1], then
/255, not rounded), peak 255, after cropping ``--crop-border`` pixels from each side (default 0).
PSNR-B (Yim & Bovik 2011) uses the 8x8 grid of the JPEG (shifted by the crop).
With ``--jpeg-dir``, already-compressed JPEGs are paired with the references by base name and
grouped by the quality estimated from their quantisation tables.
``eval`` measures the model at every quality asked for, also outside the range it was trained on
(``restore`` would pass such images through unchanged); the device and the precision used are
logged and recorded in ``--json`` (bf16 is not bit-identical to fp32).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from restorer import metrics
from restorer.config import at_least, option, options_parser
from restorer.data import urlio
from restorer.data.degrade import SUBSAMPLING, decoded_jpeg
from restorer.data.urlio import scheme as urlio_scheme
from restorer.errors import UserError, cli_entry, describe, first_line
from restorer.fsutil import atomic_write_text, jsonable
from restorer.imageio import IMAGE_SUFFIXES, open_image
from restorer.infer.engine import choose_restorer
from restorer.infer.options import (
    QUALITY_CHECK,
    InferOptions,
    Models,
    choose_quality,
    load_models,
    parse_options,
    project_output,
    report_weight_errors,
)

log = logging.getLogger("restorer.infer.evaluate")

EXAMPLES = """\
examples:
  restorer eval --weights runs/demo/model.safetensors --images data/BSR/BSDS500/data/images/test --quality 10 20 30 40
  restorer eval --weights fast --images data/BSR --quality 10 20 30 40 --precision fp32   # a shipped model
  restorer eval --weights none --images data/BSR --quality 10 20          # plain JPEG baseline (BSR root ok)
  restorer eval --weights w.safetensors --images refs/ --jpeg-dir jpegs/ --csv per_image.csv
  restorer eval --weights q10/ q20/ q30/ q40/ --images refs/ --crop-border 8 --json results.json
"""

PROG = "restorer eval"
DESCRIPTION = "PSNR / SSIM / PSNR-B of JPEG and restored images against references."
METRICS = ("psnr", "ssim", "psnrb")
SPACES = ("rgb", "y")


@dataclasses.dataclass(kw_only=True)
class EvalOptions(InferOptions):
    """``restorer eval``'s options: the shared ones (restorer.infer.options) and these."""

    identity: bool = option(False, "same as --weights none", switch=True)
    images: str = option(
        help="folder of reference images, or a BSR/BSDS500 root (uses --split); also s3:// or gs:// "
        "(copied to a temporary folder first)",
        metavar="DIR",
    )
    split: str = option("test", "BSDS500 split when --images is a BSR root")
    quality: list[int] = option([10, 20, 30, 40], "JPEG qualities to compress at, 1..100", check=QUALITY_CHECK)
    jpeg_dir: str | None = option(
        None,
        "use these already-compressed JPEGs (matched to references by base name) instead of compressing",
        metavar="DIR",
    )
    subsampling: str = option("4:2:0", "chroma subsampling", choices=tuple(sorted(SUBSAMPLING)))
    crop_border: int = option(0, "pixels cropped from each side before metrics", check=at_least(0))
    metrics: list[str] = option(list(METRICS), "metrics to compute", choices=METRICS)
    limit: int | None = option(None, "only the first N images (sorted by name)", check=at_least(1))
    json: str | None = option(None, "write per-image results and means as JSON", metavar="PATH")
    csv: str | None = option(None, "write per-image results as CSV", metavar="PATH")


def parse(argv: Sequence[str] | None = None) -> EvalOptions:
    opts = parse_options(EvalOptions, argv, PROG, DESCRIPTION, EXAMPLES)
    if opts.identity:
        opts.weights = ["none"]
    return opts


def build_parser() -> argparse.ArgumentParser:
    """The command line parser (for --help and the option checks of tests/test_options.py)."""
    return options_parser(EvalOptions, PROG, DESCRIPTION, EXAMPLES)


def resolve_images_dir(path: Path, split: str = "test") -> Path:
    """A folder of images as is; a BSR root / BSDS500 folder / data folder -> images/<split>."""
    if not path.is_dir():
        raise UserError(f"{path}: not a folder")
    if any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.iterdir() if f.is_file()):
        return path
    for sub in ("BSDS500/data/images", "data/images", "images"):
        cand = path / sub / split
        if cand.is_dir():
            return cand
    raise UserError(f"{path}: no images here, and no BSDS500/data/images/{split} below")


def fetch_remote_images(url: str, split: str, dest: Path, limit: int | None = None) -> Path:
    """``--images s3://bucket/prefix`` (or gs://): the images of that folder -- or of its
    ``BSDS500/data/images/<split>`` -- listed through fsspec and copied through
    :mod:`restorer.data.urlio` (its timeouts and retries) into ``dest``, which is returned."""
    fs, root = urlio.filesystem(url)
    base = url.rstrip("/")
    for sub in ("", "/BSDS500/data/images/" + split, "/data/images/" + split, "/images/" + split):
        try:
            names = sorted(
                p for p in fs.ls(root.rstrip("/") + sub, detail=False) if Path(p).suffix.lower() in IMAGE_SUFFIXES
            )
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UserError(f"{base + sub}: cannot list ({first_line(exc)})") from None
        if names:
            dest.mkdir(parents=True, exist_ok=True)
            for name in names[:limit]:
                try:
                    (dest / Path(name).name).write_bytes(urlio.read_bytes(f"{base}{sub}/{Path(name).name}"))
                except OSError as exc:
                    raise UserError(str(exc)) from None
            return dest
    raise UserError(f"{url}: no images here, and no BSDS500/data/images/{split} below")


def list_images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def uint8_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 [H, W] or [H, W, C] -> float64 [1, C, H, W] in [0, 1] (what restorer.metrics takes)."""
    t = torch.from_numpy(np.array(a, dtype=np.uint8, copy=True))
    t = t.unsqueeze(-1) if t.ndim == 2 else t
    return t.permute(2, 0, 1).unsqueeze(0).double().div(255)


def image_metrics(test: np.ndarray, ref: np.ndarray, crop: int = 0, which=METRICS) -> dict[str, float]:
    """PSNR, SSIM, PSNR-B on RGB (or gray) and Y of one uint8 image against its reference."""
    x, r = uint8_tensor(test), uint8_tensor(ref)
    x, r = metrics.crop_border(x, crop), metrics.crop_border(r, crop)
    offset = ((-crop) % 8, (-crop) % 8)
    out = {}
    for space in SPACES:
        a, b = (x, r) if space == "rgb" else (metrics.rgb_to_y(x), metrics.rgb_to_y(r))
        if "psnr" in which:
            out[f"psnr_{space}"] = float(metrics.psnr(a, b))
        if "ssim" in which:
            out[f"ssim_{space}"] = float(metrics.ssim(a, b))
        if "psnrb" in which:
            out[f"psnrb_{space}"] = float(metrics.psnr_b(a, b, offset=offset))
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(rows: list[dict], identity: bool, which=METRICS) -> list[dict]:
    """Mean of per-image values for each quality."""
    by_q: dict[int, list[dict]] = {}
    for row in rows:
        by_q.setdefault(row["quality"], []).append(row)
    out = []
    for q in sorted(by_q):
        group = by_q[q]
        s: dict = {"quality": q, "images": len(group)}
        for space in SPACES:
            for m in which:
                s[f"jpeg_{m}_{space}"] = _mean([g[f"jpeg_{m}_{space}"] for g in group])
                if not identity:
                    s[f"restored_{m}_{space}"] = _mean([g[f"restored_{m}_{space}"] for g in group])
            if not identity and "psnr" in which:
                s[f"gain_psnr_{space}"] = s[f"restored_psnr_{space}"] - s[f"jpeg_psnr_{space}"]
        out.append(s)
    return out


def markdown_table(summary: list[dict], identity: bool, crop: int, source: str, which=METRICS) -> str:
    lines = [
        f"JPEG {source}; mean of per-image values; peak 255; border crop {crop} px; "
        f"Y = BT.601 luma (16-235); PSNR-B on the 8x8 grid",
        "",
    ]
    label = {"psnr": "PSNR", "ssim": "SSIM", "psnrb": "PSNR-B"}
    fmt = {"psnr": "{:.2f}", "ssim": "{:.4f}", "psnrb": "{:.2f}"}
    cols: list[tuple[str, str, str]] = []  # (header, key prefix, metric)
    for m in which:
        cols.append((f"JPEG {label[m]}", "jpeg", m))
        if not identity:
            cols.append((f"restored {label[m]}", "restored", m))
            if m == "psnr":
                cols.append(("gain", "gain", m))
    head = ["quality", "images", "space"] + [c[0] for c in cols]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---:" for _ in head) + "|")
    for s in summary:
        for space in SPACES:
            cells = [str(s["quality"]), str(s["images"]), "RGB" if space == "rgb" else "Y"]
            for _, prefix, m in cols:
                value = s[f"{prefix}_{m}_{space}"]
                cells.append(f"{value:+.2f}" if prefix == "gain" else fmt[m].format(value))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclasses.dataclass
class References:
    """The reference images of a run and where their JPEGs come from."""

    folder: Path
    refs: list[Path]
    jpeg_dir: Path | None
    jpeg_index: dict[str, Path]
    source: str  # how the JPEGs were made, for the table and the JSON
    keep: object = None  # a temporary folder of fetched remote images, alive as long as this


def read_references(args: EvalOptions) -> References:
    """--images (local, a BSR root, or s3:// / gs:// fetched to a temporary folder) and --jpeg-dir."""
    keep = None
    if urlio_scheme(args.images) not in ("", "file"):
        keep = tempfile.TemporaryDirectory(prefix="restorer-eval-")
        folder = fetch_remote_images(args.images, args.split, Path(keep.name), args.limit)
    else:
        folder = resolve_images_dir(Path(args.images), args.split)
    refs = list_images(folder)[: args.limit]
    if not refs:
        raise UserError(f"{folder}: no images")
    jpeg_dir = Path(args.jpeg_dir) if args.jpeg_dir else None
    jpeg_index: dict[str, Path] = {}
    if jpeg_dir is not None:
        if not jpeg_dir.is_dir():
            raise UserError(f"{jpeg_dir}: not a folder")
        for f in sorted(jpeg_dir.iterdir()):
            if f.suffix.lower() in (".jpg", ".jpeg", ".jpe", ".jfif"):
                jpeg_index.setdefault(f.stem, f)
    source = (
        f"from {jpeg_dir} (quality estimated from quantisation tables)"
        if jpeg_dir
        else f"by Pillow at quality {' '.join(map(str, args.quality))}, {args.subsampling}"
    )
    log.info("%d reference images in %s", len(refs), folder)
    return References(folder, refs, jpeg_dir, jpeg_index, source, keep)


def given_jpeg(
    ref_path: Path, ref: np.ndarray, found: References, max_pixels: int
) -> tuple[int | None, np.ndarray, Path]:
    """(quality from its tables, pixels, path) of the --jpeg-dir JPEG of one reference."""
    jp = found.jpeg_index.get(ref_path.stem)
    if jp is None:
        raise UserError(f"{ref_path}: no JPEG named {ref_path.stem}.jpg in {found.jpeg_dir}")
    jimg = open_image(jp, max_pixels)
    if not jimg.is_jpeg:
        raise UserError(f"{jp}: not a JPEG")
    jpeg = jimg.pixels
    if jpeg.ndim != ref.ndim:  # gray JPEG of a colour reference or vice versa
        jpeg = np.repeat(jpeg[:, :, None], 3, axis=2) if jpeg.ndim == 2 else jpeg.mean(axis=2).round().astype(np.uint8)
    if jpeg.shape != ref.shape:
        raise UserError(
            f"{jp}: size {jpeg.shape[1]}x{jpeg.shape[0]} differs from its reference {ref.shape[1]}x{ref.shape[0]}"
        )
    return jimg.quality, jpeg, jp


def jpeg_pairs(ref_path: Path, ref: np.ndarray, found: References, args: EvalOptions) -> list[tuple]:
    """(quality, JPEG pixels, JPEG bytes or file) for each JPEG of one reference to measure."""
    if found.jpeg_dir is not None:
        return [given_jpeg(ref_path, ref, found, args.max_pixels)]
    return [(q, *decoded_jpeg(ref, q, args.subsampling)) for q in args.quality]


def measure(ref_path: Path, ref: np.ndarray, pair: tuple, models: Models, args: EvalOptions) -> dict:
    """One row: the JPEG's metrics and, unless --weights none, the restored image's and the gain."""
    q, jpeg, jpeg_src = pair
    choice = None if models.identity else choose_quality(jpeg, q, True, None, models, args)
    restorer = choose_restorer(models.restorers, q if choice is None else choice.quality)
    row = {
        "image": ref_path.name,
        "quality": q,
        "weights": str(restorer.path),
        "width": ref.shape[1],
        "height": ref.shape[0],
        "crop_border": args.crop_border,
    }
    jm = image_metrics(jpeg, ref, args.crop_border, args.metrics)
    row.update({f"jpeg_{k}": v for k, v in jm.items()})
    if choice is not None:
        row.update(
            told_quality=choice.quality,
            quality_source=choice.source,
            estimate=choice.estimate,
            projected=choice.project,
        )
        restored = restorer.restore(jpeg, choice.quality)
        restored = project_output(restored, jpeg_src, args) if choice.project else restored
        rm = image_metrics(restored, ref, args.crop_border, args.metrics)
        row.update({f"restored_{k}": v for k, v in rm.items()})
        for space in SPACES if "psnr" in args.metrics else ():
            row[f"gain_psnr_{space}"] = rm[f"psnr_{space}"] - jm[f"psnr_{space}"]
    return row


def reference_rows(ref_path: Path, found: References, models: Models, args: EvalOptions) -> list[dict]:
    ref = open_image(ref_path, args.max_pixels).pixels
    return [measure(ref_path, ref, pair, models, args) for pair in jpeg_pairs(ref_path, ref, found, args)]


def measure_all(found: References, models: Models, args: EvalOptions) -> tuple[list[dict], int]:
    """The rows of every reference and its JPEGs, and how many references failed (one error line
    each, printed as it happens; the others are still measured)."""
    rows: list[dict] = []
    failed = 0
    total = len(found.refs) * (1 if found.jpeg_dir else len(args.quality))
    with tqdm(total=total, unit="img", disable=args.no_progress, file=sys.stderr) as bar:
        for ref_path in found.refs:
            try:
                new = reference_rows(ref_path, found, models, args)
            except Exception as exc:
                failed += 1
                print(f"error: {failure_line(ref_path, exc)}", file=sys.stderr)
                continue
            rows += new
            bar.update(len(new))
    return rows, failed


def failure_line(ref_path: Path, exc: Exception) -> str:
    """One line for a reference that could not be measured (RESTORER_DEBUG=1: the traceback)."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, ValueError):  # e.g. an image smaller than the SSIM window after cropping
        return f"{ref_path}: {first_line(exc)}"
    if os.environ.get("RESTORER_DEBUG"):  # RuntimeError (out of memory, ...): one line, go on
        raise exc
    return f"{ref_path}: failed ({describe(exc)})"


def write_json(path: Path, rows: list[dict], summary: list[dict], found: References, models: Models) -> None:
    doc = {
        "protocol": {
            "images": str(found.folder),
            "jpeg": found.source,
            "crop_border": rows[0]["crop_border"],
            "y": "BT.601 16 + 65.481 R + 128.553 G + 24.966 B, /255",
            "weights": [r.describe() for r in models.restorers],
            "device": str(models.device),
            "precision": models.precision.as_dict(),
        },
        "mean": [{k: jsonable(v) for k, v in s.items()} for s in summary],
        "images": [{k: jsonable(v) for k, v in r.items()} for r in rows],
    }
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    models = load_models(args)
    report_weight_errors(models, lambda line: print(f"error: {line}", file=sys.stderr))
    found = read_references(args)
    rows, failed = measure_all(found, models, args)
    if not rows:
        raise UserError("no image could be evaluated")
    summary = summarise(rows, models.identity, args.metrics)
    print(markdown_table(summary, models.identity, args.crop_border, found.source, args.metrics))
    if args.json:
        write_json(Path(args.json), rows, summary, found, models)
    if args.csv:
        write_csv(Path(args.csv), rows)
    return 1 if models.errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
