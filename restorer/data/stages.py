"""The training stream of one DataLoader worker as webdataset stages.

    shares (position.worker_shares)            endless: per epoch, the slot this worker plays, how
                                               many batches it owes, how many were handed out before
      -> reading.epoch_items: the slot's shards (plan.py / position.py), read by webdataset's tar
         stages (shards.tar_samples, with a handler that counts and skips bad shards), decoded,
         up to ``patches_per_image`` crop-first augmented patches per tile (augment.py), each with
         its drawn degradation (degrade.py) and its address; stops when the share is read
      -> shuffle_within_epochs: a shuffle buffer per epoch (shuffle.py); the next epoch's buffer
         fills while the last one drains, so there is no pause at epoch boundaries
      -> drop_consumed: a resumed epoch's placeholders (its consumed prefix) leave here
      -> jpeg: the degradation, applied as a patch leaves the buffer (in the worker)
      -> wds.batched: uint8 batches (batch.collate, one np.stack) with their addresses
      -> with_counts: each batch carries what was read, skipped and quarantined since the last one

Guarantees of one worker, for each epoch ``e`` of its shares (the loader adds the per-rank ones):

* exactly ``share.batches - share.skip`` batches, all of epoch ``e``'s patches, none of another;
  the batches after a resume point are those the uninterrupted stream had there (same bytes);
* every draw (shard order, crops, degradations, shuffle) comes from numpy Generators seeded by
  (seed, epoch, shard, sample) per tile and (seed, epoch, rank, slot, segment) per slot, so an epoch
  is reproducible whatever epoch or batch the iteration began at.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds

from restorer.data.batch import collate
from restorer.data.degrade import apply
from restorer.data.position import Share
from restorer.data.reading import Item, ReadContext, epoch_items, slot_rng
from restorer.data.shuffle import shuffle_within_epochs
from restorer.data.skips import Tally


class WorkerBatch(NamedTuple):
    degraded: torch.Tensor  # uint8 [B,C,P,P]
    clean: torch.Tensor  # uint8 [B,C,P,P]
    quality: torch.Tensor  # int64 [B]
    counts: dict[int, dict[str, int]]  # {epoch: {counter: n}} since the last batch
    addresses: torch.Tensor  # int64 [B] (position.address)
    failures: list[tuple[int, int]]  # (shard, quarantined until epoch) since the last batch
    epoch: int


def drop_consumed(
    items: Iterable[tuple[int, Item]], seen: dict[int, Share], batch_size: int
) -> Iterator[tuple[int, Item]]:
    """Drop the first ``skip x batch_size`` outputs of each epoch (handed out before a resume):
    exactly the placeholders, as the reader computed from the buffer's draws."""
    current, k = None, 0
    for epoch, item in items:
        if epoch != current:
            current, k = epoch, 0
        consumed = k < seen[epoch].skip * batch_size
        k += 1
        if consumed != (item.patch is None):
            raise RuntimeError(f"data replay out of step in epoch {epoch} at output {k - 1} (a restorer bug)")
        if not consumed:
            yield epoch, item


def jpeg(items: Iterable[tuple[int, Item]]) -> Iterator[tuple[np.ndarray, np.ndarray, int, int, int]]:
    """(epoch, Item) -> (degraded, clean, quality label, epoch, address); a chain's label is its
    effective quality (degrade.apply)."""
    for epoch, item in items:
        assert item.patch is not None and item.degradation is not None  # drop_consumed left only real patches
        yield *apply(item.patch, item.degradation), epoch, item.address


def _collate(items) -> tuple[Any, ...]:
    return (*collate(items), torch.tensor([it[4] for it in items], dtype=torch.int64), items[0][3])


def with_counts(batches: Iterable[tuple], tally: Tally) -> Iterator[WorkerBatch]:
    for deg, clean, q, addresses, epoch in batches:
        tally.add(epoch, "batches")
        tally.add(epoch, "patches", int(q.shape[0]))
        yield WorkerBatch(deg, clean, q, tally.take(), addresses, tally.take_failures(), epoch)


def worker_pipeline(ctx: ReadContext, shares: Iterable[Share]) -> wds.DataPipeline:
    """The stages of one worker over ``shares`` (``position.worker_shares`` in training)."""
    tally, seen = Tally(), dict[int, Share]()
    seed, size, batch = ctx.cfg.seed, ctx.cfg.shuffle_buffer, ctx.plan.batch_size
    return wds.DataPipeline(
        lambda: iter(shares),
        lambda src: epoch_items(ctx, src, tally, seen),
        lambda src: shuffle_within_epochs(src, size, lambda e: slot_rng(seed, seen[e], ctx.rank, 1)),
        lambda src: drop_consumed(src, seen, batch),
        jpeg,
        wds.batched(batch, collation_fn=_collate, partial=False),
        lambda src: with_counts(src, tally),
    )
