#!/usr/bin/env python
"""The measurement behind ``--quality auto`` (restorer/infer/autoquality.py): whether the lattice
test (restorer/infer/resave.py) finds an earlier, stronger save in re-saved JPEGs and never in
first-generation ones, and how far the pixel estimate (restorer/estimator.py, still used for
images without tables) falls from the truth.

On the first ``--limit`` images of a BSDS500 split, plus scikit-image's photos (astronaut, coffee,
chelsea, rocket, camera, moon: smooth areas unlike BSDS500) unless ``--no-skimage``, for single
saves at qualities 10-95 (4:2:0 and 4:4:4) and for chains (``restorer.data.degrade.parse_chain``
syntax), it prints per case: the tables' quality, the effective quality (the label the models are
trained with), the best lattice score at candidates with steps 1.5x the file's (its maximum over
the images), the share of images where an earlier save is found at ``resave.THRESHOLD``, the
quality found (mean over those), and the estimate's mean absolute error. The threshold the run
supports is the highest first-generation score plus ``--slack``.

examples:
  python bench/quality_rule.py --limit 40
  python bench/quality_rule.py --limit 10 --cases 50 90 30>80 30>s4>80 --no-skimage

The last line is ``quality_rule_threshold: X`` (compare resave.THRESHOLD) after
``quality_rule_first_generation_found: X`` (must be 0).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchcli import parser as bench_parser

REPO = Path(__file__).resolve().parents[1]
SINGLES = tuple(f"{q}" for q in range(10, 100, 10)) + ("95", "10:4:4:4", "30:4:4:4", "50:4:4:4", "70:4:4:4", "90:4:4:4")
CHAINS = (
    "30>80", "30>s4>80", "40>x0.75>85", "90>30", "10>90", "60>s3>60", "50>x0.5:area>90",
    "70>x0.6:bilinear>50", "20>60>90", "80>x0.8:lanczos>s2>40", "40>x0.9>40", "95>x0.5>70", "50>75", "70>s2,5>85",
    "40>s4>85", "30>s3,5>70",
)  # fmt: skip
SKIMAGE = ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon")


def photos(args) -> list[np.ndarray]:
    from restorer.imageio import open_image
    from restorer.infer.evaluate import list_images, resolve_images_dir

    imgs = [open_image(p).pixels for p in list_images(resolve_images_dir(Path(args.images), args.split))[: args.limit]]
    if not args.no_skimage:
        import skimage.data  # a test dependency, not the package's

        imgs += [getattr(skimage.data, name)() for name in SKIMAGE]
    return imgs


def measure(imgs: list[np.ndarray], spec: str, est) -> np.ndarray:
    """Per image: tables, effective quality, best lattice score, quality found (nan: none), estimate."""
    from restorer.data.degrade import apply_chain, effective_quality, parse_chain
    from restorer.infer.autoquality import tables_quality
    from restorer.infer.resave import THRESHOLD, best_lattice

    saves, rows = parse_chain(spec), []
    for img in imgs:
        deg, ref, data = apply_chain(img, saves)
        tables = tables_quality(data)
        best = best_lattice(deg, tables)
        score = -1.0 if best is None else best.score
        found = best.quality if best is not None and best.score >= THRESHOLD else math.nan
        rows.append((tables, effective_quality(ref, deg, saves), score, found, est.estimate(deg)))
    return np.array(rows, dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--estimator", default=None, help="estimator weights (default: the packaged one)")
    parser.add_argument("--images", default=str(REPO.parent / "shared/datasets/BSR"), help="BSR root or folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--no-skimage", action="store_true", help="BSDS500 only")
    parser.add_argument("--cases", nargs="+", default=list(SINGLES + CHAINS))
    parser.add_argument("--slack", type=float, default=0.02, help="added to the highest first-generation score")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from restorer.data.degrade import parse_chain
    from restorer.estimator import load_estimator
    from restorer.infer.resave import THRESHOLD

    est, imgs = load_estimator(args.estimator), photos(args)
    rows, t0 = {}, time.perf_counter()
    for spec in args.cases:
        rows[spec] = measure(imgs, spec, est)
        print(f"{spec}: done", file=sys.stderr, flush=True)
    per_image = (time.perf_counter() - t0) / (len(imgs) * len(args.cases))
    singles = np.concatenate([r for s, r in rows.items() if len(parse_chain(s)) == 1])
    highest = float(singles[:, 2].max())
    print(
        f"\nestimator {est.describe()}; {len(imgs)} photos (BSDS500 {args.split} first {args.limit}"
        f"{'' if args.no_skimage else ' + scikit-image'}); resave.THRESHOLD {THRESHOLD:g}; "
        f"{per_image:.2f} s per photo and case (lattice, estimate and effective quality)"
    )
    print("| case | tables | effective q | best score (max) | earlier save found | q found | estimate MAE |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for spec, r in rows.items():
        found = ~np.isnan(r[:, 3])
        q_found = f"{np.mean(r[found, 3]):.1f}" if found.any() else "-"
        print(
            f"| {spec} | {r[:, 0].mean():.1f} | {r[:, 1].mean():.1f} | {r[:, 2].mean():.2f} ({r[:, 2].max():.2f}) | "
            f"{100 * found.mean():.0f}% | {q_found} | {np.abs(r[:, 4] - r[:, 1]).mean():.1f} |"
        )
    if args.json:
        doc = {spec: r.tolist() for spec, r in rows.items()}
        cols = ["tables", "effective", "score", "found", "estimate"]
        args.json.write_text(json.dumps({"columns": cols, "rows": doc}).replace("NaN", "null") + "\n")
    print(f"quality_rule_first_generation_found: {float(np.mean(~np.isnan(singles[:, 3]))):.3f}")
    print(f"quality_rule_threshold: {highest + args.slack:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
