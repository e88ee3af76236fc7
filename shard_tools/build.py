"""The build: list inputs -> fix a deterministic sample order per split -> decode in worker
processes (bounded window) -> write shards in order -> manifest.

Order of a split (a pure function of the inputs and ``seed``, so a re-run recognises its shards):
random-access inputs (folders, zips) are pooled and shuffled by a seeded hash of each sample key;
tar archives must be read front to back, so each stays in stored order; the pool and the tar
streams are then interleaved by a seeded draw weighted by what each has left, so every shard
mixes sources. ``--max-images`` keeps the first N of each source in that order, duplicates of a
key are skipped, and ``--num-jobs K --job-index I`` keeps every K-th image starting at I.

Duplicate files: splits are built in order (train, val, test); an image whose file has the same
sha256 as one already written -- in this split or an earlier one, e.g. a photo reached both by
``--folder`` and by ``--bsds`` -- is skipped as ``duplicate of <first path>``, so no photo is in
both train and val/test. The check runs in the parent process in sample order (independent of
``--workers``); the journal lists the hashes of each shard's images, so a resumed run rebuilds
the set, and a split's fingerprint covers the hashes of the splits before it. Limitation: with
``--num-jobs`` each job only sees its own images, so ``merge`` does not dedupe across jobs.

Memory: one small record per input file, plus at most ``2 * workers + 2`` decoded images in
flight; images are never all held at once.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from restorer.errors import UserError
from shard_tools import __version__, remote, sources
from shard_tools.config import NON_CONTENT_FIELDS, BuildConfig
from shard_tools.existing import check_build_output, check_not_input
from shard_tools.images import Decoded, Skip, decode
from shard_tools.layout import MANIFEST
from shard_tools.verify import verify
from shard_tools.writer import (
    Journal,
    ShardSink,
    clean_split_dir,
    journalled_images,
    read_journal,
    split_summary,
    write_json_atomic,
    write_sizes,
)

log = logging.getLogger("shard_tools.build")

# Measured by bench/shards.py (see images.py); recorded in every manifest with the choice.
ENCODING_MEASUREMENT = {
    "what": "512px RGB tiles of real photos, Pillow 13, 1 core of a shared 2-core machine, "
    "bench/shards.py: [decode ms/tile, encode ms/tile, bytes/pixel]",
    "webp_lossless_m0": [3.51, 6.4, 1.255],
    "webp_lossless_m4": [3.59, 82.5, 1.138],
    "png1": [5.83, 15.4, 1.670],
    "png6": [5.69, 50.7, 1.584],
    "png9": [7.83, 113.4, 1.572],
    "ppm": [0.30, 0.2, 3.000],
    "choice": "webp (lossless, method 0): 1.33x smaller than PNG-1 and 1.66x faster to decode, "
    "2.4x smaller than PPM; --encoding ppm when the loader is decode-bound on fast "
    "local disk (decodes ~12x faster)",
}

SPLIT_ORDER = ("train", "val", "test")


# ----------------------------------------------------------------------------------- planning
def input_paths(cfg: BuildConfig) -> list[tuple[str, str]]:
    """(flag, path) of every input named."""
    named = (("--div2k", cfg.div2k), ("--bsds", cfg.bsds), ("--openimages", cfg.openimages), ("--folder", cfg.folder))
    return [(flag, p) for flag, paths in named for p in paths]


def check_inputs(cfg: BuildConfig) -> None:
    """Fail at once, before any work, on a missing input path."""
    for flag, p in input_paths(cfg):
        if not Path(p).expanduser().exists():
            raise UserError(f"{Path(p).expanduser()}: {flag} input not found")


def check_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{out}: output folder is not writable ({exc.strerror or exc})") from None


def collect(cfg: BuildConfig) -> list[sources.Stream]:
    streams: list[sources.Stream] = []
    for p in cfg.div2k:
        streams += sources.div2k(p)
    for p in cfg.bsds:
        streams += sources.bsds(p)
    if cfg.openimages:
        streams += sources.openimages(cfg.openimages)
    for p in cfg.folder:
        streams += sources.folder(p, cfg.val_fraction)
    if not cfg.has_inputs:
        log.info("no input named: building from scikit-image's sample photographs")
        streams += sources.default()
    return streams


def _shuffle_key(seed: int, ref: sources.Ref) -> tuple[bytes, str]:
    return hashlib.sha1(f"{seed}:{ref.key}".encode()).digest(), ref.where


def plan_split(streams: list[sources.Stream], cfg: BuildConfig, split: str) -> tuple[list[sources.Ref], list[dict]]:
    """The ordered refs this job builds for ``split``, and the refs skipped while planning."""
    pool = sorted((r for s in streams if not s.sequential for r in s.refs), key=lambda r: _shuffle_key(cfg.seed, r))
    lists = [pool] + [list(s.refs) for s in streams if s.sequential]
    lists = [lst for lst in lists if lst]
    rng = random.Random(f"{cfg.seed}:{split}")
    pos = [0] * len(lists)
    left = [len(lst) for lst in lists]
    order: list[sources.Ref] = []
    while sum(left):
        i = rng.choices(range(len(lists)), weights=left)[0]
        order.append(lists[i][pos[i]])
        pos[i] += 1
        left[i] -= 1
    kept: list[sources.Ref] = []
    skipped: list[dict] = []
    seen: dict[str, str] = {}
    per_source: Counter[str] = Counter()
    for ref in order:
        if ref.key in seen:
            skipped.append(
                {
                    "path": ref.where,
                    "reason": f"duplicate source id {ref.key} (also {seen[ref.key]})",
                    "source": ref.source,
                    "split": split,
                }
            )
            continue
        seen[ref.key] = ref.where
        if cfg.max_images is not None and per_source[ref.source] >= cfg.max_images:
            continue
        per_source[ref.source] += 1
        kept.append(ref)
    mine = kept[cfg.job_index :: cfg.num_jobs]
    return mine, (skipped if cfg.job_index == 0 else [])


def content_config(cfg: BuildConfig) -> dict:
    d = {k: v for k, v in vars(cfg).items() if k not in NON_CONTENT_FIELDS}
    return json.loads(json.dumps(d, default=str))


def fingerprint(cfg: BuildConfig, split: str, refs: list[sources.Ref], seen: dict[str, str] | None = None) -> str:
    """Of the content config, the ordered inputs and the images of the splits built before this
    one (``seen``: their file hashes decide which of this split's images are duplicates)."""
    seen_digest = hashlib.sha256("\n".join(f"{k}\t{v}" for k, v in sorted((seen or {}).items())).encode()).hexdigest()
    h = hashlib.sha256(
        json.dumps([__version__, split, content_config(cfg), "dedupe-sha256", seen_digest], sort_keys=True).encode()
    )
    for r in refs:
        h.update(f"\n{r.key}\t{r.where}\t{r.size}\t{r.rotation}".encode())
    return h.hexdigest()


def expected_fingerprints(
    out: Path, plans: dict[str, tuple[list[sources.Ref], list[dict]]], cfg: BuildConfig
) -> dict[str, str]:
    """split -> the fingerprint this build gives it, where ``out`` holds this build's journals.
    A split's fingerprint covers the images of the splits before it, read here from their
    journals; after the first split whose journal is not this build's, later splits cannot hold
    this build either (splits are built in order), so they are left out."""
    seen: dict[str, str] = {}
    expected = {}
    for split, (order, _) in plans.items():
        expected[split] = fingerprint(cfg, split, order, seen)
        journal = read_journal(out / split)
        if not journal or journal[0].get("fingerprint") != expected[split]:
            break
        seen.update(journalled_images(journal[1:]))
    return expected


# ----------------------------------------------------------------------------------- decoding
_READER: sources.Reader | None = None


def _process(ref: sources.Ref, data: bytes | None, skip_tiles: int, params: dict) -> tuple[str, Decoded | str]:
    """Runs in a worker: read (if not given) and decode one input. Never raises."""
    global _READER
    try:
        if data is None:
            if _READER is None:
                _READER = sources.Reader(params["max_file_bytes"])
            if 0 <= params["max_file_bytes"] < ref.size:
                raise Skip(f"file larger than max_file_bytes {params['max_file_bytes']}")
            data = _READER.read(ref)
        dec = decode(
            data,
            encoding=params["encoding"],
            tile=params["tile"],
            min_size=params["min_size"],
            max_pixels=params["max_pixels"],
            rotation=ref.rotation,
            downscale=params["downscale_lossy"] if ref.lossy else 1.0,
            skip_tiles=skip_tiles,
        )
        return "ok", dec
    except Skip as exc:
        return "skip", str(exc)
    except MemoryError:
        return "skip", "out of memory while decoding"
    except Exception as exc:  # a reader error (I/O, bad zip member ...) must not end the build
        return "skip", f"unreadable ({type(exc).__name__}: {exc})"


def _tasks(
    order: list[sources.Ref], start: int, start_tile: int, max_file_bytes: int
) -> Iterator[tuple[int, sources.Ref, bytes | None, str | None, int]]:
    """(index, ref, bytes-or-None, skip reason, tiles to skip); tar members read here, in order."""
    cursors: dict[str, sources.TarCursor] = {}
    broken: dict[str, str] = {}
    try:
        for idx in range(start, len(order)):
            ref = order[idx]
            data, reason = None, None
            if ref.kind == "tar":
                if ref.container in broken:
                    reason = broken[ref.container]
                else:
                    cur = cursors.get(ref.container)
                    if cur is None:
                        cur = cursors[ref.container] = sources.TarCursor(ref.container, max_file_bytes)
                    try:
                        data = cur.read(ref.member)
                    except Skip as exc:
                        reason = str(exc)
                    except Exception as exc:  # truncated / corrupt archive: rest unreadable
                        reason = broken[ref.container] = f"archive unreadable ({exc})"
            yield idx, ref, data, reason, (start_tile if idx == start else 0)
    finally:
        for cur in cursors.values():
            cur.close()


def _worker_init(parent: int) -> None:
    """Workers exit on their own when the builder dies (e.g. SIGKILL), instead of lingering."""

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def _results(tasks, params: dict, workers: int):
    """Ordered results with at most 2*workers+2 in flight."""
    if workers <= 1:
        for idx, ref, data, reason, skip_tiles in tasks:
            res = ("skip", reason) if reason else _process(ref, data, skip_tiles, params)
            yield idx, ref, res
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    window: collections.deque = collections.deque()
    with cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
    ) as ex:
        for idx, ref, data, reason, skip_tiles in tasks:
            fut = None if reason else ex.submit(_process, ref, data, skip_tiles, params)
            window.append((idx, ref, fut, reason))
            while len(window) > 2 * workers + 2:
                i, r, f, why = window.popleft()
                yield i, r, (("skip", why) if f is None else f.result())
        while window:
            i, r, f, why = window.popleft()
            yield i, r, (("skip", why) if f is None else f.result())


