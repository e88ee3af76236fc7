#!/usr/bin/env python
"""What users get on real-world JPEGs: the default ``restorer restore`` against an oracle, on chains
of saves like photos passed between apps (recompressed, cropped, resized), on the BSDS500 test split.

Each case is a chain in ``restorer.data.degrade.parse_chain`` syntax (``30>s4>80``: saved at q30,
cropped 4 px at the top and left, saved at q80; ``40>x0.75>85``: resized to 0.75 (bicubic) between
the saves; ``50``: a single save), run on every image; the reference is the clean image through the
same crops and resizes. Columns (RGB PSNR, 8-bit, peak 255, no border crop, mean of per-image values):
- ``JPEG``: the last save against the reference;
- ``tables+proj``: the model told the quality read from the file's tables, output projected onto
  the file's quantisation set: ``--quality-rule tables`` (what ``restore`` did before ``auto``);
- ``default``: what ``restore`` does now, with the same decision code (``restorer.infer.autoquality``,
  rule ``auto``: the tables and projection unless the pixels carry an earlier, stronger save,
  ``restorer.infer.resave``; then that save's quality, raw);
- ``estimate, raw``: the model told the pixel estimate (``restorer.estimator``), raw output: the
  rule this replaced for JPEGs, for comparison;
- ``oracle``: the same model told the chain's FIRST quality, raw output (no projection);
- ``q used``: mean quality the default told the model; ``proj``: share of images it projected.

examples:
  python bench/realworld.py --weights quality                 # the README table (200 images)
  python bench/realworld.py --weights fast --limit 20 --cases 30>80 90>30
  python bench/realworld.py --weights quality --panels bench/figures/realworld --limit 0

The last line is ``realworld_worst_default_minus_oracle_db: X`` (over the chains; >= -0.15 is the
issue's bar) after ``realworld_min_chain_gain_db``; ``nan`` when no image is restored (``--limit 0``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchcli import parser as bench_parser
from benchcli import summary
from restorer.errors import cli_entry

REPO = Path(__file__).resolve().parents[1]
CASES = ("30>80", "30>s4>80", "40>x0.75>85", "90>30", "10", "50", "90")
PANEL_IMAGES = ("108004", "223060", "296058")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def run_case(restorer, estimator, img: np.ndarray, spec: str) -> dict:
    """The columns of one image and one chain."""
    from restorer.data.degrade import apply_chain, parse_chain
    from restorer.infer import autoquality
    from restorer.infer.projection import project

    saves = parse_chain(spec)
    jpeg, ref, data = apply_chain(img, saves)
    tables = autoquality.tables_quality(data)
    row = {"jpeg": psnr(jpeg, ref), "tables": tables}
    row["tables_proj"] = psnr(project(restorer.restore(jpeg, tables), data), ref)
    choice = autoquality.choose(jpeg, tables, None, estimator, is_jpeg=True)  # the default rule
    if choice.project:
        row["default"] = row["tables_proj"]
    else:
        row["default"] = psnr(restorer.restore(jpeg, choice.quality), ref)
    row["q_used"], row["projected"] = choice.quality, float(choice.project)
    row["estimate"] = None if estimator is None else estimator.estimate(jpeg)
    if row["estimate"] is not None:
        row["estimate_raw"] = psnr(restorer.restore(jpeg, round(row["estimate"])), ref)
    row["oracle"] = psnr(restorer.restore(jpeg, saves[0].quality), ref)
    return row


def write_panel_inputs(img: np.ndarray, spec: str, folder: Path, stem: str) -> tuple[Path, Path]:
    """The reference (PNG) and the chain's last save (JPEG) of one image, for ``restorer compare``."""
    from restorer.data.degrade import apply_chain, parse_chain
    from restorer.imageio import SaveOptions, save_image

    _, ref, data = apply_chain(img, parse_chain(spec))
    name = spec.replace(">", "_").replace(":", "")
    folder.mkdir(parents=True, exist_ok=True)
    ref_path, jpeg_path = folder / f"{stem}_{name}_ref.png", folder / f"{stem}_{name}.jpg"
    save_image(ref, None, ref_path, SaveOptions(fmt="png", overwrite=True))
    jpeg_path.write_bytes(data)
    return ref_path, jpeg_path


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--weights", default="quality", help="fast | quality | a model.safetensors")
    parser.add_argument(
        "--estimator", default=None, help="estimator weights (default: the packaged one; 'none': no estimate column)"
    )
    parser.add_argument("--images", default=str(REPO.parent / "shared/datasets/BSR"), help="BSR root or folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="first N images (default: all)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="chains (parse_chain syntax)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--json", type=Path, default=None, help="write the table and per-image rows here")
    parser.add_argument("--panels", type=Path, default=None, help="also write reference + JPEG files for panels")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from restorer.data.degrade import parse_chain
    from restorer.estimator import load_estimator
    from restorer.imageio import open_image
    from restorer.infer.engine import load_restorers, pick_device
    from restorer.infer.evaluate import list_images, resolve_images_dir

    for spec in args.cases:
        parse_chain(spec)
    device = pick_device("auto")
    restorers, errors = load_restorers([args.weights], device, precision=args.precision)
    if errors:
        sys.exit("error: " + "; ".join(errors))
    restorer = restorers[0]
    estimator = None if args.estimator == "none" else load_estimator(args.estimator, device)
    paths = list_images(resolve_images_dir(Path(args.images), args.split))
    if args.panels:
        for p in (p for p in paths if p.stem in PANEL_IMAGES):
            for spec in args.cases:
                write_panel_inputs(open_image(p).pixels, spec, args.panels, p.stem)
    paths = paths[: args.limit]
    rows: dict[str, list[dict]] = {spec: [] for spec in args.cases}
    t0 = time.perf_counter()
    from tqdm import tqdm

    for path in tqdm(paths, unit="img", file=sys.stderr):
        img = open_image(path).pixels
        for spec in args.cases:
            rows[spec].append({"image": path.name, **run_case(restorer, estimator, img, spec)})
    if not paths:  # --limit 0: panel inputs only
        print(summary("realworld_worst_default_minus_oracle_db", None))
        return 0
    table = summarise(rows)
    print(
        f"\n{restorer.describe()}; estimator {estimator.describe() if estimator else 'none'}; {device}, "
        f"{args.precision}; BSDS500 {args.split} ({len(paths)} images), RGB PSNR, no border crop; "
        f"{(time.perf_counter() - t0) / 60:.1f} min"
    )
    cols = ("JPEG dB", "tables+proj", "default", "estimate, raw", "oracle (first q, raw)", "default - oracle")
    print("| case | " + " | ".join(cols) + " | q used | proj |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        est = "n/a" if r["estimate_raw"] is None else f"{r['estimate_raw'] - r['jpeg']:+.2f}"
        print(
            f"| {r['case']} | {r['jpeg']:.2f} | {r['tables_proj'] - r['jpeg']:+.2f} | {r['default'] - r['jpeg']:+.2f} "
            f"| {est} | {r['oracle'] - r['jpeg']:+.2f} | {r['default'] - r['oracle']:+.2f} | {r['q_used']:.1f} "
            f"| {100 * r['projected']:.0f}% |"
        )
    if args.json:
        from restorer.fsutil import atomic_write_text

        doc = {"weights": restorer.describe(), "images": len(paths), "table": table, "rows": rows}
        atomic_write_text(args.json, json.dumps(doc, indent=1) + "\n")
    chains = [r for r in table if len(parse_chain(r["case"])) > 1] or table
    print(f"realworld_min_chain_gain_db: {min(r['default'] - r['jpeg'] for r in chains):+.3f}")
    print(f"realworld_worst_default_minus_oracle_db: {min(r['default'] - r['oracle'] for r in chains):+.3f}")
    return 0


def summarise(rows: dict[str, list[dict]]) -> list[dict]:
    keys = ("jpeg", "tables_proj", "default", "oracle", "q_used", "projected", "estimate_raw")
    return [
        {"case": spec, "images": len(rs), **{k: _mean([r.get(k) for r in rs]) for k in keys}}
        for spec, rs in rows.items()
    ]


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


if __name__ == "__main__":
    sys.exit(main())
