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
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from restorer import metrics
from restorer.data.degrade import SUBSAMPLING, decoded_jpeg
from restorer.data.urlio import scheme as urlio_scheme
from restorer.errors import UserError, cli_entry, describe, first_line
from restorer.fsutil import atomic_write_text
from restorer.imageio import IMAGE_SUFFIXES, open_image
from restorer.infer.engine import choose_restorer
from restorer.infer.options import (
    add_model_args,
    choose_quality,
    load_models,
    parse_args,
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

METRICS = ("psnr", "ssim", "psnrb")
SPACES = ("rgb", "y")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="restorer eval",
        description="PSNR / SSIM / PSNR-B of JPEG and restored images against references.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--identity", action="store_true", help="same as --weights none")
    p.add_argument(
        "--images",
        required=True,
        metavar="DIR",
        help="folder of reference images, or a BSR/BSDS500 root (uses --split); also s3:// or gs:// "
        "(copied to a temporary folder first)",
    )
    p.add_argument("--split", default="test", help="BSDS500 split when --images is a BSR root (default test)")
    p.add_argument(
        "--quality", type=int, nargs="+", default=[10, 20, 30, 40], help="JPEG qualities (default 10 20 30 40)"
    )
    p.add_argument(
        "--jpeg-dir",
        default=None,
        metavar="DIR",
        help="use these already-compressed JPEGs (matched to references by base name) instead of compressing",
    )
    p.add_argument(
        "--subsampling", choices=sorted(SUBSAMPLING), default="4:2:0", help="chroma subsampling (default 4:2:0)"
    )
    p.add_argument(
        "--crop-border", type=int, default=0, help="pixels cropped from each side before metrics (default 0)"
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        choices=METRICS,
        default=list(METRICS),
        help="metrics to compute (default: psnr ssim psnrb)",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by name)")
    p.add_argument("--json", default=None, metavar="PATH", help="write per-image results and means as JSON")
    p.add_argument("--csv", default=None, metavar="PATH", help="write per-image results as CSV")
    return p


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
    from restorer.data import urlio

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


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if args.identity:
        args.weights = ["none"]
    if args.crop_border < 0:
        raise UserError("--crop-border must be >= 0")
    for q in args.quality:
        if not 1 <= q <= 100:
            raise UserError(f"--quality must be 1..100, got {q}")
    failures = 0

    def err(msg: str) -> None:
        nonlocal failures
        failures += 1
        print(f"error: {msg}", file=sys.stderr)

    models = load_models(args)
    report_weight_errors(models, err)
    restorers, identity = models.restorers, models.identity

    remote = urlio_scheme(args.images) not in ("", "file")
    if remote:
        fetched = tempfile.TemporaryDirectory(prefix="restorer-eval-")
        folder = fetch_remote_images(args.images, args.split, Path(fetched.name), args.limit)
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

    from tqdm import tqdm

    rows: list[dict] = []
    total = len(refs) * (1 if jpeg_dir else len(args.quality))
    bar = tqdm(total=total, unit="img", disable=args.no_progress, file=sys.stderr)
    for ref_path in refs:
        try:
            ref_img = open_image(ref_path, args.max_pixels)
            ref = ref_img.pixels
            if jpeg_dir is not None:
                jp = jpeg_index.get(ref_path.stem)
                if jp is None:
                    raise UserError(f"{ref_path}: no JPEG named {ref_path.stem}.jpg in {jpeg_dir}")
                jimg = open_image(jp, args.max_pixels)
                if not jimg.is_jpeg:
                    raise UserError(f"{jp}: not a JPEG")
                jpeg = jimg.pixels
                if jpeg.ndim != ref.ndim:  # gray JPEG of a colour reference or vice versa
                    jpeg = (
                        np.repeat(jpeg[:, :, None], 3, axis=2)
                        if jpeg.ndim == 2
                        else jpeg.mean(axis=2).round().astype(np.uint8)
                    )
                if jpeg.shape != ref.shape:
                    raise UserError(
                        f"{jp}: size {jpeg.shape[1]}x{jpeg.shape[0]} differs from its reference "
                        f"{ref.shape[1]}x{ref.shape[0]}"
                    )
                pairs = [(jimg.quality, jpeg, jp)]
            else:
                pairs = [(q, *decoded_jpeg(ref, q, args.subsampling)) for q in args.quality]
            for q, jpeg, jpeg_src in pairs:
                choice = None if identity else choose_quality(jpeg, q, True, None, models, args)
                restorer = choose_restorer(restorers, q if choice is None else choice.quality)
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
                rows.append(row)
                bar.update(1)
        except UserError as exc:
            err(str(exc))
        except ValueError as exc:  # e.g. an image smaller than the SSIM window after cropping
            err(f"{ref_path}: {first_line(exc)}")
        except Exception as exc:  # RuntimeError (out of memory, ...): one line, go on with the next
            if os.environ.get("RESTORER_DEBUG"):
                raise
            err(f"{ref_path}: failed ({describe(exc)})")
    bar.close()
    if not rows:
        raise UserError("no image could be evaluated")
    summary = summarise(rows, identity, args.metrics)
    print(markdown_table(summary, identity, args.crop_border, source, args.metrics))
    if args.json:
        doc = {
            "protocol": {
                "images": str(folder),
                "jpeg": source,
                "crop_border": args.crop_border,
                "y": "BT.601 16 + 65.481 R + 128.553 G + 24.966 B, /255",
                "weights": [r.describe() for r in restorers],
                "device": str(models.device),
                "precision": models.precision.as_dict(),
            },
            "mean": [{k: _jsonable(v) for k, v in s.items()} for s in summary],
            "images": [{k: _jsonable(v) for k, v in r.items()} for r in rows],
        }
        atomic_write_text(Path(args.json), json.dumps(doc, indent=1) + "\n")
    if args.csv:
        import io

        buf = io.StringIO()
        fields = list(rows[0].keys())
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
        atomic_write_text(Path(args.csv), buf.getvalue())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
