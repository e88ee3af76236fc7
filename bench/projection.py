#!/usr/bin/env python
"""Does projecting onto the JPEG's quantisation set help? PSNR side by side, and its speed.

For each reference image (BSDS500 test split by default) and each quality, the image is
compressed by Pillow (baseline, 4:2:0 unless ``--subsampling``), then "restored" and the
restoration projected onto the file's quantisation set (``restorer.infer.projection.project``).
Reported per quality, mean over images of per-image RGB PSNR (8-bit, peak 255, no border crop):
the JPEG, the restoration, the projected restoration, and both gains over the JPEG.

The restoration is either
* a STAND-IN (default): a deterministic Gaussian blur (``--sigma``, 1.0 px), clearly not a trained
  model, to show what the projection does to an output that is wrong in a known way; or
* a trained model (``--weights PATH``), run through the project's tiled inference code with the
  file's quality as the condition.

Speed: seconds per megapixel of ``read_coefficients`` (Pillow validation + jpeglib) and of
``project`` on the BSDS images, and one 24 MP photo (``--big``, 6000x4000, on by default).
The last line is ``projected_minus_jpeg_worst_db: <value>``: the worst quality's mean gain of the
projected restoration over the JPEG (>= 0 means never worse than the JPEG, on average).

examples:
  python bench/projection.py                                       # stand-in, 200 images, q10..90
  python bench/projection.py --limit 20 --qualities 10 50 90       # quicker
  python bench/projection.py --weights runs/demo/model.safetensors --limit 50
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np

from benchcli import parser

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

DEFAULT_IMAGES = REPO.parent / "shared" / "datasets" / "BSR" / "BSDS500" / "data" / "images" / "test"


def jpeg_file(img: np.ndarray, quality: int, subsampling: str) -> bytes:
    """The file a user would have: the project's one encoder (Pillow baseline, as eval uses)."""
    from restorer.data.degrade import jpeg_bytes

    return jpeg_bytes(img, quality, subsampling)


def decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def standin(sigma: float):
    """STAND-IN restoration (not a model): Gaussian blur of the JPEG, per channel, rounded."""
    from scipy.ndimage import gaussian_filter

    def restore(pixels: np.ndarray, quality: int) -> np.ndarray:
        out = gaussian_filter(pixels.astype(np.float32), (sigma, sigma, 0))
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    return restore, f"stand-in: Gaussian blur sigma={sigma:g} (NOT a trained model)"


def model_restorer(weights: str, device: str):
    """A trained model through the project's inference code."""
    from restorer.infer.engine import load_restorers, pick_device

    restorers, errors = load_restorers([weights], pick_device(device))
    if errors or not restorers:
        sys.exit(f"error: {'; '.join(errors) or 'no usable weights'}")
    r = restorers[0]

    def restore(pixels: np.ndarray, quality: int) -> np.ndarray:
        return r.restore(pixels, quality)

    return restore, f"model: {r.describe()}"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """RGB PSNR, 8-bit, peak 255, no crop (restorer.metrics)."""
    import torch

    from restorer import metrics

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(x)).permute(2, 0, 1)[None].double() / 255

    return float(metrics.psnr(t(a), t(b))[0])