# ----------------------------------------------------------------------------------- building
def _write_image(sink: ShardSink, ref: sources.Ref, dec: Decoded, split: str, ext: str, pos: tuple[int, int]) -> None:
    """One sample per tile of a decoded image; ``pos`` is (image index, index of its first tile written)."""
    idx, first = pos
    for i, t in enumerate(dec.tiles):
        meta = {
            "source": ref.source,
            "source_id": ref.source_id,
            "split": split,
            "orig_size": list(dec.orig_size),
            "size": list(dec.size),
            "tile": {"y": t.y, "x": t.x, "h": t.h, "w": t.w},
            "sha256": dec.sha256,
            "file": ref.where,
            "format": dec.orig_format,
            "mode": dec.orig_mode,
            "rotation": dec.rotation,
        }
        sample = {"__key__": f"{ref.key}/{t.y}_{t.x}", ext: t.data, "json": json.dumps(meta).encode()}
        sink.write(sample, (idx, first + i))


def build_split(
    out: Path,
    split: str,
    order: list[sources.Ref],
    fp: str,
    cfg: BuildConfig,
    bar=None,
    seen: dict[str, str] | None = None,
) -> list[dict]:
    """Build one split. ``seen`` (sha256 of an original file -> its path) holds the images of
    the splits built before; an image whose file hash is in it is skipped as a duplicate, and
    every image written is added to it. The check runs here, in the parent, in sample order,
    so it does not depend on --workers; a resumed run rebuilds ``seen`` from the journal."""
    seen = {} if seen is None else seen
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(split_dir, fp)
    records = journal.load()
    seen.update(journalled_images(records))
    if records and records[-1].get("final"):
        clean_split_dir(split_dir, keep=sum(1 for r in records if "shard" in r))
        log.info("%s: %d shard(s) already complete, nothing to do", split_dir, sum(1 for r in records if "shard" in r))
        if bar is not None:
            bar.update(len(order))
        return records
    n_done = sum(1 for r in records if "shard" in r)
    start, start_tile = records[-1]["end"] if records else (0, 0)
    clean_split_dir(split_dir, keep=n_done)
    journal.start()
    if n_done:
        log.info("%s: resuming after %d complete shard(s), at image %d of %d", split_dir, n_done, start, len(order))
    if bar is not None:
        bar.update(start)
    sink = ShardSink(split_dir, journal, n_done, cfg.max_samples, cfg.max_bytes)
    params = {
        k: getattr(cfg, k) for k in ("encoding", "tile", "min_size", "max_pixels", "downscale_lossy", "max_file_bytes")
    }
    ext = cfg.encoding
    try:
        for idx, ref, (status, res) in _results(
            _tasks(order, start, start_tile, cfg.max_file_bytes), params, cfg.n_workers
        ):
            if status == "ok" and res.sha256 in seen:
                status, res = "skip", f"duplicate of {seen[res.sha256]}"
            if status == "skip":
                log.debug("skip %s: %s", ref.where, res)
                sink.note_skip({"path": ref.where, "reason": res, "source": ref.source, "split": split})
            else:
                dec: Decoded = res
                _write_image(sink, ref, dec, split, ext, (idx, start_tile if idx == start else 0))
                seen[dec.sha256] = ref.where
                sink.note_image(ref.source, dec.sha256, ref.where)
            if bar is not None:
                bar.update(1)
        sink.close((len(order), 0))
    except BaseException:
        sink.abort()
        raise
    clean_split_dir(split_dir, keep=sum(1 for r in journal.records if "shard" in r))
    return journal.records


