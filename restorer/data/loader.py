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
  ``loader.stats()`` and one log line per epoch. A setup error (the package of a URL scheme is not
  installed) raises :class:`~restorer.errors.UserError` with one line. A slot that runs short because of that tops up from the epoch's other shards (counted as
  ``refill_tiles``), so batch counts stay equal. The plan depends only on the shard listing, so
  every rank computes the same ``batches_per_epoch``. A stream that yields nothing raises
  :class:`~restorer.errors.UserError` naming the path instead of hanging.
* Given (seed, epoch, rank, worker slot) an epoch is reproducible, whatever epoch the iteration
  started at: its numpy Generators are seeded from all four (Python's global ``random`` is left
  alone).
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

import logging
import multiprocessing as mp
import time
from collections import Counter
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from restorer.data import stages
from restorer.data.config import StreamConfig
from restorer.data.plan import Plan, make_plan
from restorer.data.shards import resolve_shards
from restorer.data.skips import COUNTERS
from restorer.data.workers import init_worker, unwrap_worker_error
from restorer.errors import UserError

log = logging.getLogger("restorer.data")


class SharedEpoch:
    """An epoch number the trainer sets and every DataLoader worker (forked or spawned) can read."""

    def __init__(self, epoch: int = 0):
        self.value = mp.Value("i", int(epoch))

    def set_value(self, epoch: int) -> None:
        self.value.value = int(epoch)

    def get_value(self) -> int:
        return int(self.value.value)


class TrainStream(IterableDataset):
    """What each DataLoader worker iterates: :func:`stages.endless` from the loader's start epoch."""

    def __init__(self, plan: Plan, cfg: StreamConfig, rank: int):
        super().__init__()
        self.plan, self.cfg, self.rank = plan, cfg, rank
        self.start = SharedEpoch()  # written by the loader before it starts (or restarts) the workers

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return iter(stages.endless(self.plan, self.cfg, self.rank, worker, self.start.get_value()))

    def epoch_batches(self, epoch: int, slot: int) -> Iterator[tuple]:
        """One slot's batches of one epoch, (degraded, clean, quality, counts) (for tests and tools)."""
        return iter(stages.slot_pipeline(self.plan, self.cfg, self.rank, slot, [epoch]))


class TrainLoader:
    """``iter(loader)``: ``(degraded uint8 [B,C,P,P], clean uint8 [B,C,P,P], quality int64 [B])``
    endlessly, exactly ``batches_per_epoch`` per epoch (see the module docstring)."""

    def __init__(self, cfg: StreamConfig, *, batch_size: int, num_workers: int, rank: int, world_size: int,
                 shared_epoch: Optional[SharedEpoch], pin_memory: bool, epoch_patches: Optional[int]):
        cfg.validate()
        if batch_size < 1 or num_workers < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"train loader: need batch_size >= 1, num_workers >= 0 and 0 <= rank < world_size "
                            f"(got {batch_size}, {num_workers}, {rank}, {world_size})")
        self.cfg, self.rank, self.world_size, self.batch_size = cfg, rank, world_size, batch_size
        shards, self.listed_missing = resolve_shards(cfg.shards, cfg.splits)  # local files absent now
        self.plan = make_plan(shards, cfg.shards, batch_size=batch_size, num_workers=num_workers,
                              world_size=world_size, patches_per_image=cfg.patches_per_image,
                              resampled=bool(cfg.resampled), seed=cfg.seed, epoch_patches=epoch_patches)
        self.num_workers = self.plan.workers if num_workers > 0 else 0
        self.batches_per_epoch = self.plan.batches_per_epoch
        self.num_samples = self.batches_per_epoch * batch_size * world_size  # patches per epoch, all ranks
        self.resampled = self.plan.resampled
        self._own_epoch = shared_epoch is None
        self.shared_epoch = shared_epoch or SharedEpoch(0)
        self._counts: dict[int, Counter] = {}  # per epoch, as handed out with the batches
        self._epoch: Optional[int] = None  # the epoch being handed out
        self._dataset = TrainStream(self.plan, cfg, rank)
        extra = dict(persistent_workers=True, prefetch_factor=2,
                     worker_init_fn=init_worker) if self.num_workers > 0 else {}
        self._loader = DataLoader(self._dataset, batch_size=None, num_workers=self.num_workers,
                                  pin_memory=pin_memory, **extra)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def stats(self) -> dict[str, int]:
        """Counts (tiles, patches, batches, corrupt_samples, bad_shards, missing_shards, small_tiles,
        refill_tiles) of the epochs handed out so far, the current one included (not the work the
        workers did ahead for later epochs). A shard is counted each epoch a read of it fails."""
        total = Counter()
        for epoch, counts in self._counts.items():
            if self._epoch is not None and epoch <= self._epoch:
                total.update(counts)
        return {name: int(total[name]) for name in COUNTERS}

    def __iter__(self):
        start = self.shared_epoch.get_value()
        self._dataset.start.set_value(start)
        return self._batches(start)

    def _batches(self, start: int):
        bpe, epoch, n = self.batches_per_epoch, start, 0
        self._epoch, began = epoch, time.perf_counter()
        try:
            for deg, clean, q, counts in self._loader:
                for e, c in counts.items():
                    self._counts.setdefault(int(e), Counter()).update(c)
                n += 1
                if n == bpe:  # before handing out the last batch: callers may stop right after it
                    self._epoch_summary(epoch, time.perf_counter() - began)
                    if self._own_epoch:  # a later iter() continues with the next epoch
                        self.shared_epoch.set_value(epoch + 1)
                    yield deg, clean, q
                    epoch, n, began = epoch + 1, 0, time.perf_counter()
                    self._epoch = epoch
                    continue
                yield deg, clean, q
        except UserError as exc:
            raise unwrap_worker_error(exc) from None
        raise UserError(f"{self.cfg.shards}: the training stream of rank {self.rank} ended in epoch {epoch} "
                        f"after {n} of {bpe} batches")

    def _epoch_summary(self, epoch: int, seconds: float) -> None:
        c = self._counts.get(epoch, Counter())
        log.info("data rank %d epoch %d: %d batches in %.1fs, %d tiles, %d corrupt samples, %d bad shards, "
                 "%d missing shards, %d small tiles, %d refill tiles", self.rank, epoch, c["batches"], seconds,
                 c["tiles"], c["corrupt_samples"], c["bad_shards"], c["missing_shards"], c["small_tiles"],
                 c["refill_tiles"])


def make_train_loader(cfg: StreamConfig, *, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1,
                      shared_epoch: Optional[SharedEpoch] = None, pin_memory: bool = False,
                      epoch_patches: Optional[int] = None) -> TrainLoader:
    """The training stream of rank ``rank`` of ``world_size`` (see the module docstring).

    ``epoch_patches``: *patches* per epoch over all ranks (default: one pass, the tiles' count x
    ``patches_per_image``; required when the shard counts are unknown, e.g. ``pipe:`` URLs
    without sizes.json). Every rank gets ``epoch_patches // world_size // batch_size`` batches
    (rounded down). Without ``cfg.resampled`` it can only shorten an epoch (asking for more warns
    and uses one pass). ``iter(loader)`` starts at ``shared_epoch.get_value()``; if
    ``shared_epoch`` is None the loader keeps its own, advanced as each epoch is handed out (so a
    later ``iter()`` continues with the next epoch).
    """
    return TrainLoader(cfg, batch_size=batch_size, num_workers=num_workers, rank=rank, world_size=world_size,
                       shared_epoch=shared_epoch, pin_memory=pin_memory, epoch_patches=epoch_patches)
