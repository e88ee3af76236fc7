"""The training loader: WebDataset shards -> JPEG-degraded uint8 batches, endlessly.

Per rank and DataLoader worker (a "slot") the stream is a list of webdataset stages
(:mod:`restorer.data.stages`)::

    shard list (manifest / sizes.json / URL spec; shards.py)
      -> this slot's shards of the epoch (balanced by sample count; plan.py)  | or resampled
      -> tar samples (webdataset, bad shards counted and skipped) -> decoded tile
      -> ``patches_per_image`` crop-first augmented patches (augment.py) + drawn degradation
      -> shuffle buffer per epoch -> JPEG (degrade.py) in the worker -> uint8 batch (batch.py)

Guarantees (see ``make_train_loader``):

* ``iter(loader)`` yields batches endlessly, epoch after epoch from ``shared_epoch.get_value()``
  (read when ``iter()`` is called); every rank yields exactly ``loader.batches_per_epoch``
  batches per epoch, computed from the shard sample counts, so DDP ranks never wait on each
  other. The workers keep running across epochs (no restart, no pause at an epoch boundary: the
  next epoch's shuffle buffer fills while the last one drains).
* Without ``resampled`` no tile is read twice in an epoch: the shards are split between the
  ``world_size x num_workers`` slots (greedy balance by sample count over the epoch's shard
  permutation, so slot sizes are the same every epoch and only which shard goes where changes);
  the epoch length is what the smallest slot can fill, so larger slots leave a few tiles unread
  in that epoch. With ``resampled`` each slot draws shards with replacement (weighted by count).
* More slots than shards would starve workers: the worker count is capped at
  ``shards // world_size`` (with a warning); with more ranks than shards the stream falls back to
  resampling (with a warning).
* Every shard read goes through :mod:`restorer.data.urlio` (local, ``http(s)://``, ``s3://`` and
  other fsspec URLs, ``pipe:``): each read has a timeout and transient failures are retried with
  backoff (resuming where they broke), so no worker waits forever. A corrupt sample or shard
  (truncated tar, undecodable image, a read that still fails, a silent or failing pipe) is logged
  (rate-limited, naming the URL), skipped and counted (``corrupt_samples``, ``bad_shards``); a shard
  that does not exist (missing or vanished file, missing object) likewise (``missing_shards``);
  ``loader.stats()`` and one DEBUG log line per epoch. A setup error (the package of a URL scheme is not
  installed) raises :class:`~restorer.errors.UserError` with one line. A slot that runs short
  because of that tops up from the epoch's other shards (counted as
  ``refill_tiles``), so batch counts stay equal. The plan depends only on the shard listing, so
  every rank computes the same ``batches_per_epoch``. A stream that yields nothing raises
  :class:`~restorer.errors.UserError` naming the path instead of hanging.
* An epoch is reproducible whatever epoch -- or batch -- the iteration started at: every tile's
  draws come from a Generator seeded by (seed, epoch, shard, sample), every slot's (shard order,
  shuffle) from (seed, epoch, rank, slot) (Python's global ``random`` is left alone).
* Exact resume (restorer.data.position): ``loader.position()`` is the data position of the batches
  handed out so far (epoch, segment, topology, batches done, the addresses consumed);
  ``loader.start_at(position)`` before the first ``iter()`` continues there: on the same topology
  the batches that follow are those of the uninterrupted stream, bit for bit, and what was
  consumed is passed over without decoding; a position re-planned for another topology
  (``position.resume_position``) reads the rest of the epoch without repeating a patch. The
  first epoch of such an iteration yields the segment's remaining batches, later ones
  ``batches_per_epoch``.
* A shard that fails (bad or missing) is quarantined: skipped for the rest of the run, or for
  ``quarantine_epochs`` epochs (restorer.data.quarantine); ``loader.take_failures()`` hands the
  news to the trainer, which shares it between ranks (``loader.add_quarantine``).
* ``epoch_patches`` counts *patches* per epoch over all ranks (the trainer's ``--epoch-patches``).

Choices (measured with bench/loader.py): augmentation resamples only each patch's region
(augment.crop_first, 5x faster than rescaling/rotating the whole 512 px tile per patch); the
shuffle buffer holds clean *patches* (``shuffle_buffer`` of them, ~49 KB each at 128 px RGB), so
patches of one tile are spread apart, and the JPEG step runs as a patch leaves the buffer;
workers collate their own batches (``batch_size=None`` DataLoader) as uint8 (batch.py).
Per-worker throughput is bound by tile decoding (WebP lossless ~5 ms per 512 px tile here);
PPM shards (``shard_tools build --encoding ppm``) roughly double it.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import time
from collections import Counter
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from restorer.data import stages
from restorer.data.config import StreamConfig
from restorer.data.plan import Plan, make_plan
from restorer.data.position import (
    EMPTY,
    AddressSet,
    DataPosition,
    Share,
    Start,
    fingerprints,
    plan_segment,
    segment_of,
    start_position,
    worker_shares,
)
from restorer.data.quarantine import SharedQuarantine
from restorer.data.reading import ReadContext
from restorer.data.shards import resolve_shards
from restorer.data.skips import COUNTERS
from restorer.data.workers import init_worker, unwrap_worker_error
from restorer.errors import UserError

log = logging.getLogger("restorer.data")

REPLAY_EXEMPT = ("shards", "quarantine_epochs")  # stream options a replay does not depend on


class SharedEpoch:
    """An epoch number the trainer sets and every DataLoader worker (forked or spawned) can read."""

    def __init__(self, epoch: int = 0):
        self.value = mp.Value("i", int(epoch))

    def set_value(self, epoch: int) -> None:
        self.value.value = int(epoch)

    def get_value(self) -> int:
        return int(self.value.value)


class TrainStream(IterableDataset):
    """What each DataLoader worker iterates: its shares of each epoch (``position.worker_shares``),
    from ``resume`` (the first iteration after ``start_at``) or from the start of epoch ``start``."""

    def __init__(self, plan: Plan, cfg: StreamConfig, rank: int, quarantine: SharedQuarantine):
        super().__init__()
        self.ctx = ReadContext(plan, cfg, rank, quarantine)
        self.start = SharedEpoch()  # written by the loader before it starts (or restarts) the workers
        self.resume: Start | None = None  # set before the workers exist; used by the first iteration

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        start, self.resume = self.resume, None
        if start is None:
            start = Start(plan_segment(self.ctx.plan, self.start.get_value(), 0, EMPTY, 0))
        return iter(stages.worker_pipeline(self.ctx, worker_shares(self.ctx.plan, start, worker)))

    def epoch_batches(self, epoch: int, slot: int):
        """One slot's batches of one epoch, as ``stages.WorkerBatch`` (for tests and tools)."""
        seg = plan_segment(self.ctx.plan, epoch, 0, EMPTY, 0)
        share = Share(seg, slot, seg.slot_batches(slot, self.ctx.plan.workers), 0)
        return iter(stages.worker_pipeline(self.ctx, [share]))


