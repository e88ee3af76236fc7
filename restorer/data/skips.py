"""What the streams read and skipped: per-epoch counters and rate-limited warnings.

Workers count into a :class:`Tally` (per data epoch) and hand its counts out with each batch, so
the main process adds them up in batch order: no shared memory, no locks, and the counts of an
epoch are complete when its last batch arrives (see ``TrainLoader.stats``). ``quarantined_shards``
counts the shard reads skipped because the shard is quarantined (restorer.data.quarantine); the
quarantines themselves travel with the batches too (``Tally.failures``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict

log = logging.getLogger("restorer.data")

COUNTERS = (
    "tiles",
    "patches",
    "batches",
    "corrupt_samples",
    "bad_shards",
    "missing_shards",
    "small_tiles",
    "refill_tiles",
    "quarantined_shards",
)


class Tally:
    """Counts of one worker, per data epoch, since they were last taken; plus running totals
    (for the error message of a stream that finds nothing usable)."""

    def __init__(self):
        self.pending: dict[int, Counter] = defaultdict(Counter)
        self.total: Counter = Counter()
        self.failures: list[tuple[int, int]] = []  # (shard, quarantined until epoch) since last taken

    def add(self, epoch: int, name: str, n: int = 1) -> None:
        self.pending[epoch][name] += n
        self.total[name] += n

    def take(self) -> dict[int, dict[str, int]]:
        out = {e: dict(c) for e, c in self.pending.items()}
        self.pending.clear()
        return out

    def take_failures(self) -> list[tuple[int, int]]:
        out, self.failures = self.failures, []
        return out


class RateLimitedLog:
    """The first few warnings, then at most one every ``every_s`` seconds (with a suppressed count)."""

    def __init__(self, first: int = 5, every_s: float = 30.0):
        self.first, self.every_s = first, every_s
        self.count, self.suppressed, self.last = 0, 0, 0.0

    def warning(self, msg: str, *args) -> None:
        self.count += 1
        now = time.monotonic()
        if self.count <= self.first or now - self.last >= self.every_s:
            if self.suppressed:
                msg += f" ({self.suppressed} similar messages suppressed)"
            log.warning(msg, *args)
            self.last, self.suppressed = now, 0
        else:
            self.suppressed += 1


warn = RateLimitedLog()
