"""The validation stream: deterministic centre crops of a split, JPEG-compressed at each quality.

This rank's share is the samples with global index % world_size == rank (disjoint, near-equal);
DataLoader workers split a rank's share the same way. Crops are ``crop`` px squares from the tile
centre, or the tile's short side (rounded down to a multiple of 8) for smaller tiles; a batch
holds crops of one size only. Each sample gives one item per quality, in order. Bad shards and
corrupt samples are skipped and counted (shards are read through urlio, as in training: timeouts,
retries, ``missing_shards`` for one that does not exist); a split with nothing readable raises
UserError.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from restorer.data import augment, shards
from restorer.data.batch import collate
from restorer.data.degrade import SUBSAMPLING, jpeg_roundtrip, parse_subsampling
from restorer.data.shards import Shard, resolve_shards
from restorer.data.skips import COUNTERS, warn
from restorer.data.workers import init_worker, unwrap_worker_error
from restorer.errors import UserError


def val_crop_size(height: int, width: int, crop: int) -> int:
    """Side of the centre crop of a val tile: ``crop``, or the tile's short side when smaller,
    rounded down to a multiple of 8 (whole JPEG blocks)."""
    return min(crop, height, width) // 8 * 8


@dataclasses.dataclass(frozen=True)
class ValOptions:
    """How to read a validation split (see :func:`make_val_loader`)."""

    split: str | None = "val"
    qualities: Sequence[int] = (10, 20, 30, 40)
    crop: int = 256
    rank: int = 0
    world_size: int = 1
    batch_size: int = 8
    num_workers: int = 0
    grayscale: bool = False
    chroma_subsampling: str = "4:2:0"


class ValStream(IterableDataset):
    """Items of this rank (and worker) as batches (degraded, clean, quality, counts)."""

    def __init__(self, shard_list: list[Shard], options: ValOptions, subsampling: str):
        super().__init__()
        self.shards, self.qualities, self.crop = shard_list, tuple(options.qualities), options.crop
        self.rank, self.world_size, self.batch_size = options.rank, options.world_size, options.batch_size
        self.grayscale, self.subsampling = options.grayscale, subsampling

    def __iter__(self):
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        counts: Counter = Counter()
        pending: list = []

        def flush():
            out = collate(pending)
            pending.clear()
            counts["batches"] += 1
            taken = dict(counts)
            counts.clear()
            return (*out, taken)

        offset = 0  # global sample index at the start of each shard (from the counts when known)
        for shard in self.shards:
            index = offset
            errors = shards.ShardErrors()
            for sample in shards.tar_samples([shard.url], errors):
                mine = index % self.world_size == self.rank and (index // self.world_size) % nw == worker
                index += 1
                if not mine:
                    continue
                try:
                    img = augment.decode_image(shards.image_of(sample)[1], grayscale=self.grayscale)
                except Exception as exc:  # noqa: BLE001
                    counts["corrupt_samples"] += 1
                    warn.warning("%s: corrupt val sample %s skipped: %s", shard.url, sample.get("__key__"), exc)
                    continue
                c = val_crop_size(img.height, img.width, self.crop)
                if c < 8:
                    counts["small_tiles"] += 1
                    continue
                y, x = (img.height - c) // 2, (img.width - c) // 2
                clean = np.asarray(img.crop((x, y, x + c, y + c)))
                counts["tiles"] += 1
                for q in self.qualities:
                    if pending and pending[0][1].shape != clean.shape:
                        yield flush()
                    pending.append((jpeg_roundtrip(clean, q, self.subsampling), clean, int(q)))
                    counts["patches"] += 1
                    if len(pending) == self.batch_size:
                        yield flush()
            counter, error = errors.take()
            if error is not None:
                counts[counter] += 1
                what = "missing val shard" if counter == "missing_shards" else "bad val shard"
                warn.warning("%s: %s skipped: %s", shard.url, what, error)
            offset = offset + shard.samples if shard.samples is not None else index
        if pending:
            yield flush()
        elif counts:
            yield None, None, None, dict(counts)  # counts only: the main process drops this item


class ValLoader:
    """Deterministic validation batches (see the module docstring)."""

    def __init__(self, spec: str, options: ValOptions):
        qualities, crop, rank, world_size = options.qualities, options.crop, options.rank, options.world_size
        if not qualities or any(not 1 <= int(q) <= 100 for q in qualities):
            raise UserError(f"val qualities must lie in 1..100, got {list(qualities)}")
        try:
            subsampling = parse_subsampling(options.chroma_subsampling)[0]
        except ValueError:
            subsampling = None
        if subsampling is None or crop < 8 or options.batch_size < 1 or not 0 <= rank < world_size:
            raise UserError(
                "val loader: need crop >= 8, batch_size >= 1, 0 <= rank < world_size and a known "
                f"chroma_subsampling ({', '.join(SUBSAMPLING)})"
            )
        self.spec = spec
        split = options.split
        self.shards, self.listed_missing = resolve_shards(spec, None if split is None else [split])
        self.rank, self.world_size = rank, world_size
        self.qualities = tuple(int(q) for q in qualities)
        total = sum(s.samples or 0 for s in self.shards) if all(s.samples is not None for s in self.shards) else None
        self.num_tiles = None if total is None else len(range(rank, total, world_size))  # this rank
        self._counts: Counter = Counter()
        dataset = ValStream(self.shards, dataclasses.replace(options, qualities=self.qualities), subsampling)
        if options.num_workers > 0:
            self._loader = DataLoader(
                dataset, batch_size=None, num_workers=options.num_workers, worker_init_fn=init_worker
            )
        else:
            self._loader = DataLoader(dataset, batch_size=None, num_workers=0)

    def stats(self) -> dict[str, int]:
        return {name: int(self._counts[name]) for name in COUNTERS}

    def __iter__(self):
        before = self._counts["patches"]
        try:
            for deg, clean, q, counts in self._loader:
                self._counts.update(counts)
                if deg is not None:
                    yield deg, clean, q
        except UserError as exc:
            raise unwrap_worker_error(exc) from None
        if self.num_tiles and self._counts["patches"] == before:
            raise UserError(
                f"{self.spec}: no readable validation samples (rank {self.rank}: "
                f"{self._counts['bad_shards']} bad shards, {self._counts['missing_shards']} missing, "
                f"{self._counts['corrupt_samples']} corrupt)"
            )


def make_val_loader(shards: str, options: ValOptions | None = None, **fields: Any) -> ValLoader:
    """Validation stream (see the module docstring) of the shards ``shards``, read as ``options``
    say (or a :class:`ValOptions` of ``fields``: ``make_val_loader(spec, crop=64, rank=1, world_size=2)``).

    ``split``: the split of the shards dir ``shards`` (manifest.json or a ``<split>/`` folder); a
    spec without splits (a folder of tars, a brace/``::``/``pipe:`` pattern) has none but
    ``train``, so asking it for ``val`` raises UserError instead of validating on training data.
    ``split=None``: ``shards`` *are* the validation shards -- a pattern or tar as is, a folder's
    ``*.tar``, or a manifest's only split (e.g. the trainer's ``--val-shards``).
    ``chroma_subsampling``: as the training stream's option; with several listed (drawn per patch
    in training) validation uses the first, so that it stays deterministic."""
    if options is not None and fields:
        raise TypeError("make_val_loader: pass options or its fields, not both")
    return ValLoader(shards, options if options is not None else ValOptions(**fields))