class TrainLoader:
    """``iter(loader)``: ``(degraded uint8 [B,C,P,P], clean uint8 [B,C,P,P], quality int64 [B])``
    endlessly, exactly ``batches_per_epoch`` per epoch (see the module docstring)."""

    def __init__(self, cfg: StreamConfig, options: LoaderOptions):
        cfg.validate()
        batch_size, num_workers, rank, world_size = (
            options.batch_size,
            options.num_workers,
            options.rank,
            options.world_size,
        )
        if batch_size < 1 or num_workers < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(
                f"train loader: need batch_size >= 1, num_workers >= 0 and 0 <= rank < world_size "
                f"(got {batch_size}, {num_workers}, {rank}, {world_size})"
            )
        self.cfg, self.rank, self.world_size, self.batch_size = cfg, rank, world_size, batch_size
        shards, self.listed_missing = resolve_shards(cfg.shards, cfg.splits)  # local files absent now
        self.plan = make_plan(shards, cfg, options)
        self.num_workers = self.plan.workers if num_workers > 0 else 0
        self.batches_per_epoch = self.plan.batches_per_epoch
        self.num_samples = self.batches_per_epoch * batch_size * world_size  # patches per epoch, all ranks
        self.resampled = self.plan.resampled
        replayed = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in REPLAY_EXEMPT}
        self.fingerprints = fingerprints(self.plan, replayed)
        self.quarantine = SharedQuarantine(len(self.plan.shards), cfg.quarantine_epochs)
        self._own_epoch = options.shared_epoch is None
        self.shared_epoch = options.shared_epoch or SharedEpoch(0)
        self._counts: dict[int, Counter] = {}  # per epoch, as handed out with the batches
        self._epoch: int | None = None  # the epoch being handed out
        self._start: DataPosition | None = None  # from start_at, for the first iteration
        self._live: tuple[DataPosition, list[np.ndarray]] | None = None  # the position being handed out
        self._iterated = False
        self._failures: list[tuple[int, int]] = []
        self.keep_ledger = False  # keep (epoch, addresses) of every batch for take_ledger()
        self._ledger: list[tuple[int, np.ndarray]] = []
        self._dataset = TrainStream(self.plan, cfg, rank, self.quarantine)
        self._loader = self._data_loader(options.pin_memory)

    def _data_loader(self, pin_memory: bool) -> DataLoader:
        if self.num_workers == 0:
            return DataLoader(self._dataset, batch_size=None, num_workers=0, pin_memory=pin_memory)
        return DataLoader(
            self._dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=pin_memory,
            persistent_workers=True,
            prefetch_factor=2,
            worker_init_fn=init_worker,
        )

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        """The data epoch of the batch handed out last (the start epoch before any)."""
        return self._epoch if self._epoch is not None else self.position().epoch

    def stats(self) -> dict[str, int]:
        """Counts (tiles, patches, batches, corrupt_samples, bad_shards, missing_shards, small_tiles,
        refill_tiles, quarantined_shards) of the epochs handed out so far, the current one included
        (not the work the workers did ahead for later epochs). A shard is counted each epoch a read of
        it fails or a quarantine skips it."""
        total: Counter = Counter()
        for epoch, counts in self._counts.items():
            if self._epoch is not None and epoch <= self._epoch:
                total.update(counts)
        return {name: int(total[name]) for name in COUNTERS}

    # --- the data position ------------------------------------------------------------------------

    def position(self) -> DataPosition:
        """The data position after the batches handed out so far (what a checkpoint stores)."""
        if self._live is None:
            return self._start or start_position(self.plan, self.shared_epoch.get_value(), *self.fingerprints)
        pos, consumed = self._live
        arr = np.concatenate(consumed) if consumed else np.zeros(0, np.int64)
        return dataclasses.replace(pos, consumed=arr)

    def start_at(self, position: DataPosition) -> None:
        """Continue at ``position`` (this plan's topology: see ``position.resume_position``) in the
        first iteration; call before it."""
        if self._iterated:
            raise RuntimeError("TrainLoader.start_at: call it before the first iter()")
        try:
            segment_of(self.plan, position)
        except ValueError as exc:
            raise UserError(f"{self.cfg.shards}: cannot continue the saved data position: {exc}") from None
        self._start = position

    def take_failures(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Up to ``limit`` of the (shard, quarantined until epoch) met by this process's workers and
        not taken yet."""
        cut = len(self._failures) if limit is None else limit
        out, self._failures = self._failures[:cut], self._failures[cut:]
        return out

    def add_quarantine(self, pairs) -> None:
        """Record quarantines (from any rank) for this process's workers."""
        for shard, until in pairs:
            self.quarantine.add(int(shard), int(until))

    def take_ledger(self) -> list[tuple[int, np.ndarray]]:
        """(epoch, addresses) of each batch handed out since the last call (with ``keep_ledger``)."""
        out, self._ledger = self._ledger, []
        return out

    # --- iteration ---------------------------------------------------------------------------------

    def __iter__(self):
        if self._start is not None and not self._iterated:
            pos = self._start
        else:
            pos = start_position(self.plan, self.shared_epoch.get_value(), *self.fingerprints)
        self._iterated = True
        while pos.done >= pos.batches:  # a finished (or empty) segment: the next epoch
            pos = start_position(self.plan, pos.epoch + 1, *self.fingerprints)
        self._dataset.start.set_value(pos.epoch)
        self._dataset.resume = None
        if pos.segment or pos.done:
            self._dataset.resume = Start(segment_of(self.plan, pos), pos.done, AddressSet(pos.consumed))
        return self._batches(pos)

    def _batches(self, pos: DataPosition):
        consumed = [pos.consumed] if pos.consumed.size else []
        pos = dataclasses.replace(pos, consumed=np.zeros(0, np.int64))
        self._live, self._epoch, began, n = (pos, consumed), pos.epoch, time.perf_counter(), 0
        try:
            for deg, clean, q, counts, addresses, failures, epoch in self._loader:
                for e, c in counts.items():
                    self._counts.setdefault(int(e), Counter()).update(c)
                self._failures.extend((int(s), int(u)) for s, u in failures)
                if int(epoch) != pos.epoch:
                    raise RuntimeError(f"data epochs out of step: a batch of epoch {epoch} in epoch {pos.epoch}")
                self._epoch = pos.epoch
                addr = addresses.numpy()
                consumed.append(addr)
                if self.keep_ledger:
                    self._ledger.append((pos.epoch, addr))
                pos.done += 1
                n += 1
                if pos.done == pos.batches:  # before handing out the last batch: callers may stop right after it
                    self._epoch_summary(pos.epoch, n, time.perf_counter() - began)
                    if self._own_epoch:  # a later iter() continues with the next epoch
                        self.shared_epoch.set_value(pos.epoch + 1)
                    pos, consumed = start_position(self.plan, pos.epoch + 1, *self.fingerprints), []
                    self._live, began, n = (pos, consumed), time.perf_counter(), 0
                yield deg, clean, q
        except UserError as exc:
            raise unwrap_worker_error(exc) from None
        raise UserError(
            f"{self.cfg.shards}: the training stream of rank {self.rank} ended in epoch {pos.epoch} "
            f"after {pos.done} of {pos.batches} batches"
        )

    def _epoch_summary(self, epoch: int, batches: int, seconds: float) -> None:
        c = self._counts.get(epoch, Counter())
        log.debug(
            "data rank %d epoch %d: %d batches in %.1fs, %d tiles, %d corrupt samples, %d bad shards, "
            "%d missing shards, %d small tiles, %d refill tiles, %d quarantined shard skips",
            self.rank,
            epoch,
            batches,
            seconds,
            c["tiles"],
            c["corrupt_samples"],
            c["bad_shards"],
            c["missing_shards"],
            c["small_tiles"],
            c["refill_tiles"],
            c["quarantined_shards"],
        )


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How this process reads the stream (see :func:`make_train_loader`)."""

    batch_size: int
    num_workers: int
    rank: int = 0
    world_size: int = 1
    shared_epoch: SharedEpoch | None = None
    pin_memory: bool = False
    epoch_patches: int | None = None  # patches per epoch over all ranks (default: one pass)


def make_train_loader(cfg: StreamConfig, options: LoaderOptions | None = None, **fields: Any) -> TrainLoader:
    """The training stream of ``cfg``, read as ``options`` say (or a :class:`LoaderOptions` of
    ``fields``: ``make_train_loader(cfg, batch_size=4, num_workers=2, rank=1, world_size=2)``): rank
    ``rank`` of ``world_size`` (see the module docstring).

    ``epoch_patches``: *patches* per epoch over all ranks (default: one pass, the tiles' count x
    ``patches_per_image``; required when the shard counts are unknown, e.g. ``pipe:`` URLs
    without sizes.json). Every rank gets ``epoch_patches // world_size // batch_size`` batches
    (rounded down). Without ``cfg.resampled`` it can only shorten an epoch (asking for more warns
    and uses one pass). ``iter(loader)`` starts at ``shared_epoch.get_value()`` (or, the first
    time, at the position given to ``start_at``); if ``shared_epoch`` is None the loader keeps its
    own, advanced as each epoch is handed out (so a later ``iter()`` continues with the next epoch).
    """
    if options is not None and fields:
        raise TypeError("make_train_loader: pass options or its fields, not both")
    return TrainLoader(cfg, options if options is not None else LoaderOptions(**fields))
