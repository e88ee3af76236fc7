#!/usr/bin/env python
"""What quality should a model be told for a chain of JPEG saves? The measurement behind
``restorer.data.degrade.effective_quality``.

For each chain (``restorer.data.degrade.parse_chain`` syntax) on the first ``--limit`` images of a
BSDS500 split (centre crops of ``--crop`` px; the validation split by default, so that the rule is
not fitted on the test photos the realworld bench reports), it prints:
- the chain's JPEG PSNR against the clean image through the same resizes and crops;
- ``min q``: the lowest quality of the chain (FBCNN's "dominant" quality);
- ``matched q``: the single-JPEG quality (Pillow, 4:2:0, of that clean reference) whose PSNR is
  closest to the chain's, median over the images;
- ``best told q`` (with ``--weights``): the told quality that gives a quality-conditioned model its
  best mean PSNR on the chain, raw network (no projection), searched over ``--told``; and the dB
  that the model loses when told ``min q`` / ``matched q`` / the last save's quality instead.

examples:
  python bench/effective_quality.py --weights quality --limit 16
  python bench/effective_quality.py --chains 30>80 90>30 --limit 4        # no model: PSNRs only

The last line is ``worst_loss_db_matched: X`` or its ``_min`` / ``_last`` form: the loss in its worst
chain of the rule (told ``min q``, ``matched q``, the last save's q) that loses least there;
``worst_loss_db_none: nan`` without ``--weights`` (no rule is judged).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchcli import parser as bench_parser
from benchcli import summary

REPO = Path(__file__).resolve().parents[1]
CHAINS = (
    "30>80", "30>s4>80", "40>x0.75>85", "90>30", "10>90", "60>s3>60", "50>x0.5:area>90",
    "70>x0.6:bilinear>50", "20>60>90", "80>x0.8:lanczos>s2>40", "40>x0.9>40", "95>x0.5>70",
)  # fmt: skip
TOLD = (5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 70, 80, 90)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def matched_quality(ref: np.ndarray, target_psnr: float) -> int:
    """The single-JPEG quality of ``ref`` whose PSNR is closest to ``target_psnr``."""
    from restorer.data.degrade import jpeg_roundtrip

    curve = {q: psnr(jpeg_roundtrip(ref, q), ref) for q in range(1, 101)}
    return min(curve, key=lambda q: (abs(curve[q] - target_psnr), q))


def centre(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if size <= 0 or min(h, w) <= size:
        return img
    y, x = (h - size) // 2 // 8 * 8, (w - size) // 2 // 8 * 8
    return np.ascontiguousarray(img[y : y + size, x : x + size])


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--weights", default=None, help="fast | quality | a model.safetensors (default: none)")
    parser.add_argument("--images", default=str(REPO.parent / "shared/datasets/BSR"), help="BSR root or folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--crop", type=int, default=256, help="centre crop side (0 = whole image)")
    parser.add_argument("--chains", nargs="+", default=list(CHAINS))
    parser.add_argument("--told", type=int, nargs="+", default=list(TOLD), help="told qualities searched")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from restorer.data.degrade import apply_chain, parse_chain
    from restorer.imageio import open_image
    from restorer.infer.engine import load_restorers, pick_device
    from restorer.infer.evaluate import list_images, resolve_images_dir

    restorer = None
    if args.weights:
        restorers, errors = load_restorers([args.weights], pick_device("cpu"), precision="fp32")
        if errors:
            sys.exit("error: " + "; ".join(errors))
        restorer = restorers[0]
    refs = [
        centre(open_image(p).pixels, args.crop)
        for p in list_images(resolve_images_dir(Path(args.images), args.split))[: args.limit]
    ]
    head = f"{'chain':22s} {'JPEG dB':>8s} {'min q':>6s} {'matched q':>10s}"
    if restorer:
        head += f" {'best told q':>11s} {'best dB':>8s} {'loss@min':>9s} {'loss@matched':>12s} {'loss@last':>10s}"
    print(f"{len(refs)} images of BSDS500 {args.split}, centre {args.crop} px; RGB PSNR; raw network, fp32")
    print(head)
    losses: dict[str, list[float]] = {"min": [], "matched": [], "last": []}
    for spec in args.chains:
        saves = parse_chain(spec)
        pairs = [apply_chain(img, saves)[:2] for img in refs]
        jpeg_db = float(np.mean([psnr(d, c) for d, c in pairs]))
        qmin, qlast = min(s.quality for s in saves), saves[-1].quality
        qmatch = int(np.median([matched_quality(c, psnr(d, c)) for d, c in pairs]))
        line = f"{spec:22s} {jpeg_db:8.2f} {qmin:6d} {qmatch:10d}"
        if restorer:
            told = sorted(set(args.told) | {qmin, qmatch, qlast})
            db = {t: float(np.mean([psnr(restorer.restore(d, t), c) for d, c in pairs])) for t in told}
            best = max(db, key=db.__getitem__)
            for name, t in (("min", qmin), ("matched", qmatch), ("last", qlast)):
                losses[name].append(db[best] - db[t])
            line += (
                f" {best:11d} {db[best] - jpeg_db:+8.2f} {db[best] - db[qmin]:9.3f} {db[best] - db[qmatch]:12.3f}"
                f" {db[best] - db[qlast]:10.3f}"
            )
        print(line, flush=True)
    if restorer:
        worst = {k: max(v) for k, v in losses.items()}
        mean = {k: float(np.mean(v)) for k, v in losses.items()}
        print("mean loss vs best told q: " + ", ".join(f"{k} {v:.3f} dB" for k, v in mean.items()))
        rule = min(worst, key=worst.__getitem__)
        print(f"worst_loss_db_{rule}: {worst[rule]:.3f}")
    else:
        print(summary("worst_loss_db_none", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