def build(cfg: BuildConfig) -> dict:
    """Build into ``cfg.out``: a local folder, or a URL (built in a staging folder, then uploaded
    with the manifest last, see shard_tools.remote)."""
    t0 = time.time()
    check_inputs(cfg)
    if remote.is_remote(cfg.out):
        remote.check_writable(cfg.out)
        remote.check_replace(cfg.out, content_config(cfg), cfg.overwrite)
        with remote.staging(cfg.out, cfg.stage_dir) as out:
            check_not_input(out, input_paths(cfg))
            check_output(out)
            manifest = build_into(cfg, out)
            remote.upload(out, cfg.out, manifest, cfg.overwrite)
    else:
        out = Path(cfg.out).expanduser()
        check_not_input(out, input_paths(cfg))
        check_output(out)
        manifest = build_into(cfg, out)
    print_summary(manifest, time.time() - t0)
    if cfg.verify:
        problems = verify(cfg.out if remote.is_remote(cfg.out) else out)
        for line in problems:
            print(line, file=sys.stderr)
        manifest["verify_problems"] = problems
    return manifest


def build_into(cfg: BuildConfig, out: Path) -> dict:
    """The build itself, into the local folder ``out``; returns the manifest written there."""
    streams = collect(cfg)
    by_split: dict[str, list[sources.Stream]] = {}
    for s in streams:
        by_split.setdefault(s.split, []).append(s)
    splits = sorted(by_split, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s))
    plans = {split: plan_split(by_split[split], cfg, split) for split in splits}
    check_build_output(out, expected_fingerprints(out, plans, cfg), cfg.overwrite)
    total = sum(len(p[0]) for p in plans.values())
    log.info(
        "%d input images in %s (job %d of %d), %d worker(s), encoding %s, out %s",
        total,
        ", ".join(f"{s}: {len(plans[s][0])}" for s in splits),
        cfg.job_index,
        cfg.num_jobs,
        cfg.n_workers,
        cfg.encoding,
        out,
    )
    bar = None
    if cfg.progress:
        bar = tqdm(total=total, unit="img", desc="shards", file=sys.stderr, dynamic_ncols=True)
    manifest_splits: dict[str, dict] = {}
    sources_count: dict[str, dict[str, int]] = {}
    skipped: list[dict] = []
    seen: dict[str, str] = {}  # sha256 of every original file written so far -> its path
    try:
        for split in splits:
            order, pre_skipped = plans[split]
            fp = fingerprint(cfg, split, order, seen)
            records = build_split(out, split, order, fp, cfg, bar, seen)
            info, src, skp = split_summary(records, split)
            manifest_splits[split] = info
            for name, n in src.items():
                sources_count.setdefault(name, {})[split] = n
            skipped.extend(pre_skipped + skp)
            write_sizes(out / split, info["shards"])
    finally:
        if bar is not None:
            bar.close()
    manifest = {
        "format": 1,
        "package_version": __version__,
        "encoding": cfg.encoding,
        "encoding_measurement": ENCODING_MEASUREMENT,
        "splits": manifest_splits,
        "sources": sources_count,
        "skipped": skipped,
        "config": json.loads(json.dumps(vars(cfg), default=str)),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def print_summary(manifest: dict, seconds: float) -> None:
    rows = [("split", "images", "samples", "shards", "MB", "skipped")]
    skipped = Counter(s["split"] for s in manifest["skipped"])
    for split, info in manifest["splits"].items():
        images = sum(per.get(split, 0) for per in manifest["sources"].values())
        rows.append(
            (
                split,
                str(images),
                str(info["samples"]),
                str(len(info["shards"])),
                f"{sum(s['bytes'] for s in info['shards']) / 1e6:.1f}",
                str(skipped[split]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    src = ", ".join(f"{name} {sum(per.values())}" for name, per in manifest["sources"].items())
    print(
        "\n".join(lines) + f"\nsources: {src or '-'}; {len(manifest['skipped'])} skipped; {seconds:.1f} s",
        file=sys.stdout,
    )
    reasons = Counter(
        "duplicate of an earlier image"
        if s["reason"].startswith("duplicate of ")
        else s["reason"].split(" (")[0].split(":")[0]
        for s in manifest["skipped"]
    )
    for reason, n in reasons.most_common(5):
        print(f"  skipped {n}: {reason}", file=sys.stdout)
