"""Resume time vs position in the epoch: how long a loader started at a saved data position takes
to hand out its first batch, at the start, the middle and the end of an epoch.

A resumed loader replays its epoch in skip mode (restorer.data.position): what was consumed before
the checkpoint is passed over without decoding, and shards all of whose tiles were consumed are not
opened. So the time to the first batch should not grow with the position; the ``naive`` column is
what reading the consumed batches again would cost (the time the positions took to reach).

Data: the real BSDS500 (train+val+test JPEGs) as 512 px lossless webp tiles in shards of 16, built
by ``python -m shard_tools build`` into ``--cache``; 128 px patches, 4 per tile, batches of 32, one
process. ``decoded`` counts the tiles decoded before the first batch (``--workers 0`` pass, in this
process, so it is exact); ``time`` is the median of ``--repeats`` starts with ``--workers`` loader
workers (worker start included), the positions alternated.

examples:
  python bench/resume.py
  python bench/resume.py --workers 2 --repeats 5 --cache /tmp/restorer-bench-loader --bsds ../shared/datasets/BSR

The last line is ``resume_end_over_start: <ratio>x`` (time to the first batch at the end of an epoch
over at its start).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchcli import parser  # noqa: E402
from restorer.data import augment  # noqa: E402
from restorer.data.config import StreamConfig  # noqa: E402
from restorer.data.loader import make_train_loader  # noqa: E402

BSDS = REPO.parent / "shared" / "datasets" / "BSR"
BATCH = 32


def build(cache: Path, bsds: Path) -> Path:
    out = cache / "shards_bsds_16"
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "shard_tools", "build", "--bsds", str(bsds), "--out", str(out), "--tile", "512",
               "--encoding", "webp", "--max-samples", "16", "--workers", str(min(4, os.cpu_count() or 1))]  # fmt: skip
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"error: shard_tools build failed: {res.stderr.strip().splitlines()[-1:]}")
    return out


def config(shards: Path) -> StreamConfig:
    splits = sorted(json.loads((shards / "manifest.json").read_text())["splits"])
    return StreamConfig(shards=str(shards), splits=splits, patch_size=128, patches_per_image=4, quality="10", seed=0)


def first_batch(cfg: StreamConfig, pos, workers: int) -> float:
    loader = make_train_loader(cfg, batch_size=BATCH, num_workers=workers)
    t0 = time.perf_counter()
    loader.start_at(pos)
    next(iter(loader))
    return time.perf_counter() - t0


def decoded_before_first_batch(cfg: StreamConfig, pos) -> int:
    real, count = augment.decode_image, [0]

    def counting(*a, **kw):
        count[0] += 1
        return real(*a, **kw)

    augment.decode_image = counting
    try:
        first_batch(cfg, pos, 0)
    finally:
        augment.decode_image = real
    return count[0]


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--workers", type=int, default=2, help="loader workers for the timed starts")
    ap.add_argument("--repeats", type=int, default=5, help="timed starts per position")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "restorer-bench-loader")
    ap.add_argument("--bsds", type=Path, default=BSDS, help="folder holding BSDS500/ (default: ../shared/datasets/BSR)")
    args = ap.parse_args(argv)
    if not (args.bsds / "BSDS500" / "data" / "images").is_dir():
        sys.exit(f"error: BSDS500 not found under {args.bsds} (CI and developers have it in ../shared)")
    cfg = config(build(args.cache, args.bsds))
    probe = make_train_loader(cfg, batch_size=BATCH, num_workers=args.workers)
    bpe = probe.batches_per_epoch
    marks = {"start": 0, "middle": bpe // 2, "end": bpe - 1}
    positions, naive = {}, {}
    for name, k in marks.items():
        loader = make_train_loader(cfg, batch_size=BATCH, num_workers=args.workers)
        t0 = time.perf_counter()
        list(itertools.islice(iter(loader), k + 1))  # k batches consumed, and one more (the first after resume)
        naive[name] = time.perf_counter() - t0
        loader = make_train_loader(cfg, batch_size=BATCH, num_workers=args.workers)
        list(itertools.islice(iter(loader), k))
        positions[name] = loader.position()
    decoded = {name: decoded_before_first_batch(cfg, pos) for name, pos in positions.items()}
    times: dict[str, list[float]] = {name: [] for name in marks}
    for r in range(args.repeats):
        for name in marks if r % 2 == 0 else reversed(marks):
            times[name].append(first_batch(cfg, positions[name], args.workers))
    print(f"BSDS500 shards, {len(probe.plan.shards)} shards, {bpe} batches of {BATCH} per epoch, "
          f"{args.workers} workers, {args.repeats} starts per position (median)")  # fmt: skip
    print(f"{'position':<22}{'first batch':>14}{'decoded tiles':>15}{'naive replay':>15}")
    for name, k in marks.items():
        print(f"{name + f' (batch {k})':<22}{statistics.median(times[name]):>12.2f} s{decoded[name]:>15}"
              f"{naive[name]:>13.1f} s")  # fmt: skip
    ratio = statistics.median(times["end"]) / statistics.median(times["start"])
    print(f"resume_end_over_start: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
