"""The training stream of one slot (rank, DataLoader worker) as webdataset stages.

    epochs (start, start + 1, ...)                                  endless; the slot is fixed per iteration
      -> epoch_patches: per epoch, this slot's shards (plan.py), read by webdataset's tar stages
         (shards.tar_samples, with a handler that counts and skips bad shards), decoded,
         ``patches_per_image`` crop-first augmented patches per tile (augment.py), each with its
         drawn degradation (degrade.py); stops when the epoch's share of patches is read
      -> shuffle_within_epochs: a shuffle buffer per epoch; the next epoch's buffer fills while
         the last one drains, so there is no pause at epoch boundaries
      -> jpeg: the degradation, applied as a patch leaves the buffer (in the worker)
      -> wds.batched: uint8 batches (batch.collate, one np.stack)
      -> with_counts: each batch carries what was read and skipped since the last one (skips.py)

Guarantees of one slot, for each epoch ``e`` (the loader adds the per-rank ones):

* exactly ``plan.slot_batches(e, slot)`` batches, all of epoch ``e``'s patches, none of another;
* without resampling, its own shards (``plan.slot_shards``) in a random order; a shard that fails
  (truncated, undecodable, a read that failed after urlio's retries or timed out, a failing pipe)
  is counted as ``bad_shards``, one that does not exist (vanished file, missing object, 404) as
  ``missing_shards``, and skipped; if the own shards run short the epoch tops up from all shards
  but the failed ones (``refill_tiles``), so the slot's batch count never changes;
  with resampling, shards drawn with replacement, weighted by sample count;
* every draw (shard order, crops, degradations, shuffle) comes from numpy Generators seeded by
  (seed, epoch, rank, slot), so an epoch is reproducible whatever epoch the iteration began at;
* a stream that finds no usable tile in many shard tries in a row raises UserError naming the
  spec, instead of hanging.
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Iterable, Iterator, Optional

import numpy as np
import webdataset as wds

from restorer.data import augment, shards
from restorer.data.augment import TileTooSmall
from restorer.data.batch import collate
from restorer.data.config import StreamConfig
from restorer.data.degrade import apply, draw_degradation, parse_quality
from restorer.data.plan import Plan
from restorer.data.skips import Tally, warn
from restorer.errors import UserError


def epoch_rng(seed: int, epoch: int, rank: int, slot: int, *purpose: int) -> np.random.Generator:
    """Reading (shard order, crops, degradations): (seed, epoch, rank, slot); the shuffle: purpose 1."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, slot, *purpose]))


class _ShardTries:
    """The shards one epoch of a slot reads, in order, and which of them failed. A shard counts as
    tried when the next one is asked for (webdataset reads lazily, so it is finished by then)."""

    def __init__(self, plan: Plan, rank: int, slot: int, epoch: int, rng: np.random.Generator,
                 tally: Tally, give_up_after: int, patch_size: int):
        self.plan, self.rank, self.slot, self.epoch, self.rng, self.tally = plan, rank, slot, epoch, rng, tally
        self.give_up_after, self.patch_size = give_up_after, patch_size
        self.current: Optional[int] = None
        self.refill = False
        self.handler = shards.ShardErrors()  # webdataset's exception handler: the current shard's error
        self.first_error: Optional[str] = None
        self.failed: set[int] = set()
        self.fruitless = 0  # shard tries since the last usable tile

    def _order(self) -> Iterator[tuple[int, bool]]:
        n = len(self.plan.shards)
        if self.plan.resampled:
            weights = np.asarray(self.plan.counts, dtype=np.float64)
            weights /= weights.sum()
            while True:
                yield int(self.rng.choice(n, p=weights)), False
        for i in self.rng.permutation(self.plan.slot_shards(self.epoch, self.rank, self.slot)).tolist():
            yield i, False
        while True:  # only reached when the own shards ran short
            for i in self.rng.permutation(n).tolist():
                if i not in self.failed:
                    yield i, True
                else:  # failed once this epoch: not retried, but it counts as a fruitless try
                    self._note_try()

    def _close_current(self) -> None:
        counter, error = self.handler.take()
        if self.current is not None and error is not None:
            url = self.plan.shards[self.current].url
            self.tally.add(self.epoch, counter)
            self.failed.add(self.current)
            self.first_error = self.first_error or f"{url}: {error}"
            what = "missing shard" if counter == "missing_shards" else "bad shard"
            warn.warning("%s: %s skipped: %s", url, what, error)
        self.current = None

    def _note_try(self) -> None:
        self.fruitless += 1
        if self.fruitless > self.give_up_after:
            t = self.tally.total
            raise UserError(
                f"{self.plan.spec}: no usable samples in {self.fruitless - 1} shard tries "
                f"({t['bad_shards']} unreadable, {t['missing_shards']} missing, {t['corrupt_samples']} corrupt samples, {t['small_tiles']} tiles "
                f"smaller than patch_size {self.patch_size}); first error: {self.first_error or 'none'}")

    def urls(self) -> Iterator[str]:
        for index, refill in self._order():
            self._close_current()
            self._note_try()
            self.current, self.refill = index, refill
            yield self.plan.shards[index].url
        self._close_current()

    def usable_tile(self) -> None:
        self.fruitless = 0
        self.tally.add(self.epoch, "tiles")
        if self.refill:
            self.tally.add(self.epoch, "refill_tiles")