def big_photo_seconds(subsampling: str) -> tuple[float, float, float]:
    """(read s, project s, Pillow decode s) for a 6000x4000 q80 photo (a real photo resized + noise)."""
    from PIL import Image
    from skimage import data

    from restorer.infer.projection import project, read_coefficients

    img = np.asarray(Image.fromarray(data.astronaut()).resize((6000, 4000), Image.Resampling.BICUBIC)).astype(np.int16)
    img = np.clip(img + np.random.default_rng(0).integers(-6, 7, img.shape[:2] + (1,)), 0, 255).astype(np.uint8)
    blob = jpeg_file(img, 80, subsampling)
    del img
    t0 = time.perf_counter()
    pixels = decode(blob)
    t1 = time.perf_counter()
    coefs = read_coefficients(blob)
    t2 = time.perf_counter()
    project(pixels, coefs)
    t3 = time.perf_counter()
    return t2 - t1, t3 - t2, t1 - t0


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of reference images (default BSDS500 test)")
    p.add_argument("--limit", type=int, default=0, help="first N images (sorted; 0 = all)")
    p.add_argument("--qualities", type=int, nargs="+", default=list(range(10, 100, 10)))
    p.add_argument("--subsampling", choices=["4:2:0", "4:2:2", "4:4:4"], default="4:2:0")
    p.add_argument("--sigma", type=float, default=1.0, help="blur of the stand-in restoration (default 1.0 px)")
    p.add_argument("--weights", default=None, metavar="PATH", help="use this trained model instead of the stand-in")
    p.add_argument("--device", default="cpu", help="device for --weights (default cpu)")
    p.add_argument("--no-big", action="store_true", help="skip the 24 MP timing")
    args = p.parse_args(argv)

    from PIL import Image
    from tqdm import tqdm

    from restorer.infer.projection import project, read_coefficients

    folder = Path(args.images)
    files = (
        sorted(f for f in folder.glob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png")) if folder.is_dir() else []
    )
    if not files:
        sys.exit(f"error: {folder}: no reference images (BSDS500 absent? pass --images)")
    files = files[: args.limit] if args.limit else files
    restore, label = model_restorer(args.weights, args.device) if args.weights else standin(args.sigma)

    warm = np.zeros((16, 16, 3), np.uint8)  # imports (torch, jpeglib) outside the timed calls
    project(warm, read_coefficients(jpeg_file(warm, 50, args.subsampling)))
    rows: dict[int, dict[str, list[float]]] = {q: {"jpeg": [], "restored": [], "projected": []} for q in args.qualities}
    t_read = t_proj = megapixels = 0.0
    for f in tqdm(files, desc="images", file=sys.stderr):
        with Image.open(f) as im:
            ref = np.asarray(im.convert("RGB"))
        for q in args.qualities:
            blob = jpeg_file(ref, q, args.subsampling)
            jpeg = decode(blob)
            restored = restore(jpeg, q)
            t0 = time.perf_counter()
            coefs = read_coefficients(blob)
            t1 = time.perf_counter()
            projected = project(restored, coefs)
            t2 = time.perf_counter()
            t_read, t_proj, megapixels = (
                t_read + t1 - t0,
                t_proj + t2 - t1,
                megapixels + ref.shape[0] * ref.shape[1] / 1e6,
            )
            for name, img in (("jpeg", jpeg), ("restored", restored), ("projected", projected)):
                rows[q][name].append(psnr(img, ref))

    print(
        f"\n{len(files)} images from {folder}, Pillow JPEG {args.subsampling}; RGB PSNR (8-bit, no crop), "
        f"mean of per-image values\nrestoration = {label}"
    )
    print(
        f"{'q':>4} {'JPEG':>7} {'restored':>9} {'+proj':>7} {'restored-JPEG':>14} {'+proj-JPEG':>11} {'proj gain':>10}"
    )
    worst = float("inf")
    for q in args.qualities:
        j, r, pr = (float(np.mean(rows[q][k])) for k in ("jpeg", "restored", "projected"))
        worst = min(worst, pr - j)
        print(f"{q:>4} {j:7.2f} {r:9.2f} {pr:7.2f} {r - j:+14.2f} {pr - j:+11.2f} {pr - r:+10.2f}")
    print(
        f"speed on BSDS images: read_coefficients {t_read / megapixels:.3f} s/MP, "
        f"project {t_proj / megapixels:.3f} s/MP"
    )
    if not args.no_big:
        read_s, proj_s, dec_s = big_photo_seconds(args.subsampling)
        print(
            f"24 MP photo (6000x4000, q80, {args.subsampling}): read_coefficients {read_s:.2f} s, project "
            f"{proj_s:.2f} s ({proj_s / 24:.3f} s/MP); Pillow's own decode of it {dec_s:.2f} s"
        )
    print(f"projected_minus_jpeg_worst_db: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
