"""Quarantine of failed shards: a shard whose read failed after its retries (or that does not
exist) is skipped for the rest of the run, or for ``quarantine_epochs`` epochs after the one it
failed in, so that one dead object costs the run once, not every epoch.

The quarantine lives in shared memory (one int per shard: the first epoch it may be read again;
-1 when it is not quarantined), so every DataLoader worker of a process sees a failure as soon as
the worker that met it records it. Each failure also travels to the main process with the next
batch (:meth:`restorer.data.loader.TrainLoader.take_failures`); the trainer shares them between
processes (``restorer.train.datapos.share_quarantine``) and every process records them
(:meth:`SharedQuarantine.add`), so all ranks skip the same shards. A slot that skips a shard tops
up from the others (``refill_tiles``), so batch counts stay equal whenever the news arrives.
"""

from __future__ import annotations

import multiprocessing as mp

import numpy as np

FOREVER = 2**31 - 1


class SharedQuarantine:
    """Per shard, the first epoch it may be read again (see the module docstring)."""

    def __init__(self, shards: int, epochs: int | None):
        self.epochs = epochs  # None: the rest of the run; 0: never quarantined
        self.until = mp.Array("i", [-1] * max(1, shards))

    def blocked(self, shard: int, epoch: int) -> bool:
        return epoch < self.until[shard]

    def release_epoch(self, failed_epoch: int) -> int | None:
        """The first epoch a shard that failed in ``failed_epoch`` may be read again (None: no quarantine)."""
        if self.epochs == 0:
            return None
        return FOREVER if self.epochs is None else failed_epoch + 1 + self.epochs

    def add(self, shard: int, until: int) -> bool:
        """Record a quarantine; True when it is news (longer than the one held)."""
        if 0 <= shard < len(self.until) and until > self.until[shard]:
            self.until[shard] = until
            return True
        return False

    def snapshot(self) -> np.ndarray:
        """[N, 2] int64 (shard, until) of every quarantined shard."""
        until = np.frombuffer(memoryview(self.until.get_obj()), dtype=np.int32).astype(np.int64)
        held = np.nonzero(until >= 0)[0]
        return np.stack([held, until[held]], axis=1) if held.size else np.zeros((0, 2), np.int64)
