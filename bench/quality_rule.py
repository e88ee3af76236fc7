#!/usr/bin/env python
"""The measurement behind ``--quality auto`` (restorer/infer/autoquality.py): how far the pixel
estimate (restorer/estimator.py) falls from the truth, and which margin separates first-generation
JPEGs (tables right, projection valid) from re-saved ones (tables too high).

On the first ``--limit`` images of a BSDS500 split, for single saves at every quality 5-95 (4:2:0
and 4:4:4) and for chains (``restorer.data.degrade.parse_chain`` syntax), it prints per case: the
tables' quality, the effective quality (the label the models are trained with, computed on the
whole image), the estimate's mean and its mean absolute error against the label, and the share of
images the rule treats as re-saved (estimate < tables - margin) at the chosen margin. The margin
chosen is the smallest whole number that flags no single save of the run (the largest
tables-minus-estimate seen on first-generation JPEGs, rounded up, plus ``--slack``).

examples:
  python bench/quality_rule.py --limit 40
  python bench/quality_rule.py --estimator runs/release_estimator/estimator.safetensors --limit 10

The last line is ``quality_rule_margin: X`` (compare autoquality.MARGIN).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchcli import parser as bench_parser

REPO = Path(__file__).resolve().parents[1]
SINGLES = tuple(f"{q}" for q in range(5, 100, 5)) + ("10:4:4:4", "30:4:4:4", "50:4:4:4", "70:4:4:4", "90:4:4:4")
CHAINS = (
    "30>80", "30>s4>80", "40>x0.75>85", "90>30", "10>90", "60>s3>60", "50>x0.5:area>90",
    "70>x0.6:bilinear>50", "20>60>90", "80>x0.8:lanczos>s2>40", "40>x0.9>40", "95>x0.5>70", "50>75", "70>s2,5>85",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--estimator", default=None, help="estimator weights (default: the packaged one)")
    parser.add_argument("--images", default=str(REPO.parent / "shared/datasets/BSR"), help="BSR root or folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--cases", nargs="+", default=list(SINGLES + CHAINS))
    parser.add_argument("--slack", type=float, default=1.0, help="added to the largest first-generation deficit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from restorer.data.degrade import apply_chain, effective_quality, parse_chain
    from restorer.estimator import load_estimator
    from restorer.imageio import open_image
    from restorer.infer.autoquality import MARGIN, tables_quality
    from restorer.infer.evaluate import list_images, resolve_images_dir

    est = load_estimator(args.estimator)
    imgs = [open_image(p).pixels for p in list_images(resolve_images_dir(Path(args.images), args.split))[: args.limit]]
    rows = {}
    for spec in args.cases:
        saves = parse_chain(spec)
        rs = []
        for img in imgs:
            deg, ref, data = apply_chain(img, saves)
            rs.append((tables_quality(data), effective_quality(ref, deg, saves), est.estimate(deg)))
        rows[spec] = np.array(rs, dtype=np.float64)
        print(f"{spec}: done", file=sys.stderr, flush=True)
    singles = np.concatenate([r for s, r in rows.items() if len(parse_chain(s)) == 1])
    deficit = float(np.max(singles[:, 0] - singles[:, 2]))
    margin = float(math.ceil(deficit + args.slack))
    print(
        f"\nestimator {est.describe()}; BSDS500 {args.split}, {len(imgs)} images; margin {margin:g} "
        f"(largest first-generation tables - estimate {deficit:.1f} + {args.slack:g}); autoquality.MARGIN {MARGIN:g}"
    )
    print("| case | tables | effective q | estimate | MAE vs effective | re-saved at margin | at MARGIN |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for spec, r in rows.items():
        flagged = np.mean(r[:, 2] < r[:, 0] - margin)
        at_const = np.mean(r[:, 2] < r[:, 0] - MARGIN)
        print(
            f"| {spec} | {r[:, 0].mean():.1f} | {r[:, 1].mean():.1f} | {r[:, 2].mean():.1f} | "
            f"{np.abs(r[:, 2] - r[:, 1]).mean():.1f} | {100 * flagged:.0f}% | {100 * at_const:.0f}% |"
        )
    if args.json:
        doc = {spec: r.tolist() for spec, r in rows.items()}
        args.json.write_text(json.dumps({"columns": ["tables", "effective", "estimate"], "rows": doc}) + "\n")
    print(f"quality_rule_margin: {margin:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
