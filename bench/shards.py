"""Benchmark of the shard builder: build speed on the real BSDS500, and the lossless tile encodings.

1. Build shards of the real BSDS500 (``--bsr``; default $BSR or ../shared/datasets/BSR) with 1
   and 2 workers: images/s, input MB/s, output MB/s.
2. The lossless tile encodings considered, side by side on 512 px RGB tiles of real photos
   (BSDS500 images are 481x321, so tiles are cut from scikit-image's larger photos plus BSDS):
   decode ms per tile (what the loader pays), encode ms per tile (what the build pays), bytes per
   pixel, each with its ratio to the chosen encoding (WebP lossless, method 0).

examples:
  python bench/shards.py                                   # both parts (BSDS500 where found)
  python bench/shards.py --bsr /work/shared/datasets/BSR --workers 1 2 4
  python bench/shards.py --no-build                        # the encoding table only

The last line is ``shards_images_per_s_2workers: <value>`` (``<N>workers``: the last of ``--workers``),
or ``shards_webp_decode_ms_per_512_tile: <value>`` when there is no BSDS500 (or ``--no-build``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchcli import parser  # noqa: E402
from shard_tools.build import build  # noqa: E402
from shard_tools.config import BuildConfig  # noqa: E402
from shard_tools.sources import DEFAULT_TRAIN, DEFAULT_VAL, skimage_data_dir  # noqa: E402

BSR = Path(os.environ.get("BSR", REPO.parent / "shared" / "datasets" / "BSR"))

ENCODERS = {
    "webp lossless m0 (chosen)": lambda im, b: im.save(b, "WEBP", lossless=True, quality=0, method=0, exact=True),
    "webp lossless m4": lambda im, b: im.save(b, "WEBP", lossless=True, quality=50, method=4),
    "png level 1": lambda im, b: im.save(b, "PNG", compress_level=1),
    "png level 6": lambda im, b: im.save(b, "PNG", compress_level=6),
    "png level 9": lambda im, b: im.save(b, "PNG", compress_level=9),
    "ppm (raw)": lambda im, b: im.save(b, "PPM"),
}


def bench_build(bsr: Path, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = BuildConfig(out=tmp, bsds=[str(bsr)], workers=workers, progress=False)
        t0 = time.perf_counter()
        m = build(cfg)
        dt = time.perf_counter() - t0
        images = sum(sum(per.values()) for per in m["sources"].values())
        out_bytes = sum(s["bytes"] for info in m["splits"].values() for s in info["shards"])
    in_bytes = sum(p.stat().st_size for p in (bsr / "BSDS500/data/images").rglob("*.jpg"))
    return {
        "workers": workers,
        "seconds": dt,
        "images": images,
        "images_per_s": images / dt,
        "in_mb_per_s": in_bytes / 1e6 / dt,
        "out_mb_per_s": out_bytes / 1e6 / dt,
    }


def tiles_512(bsr: Path) -> list[Image.Image]:
    d = skimage_data_dir()
    tiles = []
    for name in DEFAULT_TRAIN + DEFAULT_VAL:
        im = Image.open(d / name).convert("RGB")
        if min(im.size) >= 512:
            tiles.append(im.crop((0, 0, 512, 512)))
    bsds = sorted((bsr / "BSDS500/data/images/test").glob("*.jpg"))[:8]
    # two 481x321 photos side by side -> 512 x 321 (in pairs; an odd last one is left out)
    for a, b in zip(bsds[0::2], bsds[1::2], strict=False):
        ia, ib = Image.open(a).convert("RGB"), Image.open(b).convert("RGB")
        canvas = Image.new("RGB", (ia.width + ib.width, min(ia.height, ib.height)))
        canvas.paste(ia, (0, 0))
        canvas.paste(ib, (ia.width, 0))
        tiles.append(canvas.crop((0, 0, 512, canvas.height)))
    return tiles


def bench_encodings(bsr: Path, repeats: int = 5) -> list[dict]:
    tiles = tiles_512(bsr)
    px = sum(t.width * t.height for t in tiles)
    rows = []
    for name, enc in ENCODERS.items():
        t0 = time.perf_counter()
        blobs = []
        for t in tiles:
            b = io.BytesIO()
            enc(t, b)
            blobs.append(b.getvalue())
        enc_s = time.perf_counter() - t0
        for blob, t in zip(blobs, tiles, strict=True):  # lossless check
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")), np.asarray(t)), name
        t0 = time.perf_counter()
        for _ in range(repeats):
            for blob in blobs:
                Image.open(io.BytesIO(blob)).convert("RGB").load()
        dec_s = (time.perf_counter() - t0) / repeats
        rows.append(
            {
                "name": name,
                "decode_ms": dec_s / len(tiles) * 1e3,
                "encode_ms": enc_s / len(tiles) * 1e3,
                "bytes_per_px": sum(map(len, blobs)) / px,
                "tiles": len(tiles),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--bsr", type=Path, default=BSR, help=f"BSDS500: the BSR folder (default {BSR})")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts of the builds")
    ap.add_argument("--repeats", type=int, default=5, help="decode passes over the tiles per encoding")
    ap.add_argument("--no-build", action="store_true", help="skip the BSDS500 builds (encodings only)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"# shard builder benchmark (cpu cores: {os.cpu_count()}, BSDS500: {args.bsr})")
    builds = []
    if args.no_build:
        print("\n(--no-build: build timing skipped)")
    elif (args.bsr / "BSDS500/data/images").is_dir():
        for w in args.workers:
            with contextlib.redirect_stdout(io.StringIO()):
                builds.append(bench_build(args.bsr, w))
        print("\n## build real BSDS500 (500 images, webp tiles of 512 px)")
        print(f"{'workers':>7} {'seconds':>8} {'images/s':>9} {'in MB/s':>8} {'out MB/s':>9} {'speedup':>8}")
        for b in builds:
            print(
                f"{b['workers']:>7} {b['seconds']:>8.2f} {b['images_per_s']:>9.1f} "
                f"{b['in_mb_per_s']:>8.2f} {b['out_mb_per_s']:>9.2f} "
                f"{b['images_per_s'] / builds[0]['images_per_s']:>7.2f}x"
            )
    else:
        print(f"\n(BSDS500 not found at {args.bsr}: build timing skipped; pass --bsr PATH)")
    rows = bench_encodings(args.bsr, args.repeats)
    print_encodings(rows)
    if builds:
        print(f"shards_images_per_s_{builds[-1]['workers']}workers: {builds[-1]['images_per_s']:.1f}")
    else:
        print(f"shards_webp_decode_ms_per_512_tile: {rows[0]['decode_ms']:.2f}")
    return 0


def print_encodings(rows: list[dict]) -> None:
    base = rows[0]
    print(f"\n## lossless encodings, 512 px RGB tiles of real photos ({base['tiles']} tiles)")
    print(
        f"{'encoding':<26} {'decode ms':>9} {'x chosen':>8} {'encode ms':>9} {'x chosen':>8} "
        f"{'bytes/px':>8} {'x chosen':>8}"
    )
    for r in rows:
        print(
            f"{r['name']:<26} {r['decode_ms']:>9.2f} {r['decode_ms'] / base['decode_ms']:>8.2f} "
            f"{r['encode_ms']:>9.1f} {r['encode_ms'] / base['encode_ms']:>8.2f} "
            f"{r['bytes_per_px']:>8.3f} {r['bytes_per_px'] / base['bytes_per_px']:>8.2f}"
        )
    print()


if __name__ == "__main__":
    sys.exit(main())