def epoch_patches(epochs: Iterable[int], plan: Plan, cfg: StreamConfig, rank: int, slot: int,
                  tally: Tally) -> Iterator[tuple[int, tuple]]:
    """(epoch, (clean patch, Degradation)) for each epoch: exactly slot_batches x batch_size patches."""
    params = cfg.augment_params()
    qrange, subs, double_p = parse_quality(cfg.quality), cfg.subsamplings(), float(cfg.double_jpeg_p)
    chain = cfg.chain_params()
    give_up = (0 if plan.resampled else len(plan.shards)) + 2 * len(plan.shards) + (8 if plan.resampled else 0)
    for epoch in epochs:
        need = plan.slot_batches(epoch, slot) * plan.batch_size
        if need <= 0:
            continue
        rng = epoch_rng(cfg.seed, epoch, rank, slot)
        tries = _ShardTries(plan, rank, slot, epoch, rng, tally, give_up, params.patch_size)
        samples = shards.tar_samples(tries.urls(), tries.handler)
        try:
            for sample in samples:
                try:
                    img = augment.decode_image(shards.image_of(sample)[1], grayscale=cfg.grayscale)
                    patches = augment.random_patches(img, min(cfg.patches_per_image, need), rng, params)
                except TileTooSmall as exc:
                    tally.add(epoch, "small_tiles")
                    warn.warning("%s: sample %s skipped: %s", sample.get("__url__"), sample.get("__key__"), exc)
                    continue
                except Exception as exc:  # noqa: BLE001 (any decode failure = corrupt sample)
                    tally.add(epoch, "corrupt_samples")
                    warn.warning("%s: corrupt sample %s skipped: %s", sample.get("__url__"), sample.get("__key__"), exc)
                    continue
                tries.usable_tile()
                for patch in patches:
                    yield epoch, (patch, draw_degradation(rng, qrange, double_p, subs, chain))
                need -= len(patches)
                if need <= 0:
                    break
        finally:
            samples.close()  # stops a shard read part way (quietly) and frees its stream


class _EpochBuffer:
    """The shuffle of one epoch: a buffer of ``size`` items; once full, each new item swaps out a
    random one; on close, the rest in random order. The output order depends only on the epoch's
    items and its Generator, never on when the items are taken out."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.buf: list = []
        self.out: deque = deque()

    def push(self, item) -> None:
        if len(self.buf) < self.size:
            self.buf.append(item)
            return
        if not self.size:
            self.out.append(item)
            return
        j = int(self.rng.integers(self.size))
        self.out.append(self.buf[j])
        self.buf[j] = item

    def close(self) -> None:
        self.out.extend(self.buf[j] for j in self.rng.permutation(len(self.buf)).tolist())
        self.buf = []


def shuffle_within_epochs(items: Iterable[tuple[int, object]], size: int, rng_for) -> Iterator[tuple[int, object]]:
    """Shuffle (epoch, item) pairs within each epoch (epochs arrive in order, never mixed in the
    output). While an epoch drains its buffer, one of its items leaves per item read for the next
    epoch, so the next buffer is full when the last one is empty: reading never pauses."""
    pending: deque = deque()  # (epoch, _EpochBuffer), oldest first; all but the newest are closed
    for epoch, item in items:
        if not pending or pending[-1][0] != epoch:
            if pending:
                pending[-1][1].close()
            pending.append((epoch, _EpochBuffer(size, rng_for(epoch))))
        pending[-1][1].push(item)
        head_epoch, head = pending[0]
        if len(pending) == 1:
            while head.out:
                yield head_epoch, head.out.popleft()
            continue
        if head.out:
            yield head_epoch, head.out.popleft()
        if not head.out:
            pending.popleft()
    for epoch, buf in pending:
        buf.close()
        while buf.out:
            yield epoch, buf.out.popleft()


def jpeg(items: Iterable[tuple[int, tuple]]) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """(epoch, (patch, Degradation)) -> (degraded, clean, quality label, epoch)."""
    for epoch, (patch, d) in items:
        yield *apply(patch, d), epoch


def _collate_with_epoch(items):
    return (*collate(items), items[0][3])


def with_counts(batches: Iterable[tuple], tally: Tally) -> Iterator[tuple]:
    """(degraded, clean, quality, counts): counts = {epoch: {counter: n}} since the last batch."""
    for deg, clean, q, epoch in batches:
        tally.add(epoch, "batches")
        tally.add(epoch, "patches", int(q.shape[0]))
        yield deg, clean, q, tally.take()


def slot_pipeline(plan: Plan, cfg: StreamConfig, rank: int, slot: int, epochs: Iterable[int]) -> wds.DataPipeline:
    """The stages of one slot over ``epochs`` (``itertools.count(start)`` in training)."""
    tally = Tally()
    return wds.DataPipeline(
        lambda: iter(epochs),
        lambda src: epoch_patches(src, plan, cfg, rank, slot, tally),
        lambda src: shuffle_within_epochs(src, cfg.shuffle_buffer,
                                          lambda e: epoch_rng(cfg.seed, e, rank, slot, 1)),
        jpeg,
        wds.batched(plan.batch_size, collation_fn=_collate_with_epoch, partial=False),
        lambda src: with_counts(src, tally),
    )


def endless(plan: Plan, cfg: StreamConfig, rank: int, worker: int, start_epoch: int) -> wds.DataPipeline:
    """Worker ``worker``'s stream of an iteration that starts at ``start_epoch``: epoch after epoch."""
    slot = plan.slot_of(worker, start_epoch)
    return slot_pipeline(plan, cfg, rank, slot, itertools.count(start_epoch))
