"""Loader throughput: the original design's per-sample file reads vs the shard pipeline.

For each image set, 128 px patches at JPEG quality 10 (4:2:0), the same augmentation draw
(rescale p=0.5 from {0.9,0.8,0.7,0.6} bicubic, rotation p=0.5), batches of 32:

* baseline -- what the original design does per sample: open and decode the whole source image
  file from a folder, rescale and rotate the whole image, crop one patch, JPEG round trip.
* pipeline -- restorer.data over shards of 512 px lossless tiles: decode a tile once, cut
  ``patches_per_image`` patches, resampling only each patch's region (augment.crop_first).

Image sets: the real BSDS500 (500 JPEGs, 481x321) and a 2K-class set of lossless PNGs at DIV2K's
size (2040x1356), each a 4x4 mosaic of 16 BSDS500 photos resized bicubic to 2040x1356 (real
photo content at about native scale). Shards are made by ``python -m shard_tools build`` (both
its default encoding, PNG and PPM); a webdataset ShardWriter fallback is used if the builder fails.

Epoch boundaries: one-pass epochs (every tile once per epoch, BSDS500 train+val shards of 16
samples, 36 batches of 32 per epoch with 2 workers) against resampled shards with the same epoch
length, read the way the trainer reads them (one iterator across epochs), alternated in one run;
then both again under a consumer that takes a fixed time per batch (a GPU step at 80% of the
loader's rate), reporting the wait at epoch boundaries.

Protocol layer: the 2K-class webp shards read from local files, over HTTP (Python's HTTP server,
tests/objstore.py) and from S3 (a moto server), both on 127.0.0.1 in the bench process, through
restorer.data.urlio; one DataLoader worker each (so the servers' threads do not share the reader's
interpreter), alternated local/http/s3 then s3/http/local, the mean of the two. Needs the dev
extra (moto[server], s3fs); skipped with a note otherwise (``--no-remote`` skips it too).

"per worker" = one process doing everything (num_workers=0); "total" = a DataLoader with
``--workers`` worker processes. The last line is ``speedup: <ratio>x`` (pipeline with the
builder's default encoding over baseline, per worker, 2K-class set).

examples:
  python bench/loader.py                          # every part (the HTTP / S3 rows need the dev extra)
  python bench/loader.py --seconds 3 --no-remote  # quicker, local shards only
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from benchcli import parser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from restorer.data import augment  # noqa: E402
from restorer.data.batch import stack_patches  # noqa: E402
from restorer.data.config import StreamConfig  # noqa: E402
from restorer.data.degrade import jpeg_roundtrip  # noqa: E402
from restorer.data.loader import make_train_loader  # noqa: E402

BSDS = REPO.parent / "shared" / "datasets" / "BSR"
PATCH, QUALITY, BATCH = 128, 10, 32
PARAMS = augment.AugmentParams(patch_size=PATCH)  # the design's defaults: rescale 0.5, rotate 0.5


# ------------------------------------------------------------------------------------ image sets


def bsds_files() -> list[Path]:
    root = BSDS / "BSDS500" / "data" / "images"
    files = sorted(root.glob("*/*.jpg"))
    if not files:
        sys.exit(f"error: BSDS500 not found under {root} (CI and developers have it in ../shared)")
    return files


def make_2k_set(out: Path, n: int) -> list[Path]:
    """``n`` 2040x1356 PNGs (Pillow default compression, like DIV2K's), each a 4x4 mosaic of
    landscape BSDS500 photos resized bicubic from 1924x1284."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"mosaic_{i:03d}.png" for i in range(n)]
    if all(f.is_file() for f in files):
        return files
    photos = [p for p in bsds_files() if Image.open(p).size == (481, 321)]
    rng = np.random.default_rng(0)
    for f in files:
        pick = rng.choice(len(photos), 16, replace=False)
        canvas = Image.new("RGB", (4 * 481, 4 * 321))
        for k, j in enumerate(pick):
            with Image.open(photos[j]) as im:
                canvas.paste(im.convert("RGB"), ((k % 4) * 481, (k // 4) * 321))
        tmp = f.with_suffix(".tmp")
        canvas.resize((2040, 1356), Image.Resampling.BICUBIC).save(tmp, format="PNG")
        os.replace(tmp, f)
    return files


def build_shards(out: Path, source_args: list[str], encoding: str, fallback_files: list[Path]) -> tuple[Path, str]:
    """Shards via the builder (preferred); else 512 px tiles written here with ShardWriter."""
    if (out / "manifest.json").is_file():
        return out, json.loads((out / "manifest.json").read_text()).get("_made_by", "shard_tools build")
    cmd = [
        sys.executable,
        "-m",
        "shard_tools",
        "build",
        "--out",
        str(out),
        "--tile",
        "512",
        "--encoding",
        encoding,
        "--workers",
        str(min(4, os.cpu_count() or 1)),
        *source_args,
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode == 0 and (out / "manifest.json").is_file():
        return out, "shard_tools build"
    print(
        f"note: shard_tools build failed ({res.stderr.strip().splitlines()[-1:] or res.returncode}); "
        "writing shards with webdataset.ShardWriter",
        file=sys.stderr,
    )
    write_shards_fallback(out, fallback_files, encoding)
    return out, "ShardWriter fallback"


def write_shards_fallback(out: Path, files: list[Path], encoding: str) -> None:
    import webdataset as wds

    (out / "train").mkdir(parents=True, exist_ok=True)
    pattern = str(out / "train" / "shard-%06d.tar")
    counts: dict[str, int] = {}
    with wds.ShardWriter(pattern, maxcount=64, verbose=0) as sink:
        for f in files:
            with Image.open(f) as im:
                img = im.convert("RGB")
            for y in range(0, img.height - 127, 512):
                for x in range(0, img.width - 127, 512):
                    tile = img.crop((x, y, min(x + 512, img.width), min(y + 512, img.height)))
                    buf = io.BytesIO()
                    if encoding == "webp":
                        tile.save(buf, "WEBP", lossless=True, quality=0, method=0, exact=True)
                    elif encoding == "ppm":
                        tile.save(buf, "PPM")
                    else:
                        tile.save(buf, "PNG", compress_level=1)
                    meta = {
                        "source": "bench",
                        "source_id": f.stem,
                        "split": "train",
                        "orig_size": list(img.size),
                        "tile": {"y": y, "x": x, "h": tile.height, "w": tile.width},
                    }
                    sink.write(
                        {
                            "__key__": f"bench/{f.stem}/{y}_{x}",
                            encoding: buf.getvalue(),
                            "json": json.dumps(meta).encode(),
                        }
                    )
                    name = Path(sink.fname).name  # the shard this sample went to
                    counts[name] = counts.get(name, 0) + 1
    shards = [{"path": f"train/{n}", "samples": c} for n, c in sorted(counts.items())]
    (out / "train" / "sizes.json").write_text(json.dumps(dict(sorted(counts.items()))))
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "format": 1,
                "encoding": encoding,
                "_made_by": "ShardWriter fallback",
                "splits": {"train": {"samples": sum(counts.values()), "shards": shards}},
            }
        )
    )


def splits_of(shards: Path) -> list[str]:
    return sorted(json.loads((shards / "manifest.json").read_text())["splits"])


# ---------------------------------------------------------------------------------- measurements


def ceiling(seconds: float) -> float:
    """Pillow crop + JPEG round trip of a 128 px patch from an already decoded 512 px tile."""
    with Image.open(bsds_files()[0]) as im:
        tile = im.convert("RGB").resize((512, 512))
    rng = np.random.default_rng(0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        y, x = rng.integers(0, 512 - PATCH, size=2)
        jpeg_roundtrip(np.asarray(tile.crop((x, y, x + PATCH, y + PATCH))), QUALITY)
        n += 1
    return n / (time.perf_counter() - start)


def augment_rate(files: list[Path], fn, seconds: float) -> float:
    """Augmentation alone (no decode, no JPEG): patches/s from a decoded 512 px tile."""
    with Image.open(files[0]) as im:
        tile = im.convert("RGB").crop((0, 0, 512, 512))
    rng = np.random.default_rng(0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(tile, augment.draw(rng, 512, 512, PARAMS), PATCH)
        n += 1
    return n / (time.perf_counter() - start)


class Baseline(IterableDataset):
    """The original design's read path, batched like the pipeline."""

    def __init__(self, files: list[Path]):
        self.files = [str(f) for f in files]

    def __iter__(self):
        info = get_worker_info()
        rng = np.random.default_rng([1, info.id if info else 0])
        while True:
            deg, clean = [], []
            for _ in range(BATCH):
                with Image.open(self.files[int(rng.integers(len(self.files)))]) as im:
                    img = im.convert("RGB")  # the whole file, every sample
                d = augment.draw(rng, img.height, img.width, PARAMS)
                patch = augment.whole_image(img, d, PATCH)
                clean.append(patch)
                deg.append(jpeg_roundtrip(patch, QUALITY))
            yield stack_patches(deg), stack_patches(clean), torch.full((BATCH,), QUALITY, dtype=torch.int64)


def rate(batches, seconds: float) -> float:
    """Patches/s after the first batch (start-up and the shuffle buffer's first fill excluded)."""
    it = iter(batches)
    next(it)
    n, start = 0, time.perf_counter()
    for deg, _, _ in it:
        n += deg.shape[0]
        if time.perf_counter() - start >= seconds:
            break
    return n / (time.perf_counter() - start)


def baseline_rate(files: list[Path], workers: int, seconds: float) -> float:
    if workers == 0:
        return rate(Baseline(files), seconds)
    loader = DataLoader(Baseline(files), batch_size=None, num_workers=workers, prefetch_factor=2)
    return rate(loader, seconds)


def pipeline_rate(shards: Path, workers: int, seconds: float, spec: str | None = None) -> float:
    """Patches/s of the training loader over ``shards`` (or ``spec``, the same shards elsewhere)."""
    cfg = StreamConfig(
        shards=spec or str(shards), splits=splits_of(shards), patch_size=PATCH, quality=str(QUALITY), resampled=True
    )  # a continuous stream however small the set; default buffer (1000)
    loader = make_train_loader(cfg, batch_size=BATCH, num_workers=workers, epoch_patches=10**6)
    return rate(loader, seconds)


def serve_remote(shards: Path) -> tuple[str, str, Callable[[], None]]:
    """(http spec, s3 spec, stop) for the shards dir ``shards`` served from 127.0.0.1: the tests'
    HTTP server over its parent folder, and a moto S3 server holding a copy."""
    sys.path.insert(0, str(REPO / "tests"))
    import logging

    import boto3
    from moto.server import ThreadedMotoServer
    from objstore import S3_ENV, FaultServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    http = FaultServer(shards.parent)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    os.environ.update(S3_ENV)  # the DataLoader workers inherit the endpoint and test keys
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench-loader")
    for f in sorted(shards.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), "bench-loader", f"{shards.name}/{f.relative_to(shards)}")

    def stop() -> None:
        http.stop()
        moto.stop()

    return http.url(shards.name), f"s3://bench-loader/{shards.name}", stop


def protocol_rates(shards: Path, seconds: float) -> dict[str, float] | None:
    """Patches/s with one DataLoader worker reading ``shards`` locally, over HTTP and from S3
    (alternated ABC CBA, mean of the two); None (with a note) when the servers cannot run."""
    try:
        http, s3, stop = serve_remote(shards)
    except Exception as exc:  # noqa: BLE001 (moto/s3fs missing or failing: the rows are optional)
        print(
            f"note: HTTP/S3 loader rows skipped ({type(exc).__name__}: {exc}); pip install -e '.[dev,s3]'",
            file=sys.stderr,
        )
        return None
    specs = {"local": None, "http": http, "s3": s3}
    rates: dict[str, list[float]] = {k: [] for k in specs}
    try:
        for order in (list(specs), list(specs)[::-1]):
            for name in order:
                rates[name].append(pipeline_rate(shards, 1, seconds, spec=specs[name]))
    finally:
        stop()
    return {k: statistics.mean(v) for k, v in rates.items()}


def epochs_vs_resampled(shards: Path, workers: int, seconds: float, rounds: int = 4) -> tuple[int, float, float]:
    """One-pass epochs (no tile twice per epoch; one iterator across epochs, as the trainer reads
    it) against resampled shards with the same epoch length, ``rounds`` times in alternating order
    (ABBA: on a shared machine the first of a pair measured faster either way). Returns (batches
    per epoch, one-pass median patches/s, resampled median patches/s), over ``workers`` workers."""
    splits = [s for s in splits_of(shards) if s in ("train", "val")]
    one_pass = StreamConfig(shards=str(shards), splits=splits, patch_size=PATCH, quality=str(QUALITY))
    bpe = make_train_loader(one_pass, batch_size=BATCH, num_workers=workers).batches_per_epoch
    resampled = dataclasses.replace(one_pass, resampled=True)
    rates: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for cfg in (one_pass, resampled)[:: 1 if r % 2 == 0 else -1]:
            loader = make_train_loader(cfg, batch_size=BATCH, num_workers=workers, epoch_patches=bpe * BATCH)
            rates[cfg.resampled].append(rate(loader, seconds))
            del loader
    return bpe, statistics.median(rates[False]), statistics.median(rates[True])


def paced(shards: Path, resampled: bool, workers: int, step_s: float, epochs: int = 2) -> tuple[float, float, float]:
    """A consumer that spends ``step_s`` per batch (like a GPU step) reads ``epochs`` epochs after a
    warm-up one: (patches/s it gets, mean wait for the first batch of an epoch, data-wait fraction)."""
    splits = [s for s in splits_of(shards) if s in ("train", "val")]
    cfg = StreamConfig(shards=str(shards), splits=splits, patch_size=PATCH, quality=str(QUALITY), resampled=resampled)
    bpe = make_train_loader(
        dataclasses.replace(cfg, resampled=False), batch_size=BATCH, num_workers=workers
    ).batches_per_epoch
    loader = make_train_loader(cfg, batch_size=BATCH, num_workers=workers, epoch_patches=bpe * BATCH)
    it = iter(loader)
    for _ in range(bpe):
        next(it)
    waits, boundary, start = 0.0, [], time.perf_counter()
    for i in range(epochs * bpe):
        t = time.perf_counter()
        next(it)
        wait = time.perf_counter() - t
        waits += wait
        if i % bpe == 0:
            boundary.append(wait)
        time.sleep(step_s)
    elapsed = time.perf_counter() - start
    return epochs * bpe * BATCH / elapsed, statistics.mean(boundary), waits / elapsed


def gpu_estimate(per_worker: float, per_worker_ppm: float) -> list[str]:
    from restorer.model import ModelConfig, build_model, flops_per_pixel

    fwd = flops_per_pixel(build_model(ModelConfig(preset="default")))
    train_per_patch = 3 * fwd * PATCH * PATCH
    peak = 989e12  # H100 SXM dense bf16 tensor-core peak
    lines = [
        f"GPU feed estimate (default model: {fwd / 1e6:.2f} MFLOP/pixel forward, training ~3x = "
        f"{train_per_patch / 1e9:.1f} GFLOP per {PATCH} px patch; H100 dense bf16 peak 989 TFLOPS):"
    ]
    # 64-channel 3x3 convs sit near the H100's compute/bandwidth ridge (~290 FLOP/byte in bf16) and
    # the 1x1 convs, PReLUs and skip adds are bandwidth-bound: 20-35% of peak is a realistic range.
    for util in (0.20, 0.25, 0.35):
        patches = util * peak / train_per_patch
        lines.append(
            f"  at {util:.0%} of peak ({util * peak / 1e12:.0f} TFLOPS): {patches:,.0f} patches/s "
            f"-> {patches / per_worker:.1f} loader workers on webp shards ({per_worker:.0f}/s each), "
            f"{patches / per_worker_ppm:.1f} on ppm shards ({per_worker_ppm:.0f}/s each)"
        )
    lines.append("  (assumption, not measured on a GPU here; bench/train_step.py measures the real step rate)")
    return lines


def prepare(cache: Path, images: int) -> tuple[list[Path], list[Path], dict[str, Path], str]:
    """(2K-class files, BSDS500 files, shard folders by name, what built them): built once into ``cache``."""
    files_2k = make_2k_set(cache / "div2k_class", images)
    files_bsds = bsds_files()
    folder = ["--folder", str(files_2k[0].parent), "--val-fraction", "0"]
    shards = {}
    shards["2k_webp"], made_by = build_shards(cache / "shards_2k_webp", folder, "webp", files_2k)
    shards["2k_png"], _ = build_shards(cache / "shards_2k_png", folder, "png", files_2k)
    shards["2k_ppm"], _ = build_shards(cache / "shards_2k_ppm", folder, "ppm", files_2k)
    shards["bsds_webp"], _ = build_shards(cache / "shards_bsds_webp", ["--bsds", str(BSDS)], "webp", files_bsds)
    return files_2k, files_bsds, shards, made_by


def print_header(files_2k: list[Path], files_bsds: list[Path], made_by: str, prep: float, workers: int, sec: float):
    print(
        f"loader benchmark: {PATCH} px patches, JPEG q{QUALITY} 4:2:0, batch {BATCH}, rescale p=0.5 "
        f"{PARAMS.rescale_scales}, rotate p=0.5, patches_per_image 4, shuffle buffer 1000"
    )
    print(
        f"data: 2K-class = {len(files_2k)} PNGs 2040x1356 (4x4 mosaics of BSDS500 photos, bicubic); "
        f"BSDS500 = {len(files_bsds)} JPEGs; shards by {made_by} (512 px tiles); prep {prep:.0f}s"
    )
    print(
        f"machine: {os.cpu_count()} cpu(s) (shared); totals use {workers} DataLoader workers; "
        f"{sec:.0f}s windows, steady state (after the first batch)"
    )


def print_epochs(bpe: int, one_pass: float, resampled: float, step_s: float, paced_rows: list[tuple]) -> None:
    print(
        f"BSDS500 train+val, 16 per shard, 2 workers: one-pass epochs of {bpe} batches {one_pass:.1f} patches/s "
        f"vs resampled {resampled:.1f} patches/s ({one_pass / resampled:.2f}x)"
    )
    print(f"  the same, read by a consumer taking {step_s * 1000:.0f} ms per batch (80% of the loader's rate):")
    for name, got, boundary, wait_frac in paced_rows:
        print(
            f"  {name:10s} {got:7.1f} patches/s, first batch of an epoch waited {boundary * 1000:6.0f} ms, "
            f"data wait {wait_frac:.1%}"
        )


def print_remote(remote: dict[str, float]) -> None:
    print("protocol layer, 2K-class webp shards, 1 DataLoader worker, servers on 127.0.0.1 in the bench process:")
    print(f"  {'shards read from':40s} {'patches/s/worker':>16s} {'vs local':>9s}")
    for name, label in (
        ("local", "local files"),
        ("http", "http:// (urlio, Python HTTP server)"),
        ("s3", "s3:// (urlio + s3fs, moto server)"),
    ):
        print(f"  {label:40s} {remote[name]:16.1f} {remote[name] / remote['local']:8.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--seconds", type=float, default=6.0, help="timing window per measurement")
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="workers for the totals")
    ap.add_argument("--images", type=int, default=16, help="2K-class images to generate")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "restorer-bench-loader")
    ap.add_argument("--no-remote", action="store_true", help="skip the HTTP / S3 rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    sec = args.seconds
    files_2k, files_bsds, shards, made_by = prepare(args.cache, args.images)
    prep = time.perf_counter() - t0

    ceil = ceiling(min(sec, 3.0))
    b2k = baseline_rate(files_2k, 0, sec * 1.5)
    p2k = pipeline_rate(shards["2k_webp"], 0, sec)
    p2k_png = pipeline_rate(shards["2k_png"], 0, sec)
    p2k_ppm = pipeline_rate(shards["2k_ppm"], 0, sec)
    b2k_tot = baseline_rate(files_2k, args.workers, sec)
    p2k_tot = pipeline_rate(shards["2k_webp"], args.workers, sec)
    aug_whole = augment_rate(files_2k, augment.whole_image, min(sec, 2.0))
    aug_crop = augment_rate(files_2k, augment.crop_first, min(sec, 2.0))
    bb = baseline_rate(files_bsds, 0, sec)
    pb = pipeline_rate(shards["bsds_webp"], 0, sec)
    sh_bsr, _ = build_shards(
        args.cache / "shards_bsds_16", ["--bsds", str(BSDS), "--max-samples", "16"], "webp", files_bsds
    )
    bpe, one_pass, resampled = epochs_vs_resampled(sh_bsr, 2, sec)
    step_s = BATCH / (0.8 * min(one_pass, resampled))  # a consumer at 80% of what the loader gives
    paced_rows = [(name, *paced(sh_bsr, res, 2, step_s)) for name, res in (("one-pass", False), ("resampled", True))]
    remote = None if args.no_remote else protocol_rates(shards["2k_webp"], sec)
    rows = [
        ("ceiling: Pillow crop + JPEG q10, no decode", ceil, None, ceil / b2k),
        ("2K-class  baseline: whole PNG file per sample", b2k, b2k_tot, 1.0),
        ("2K-class  pipeline: webp tile shards (builder default)", p2k, p2k_tot, p2k / b2k),
        ("2K-class  pipeline: png tile shards", p2k_png, None, p2k_png / b2k),
        ("2K-class  pipeline: ppm tile shards (--encoding ppm)", p2k_ppm, None, p2k_ppm / b2k),
        ("BSDS500   baseline: whole JPEG file per sample", bb, None, 1.0),
        ("BSDS500   pipeline: webp shards (tile = whole photo)", pb, None, pb / bb),
    ]
    print_header(files_2k, files_bsds, made_by, prep, args.workers, sec)
    print(f"{'':56s} {'patches/s/worker':>16s} {'total':>9s} {'ratio/worker':>13s}")
    for name, pw, tot, ratio in rows:
        total = f"{tot:9.1f}" if tot is not None else f"{'-':>9s}"
        print(f"{name:56s} {pw:16.1f} {total} {ratio:12.1f}x")
    print(
        f"augment only, 512 px tile -> {PATCH} px patch: whole-tile rescale/rotate {aug_whole:.0f}/s, "
        f"crop-first {aug_crop:.0f}/s ({aug_crop / aug_whole:.1f}x)"
    )
    print_epochs(bpe, one_pass, resampled, step_s, paced_rows)
    if remote is not None:
        print_remote(remote)
    print(f"pipeline share of the ceiling (per worker, 2K webp): {p2k / ceil:.0%}")
    for line in gpu_estimate(p2k, p2k_ppm):
        print(line)
    print(f"bench time: {time.perf_counter() - t0:.0f}s")
    print(f"one_pass_vs_resampled: {one_pass / resampled:.2f}x")
    if remote is not None:
        print(f"remote_vs_local: http {remote['http'] / remote['local']:.2f}x s3 {remote['s3'] / remote['local']:.2f}x")
    print(f"speedup: {p2k / b2k:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
