"""Where the training stream is in an epoch, in terms that survive a restart on any topology.

* **Addresses.** Every patch has an address, ``shard << 40 | sample << 16 | patch``: the shard's
  index in the listing, the sample's index in the shard's tar, the patch's index among the
  ``patches_per_image`` cut from that tile. A patch's pixels and degradation depend only on
  (seed, epoch, address) (``reading.tile_rng``), never on which rank or worker reads it.
* **Segments.** An epoch is read by one topology (ranks x workers x batch size) under its own plan
  (segment 0). A run resumed on another topology re-plans what is left of the epoch: the addresses
  consumed so far are *excluded*, the remaining patches are dealt to the new slots in units of a
  shard's sample range (whole shards, or, for a shard holding more than 1/8 of a slot's share, runs
  of its samples), balanced by remaining count as :func:`plan.assign_shards` does -- segment 1, 2,
  ...; later
  epochs use the new topology's own plan. :func:`plan_segment` computes a segment from the listing,
  the excluded set and the topology alone, so every rank gets the same batch count.
* **Positions.** :class:`DataPosition` is what a checkpoint stores: epoch, segment, the segment's
  topology and batch count, batches done, the excluded addresses and (per rank) the addresses
  consumed in the segment. :func:`resume_position` turns a saved one into where the next run
  starts: the same segment replayed (same topology and stream options: the batches after the
  resume point are those of the uninterrupted run) or a re-planned one.
* **Schedule.** :func:`worker_shares` says, for one DataLoader worker of an iteration that starts
  at a segment's batch ``done``, which slot it plays in each epoch, how many batches that slot
  owes and how many of them were handed out before (the DataLoader takes batch ``q`` of an
  iteration from worker ``q % workers``; batch ``b`` of a segment comes from slot
  ``(b + offset) % workers``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator

import numpy as np

from restorer.data.plan import Plan, assign_shards, positions

log = logging.getLogger("restorer.data")

SHARD_SHIFT, SAMPLE_SHIFT = 40, 16
LOW_MASK = (1 << SHARD_SHIFT) - 1
MAX_SHARDS, MAX_SAMPLES, MAX_PATCHES = 1 << 23, 1 << 24, 1 << 16


def address(shard: int, sample: int, patch: int) -> int:
    return (shard << SHARD_SHIFT) | (sample << SAMPLE_SHIFT) | patch


def unpack(addrs) -> np.ndarray:
    """int64 addresses -> [N, 3] (shard, sample, patch)."""
    a = np.asarray(addrs, dtype=np.int64).reshape(-1)
    return np.stack([a >> SHARD_SHIFT, (a >> SAMPLE_SHIFT) & (MAX_SAMPLES - 1), a & (MAX_PATCHES - 1)], axis=1)


class AddressSet:
    """A set of patch addresses (sorted int64), looked up by shard."""

    def __init__(self, addrs=()):
        self.array = np.unique(np.asarray(addrs, dtype=np.int64).reshape(-1))

    def __len__(self) -> int:
        return int(self.array.size)

    def _part(self, shard: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.array, [shard << SHARD_SHIFT, (shard + 1) << SHARD_SHIFT])
        return self.array[lo:hi] & LOW_MASK

    def in_shard(self, shard: int) -> frozenset[int]:
        """``sample << 16 | patch`` of the addresses in ``shard``."""
        return frozenset(self._part(shard).tolist()) if self.array.size else frozenset()

    def samples_in(self, shard: int) -> frozenset[int]:
        """Samples of ``shard`` with at least one address in the set."""
        return frozenset((self._part(shard) >> SAMPLE_SHIFT).tolist()) if self.array.size else frozenset()

    def per_shard(self, shards: int) -> np.ndarray:
        return (
            np.bincount(self.array >> SHARD_SHIFT, minlength=shards)[:shards]
            if self.array.size
            else np.zeros(shards, np.int64)
        )

    def union(self, *others: np.ndarray) -> AddressSet:
        return AddressSet(np.concatenate([self.array, *[np.asarray(o, np.int64).reshape(-1) for o in others]]))


EMPTY = AddressSet()
Unit = tuple[int, int, int]  # (shard, first sample, end sample) of a run a slot reads


@dataclasses.dataclass(frozen=True)
class Segment:
    """The part of epoch ``epoch`` one topology reads (``index`` 0: the epoch's own plan)."""

    epoch: int
    index: int
    batches: int  # per rank
    offset: int  # batch b of the segment comes from slot (b + offset) % workers
    target: int  # patches the epoch owes, all ranks together (set by its segment 0)
    excluded: AddressSet = EMPTY
    deal: tuple[tuple[Unit, ...], ...] | None = None  # units per (rank, worker) slot, index > 0 only
    remaining: tuple[int, ...] | None = None  # patches left per shard, index > 0 only

    def units_of(self, plan: Plan, rank: int, slot: int) -> list[Unit]:
        """The (shard, first sample, end sample) runs slot ``slot`` of ``rank`` reads."""
        if self.deal is None:
            return [(i, 0, MAX_SAMPLES) for i in plan.slot_shards(self.epoch, rank, slot)]
        return list(self.deal[rank * plan.workers + slot])

    def slot_batches(self, slot: int, workers: int) -> int:
        return share(self.batches, self.offset, slot, workers)

    def unread(self, plan: Plan) -> int:
        """Patches of the epoch this segment leaves unread (uneven slots, rounding)."""
        return self.target - len(self.excluded) - self.batches * plan.batch_size * plan.world_size


def share(n: int, offset: int, slot: int, workers: int) -> int:
    """How many of the segment's batches 0..n-1 come from ``slot`` (batch b from (b + offset) % workers)."""
    return positions(offset + n, slot, workers) - positions(offset, slot, workers)


def epoch_target(plan: Plan) -> int:
    return plan.batches_per_epoch * plan.batch_size * plan.world_size


def plan_segment(plan: Plan, epoch: int, index: int, excluded: AddressSet, target: int) -> Segment:
    """Segment ``index`` of ``epoch`` for ``plan``'s topology: the whole epoch (index 0), or the
    patches not in ``excluded`` dealt anew (see the module docstring). The same on every rank."""
    w, bpe = plan.workers, plan.batches_per_epoch
    if index == 0:
        return Segment(epoch, 0, bpe, (epoch * bpe) % w, epoch_target(plan))
    per_rank = plan.batch_size * plan.world_size
    budget = max(0, target - len(excluded)) // per_rank
    if plan.resampled:
        return Segment(epoch, index, budget, 0, target, excluded)
    n, slots = len(plan.counts), plan.world_size * w
    remaining = np.maximum(np.asarray(plan.counts, np.int64) * plan.patches_per_image - excluded.per_shard(n), 0)
    units = _units(plan, excluded, remaining, slots)
    deal = assign_shards([u[3] for u in units], slots, plan.seed, epoch)
    smallest = min(sum(units[i][3] for i in slot) for slot in deal)
    batches = min(budget, w * (smallest // plan.batch_size))
    dealt = tuple(tuple(units[i][:3] for i in slot) for slot in deal)
    return Segment(epoch, index, batches, 0, target, excluded, dealt, tuple(remaining.tolist()))


def _units(plan: Plan, excluded: AddressSet, remaining: np.ndarray, slots: int) -> list[tuple[int, int, int, int]]:
    """(shard, first sample, end sample, patches left) runs to deal: a shard whole, or (when it
    holds more than ``chunk`` of the patches left and its count is known) cut into runs of about
    ``chunk``, so that a few shards left part-read still spread over all the new slots."""
    ppi = plan.patches_per_image
    chunk = max(ppi, -(-int(remaining.sum()) // (8 * slots)))
    units = []
    for s in np.nonzero(remaining)[0].tolist():
        r, count = int(remaining[s]), int(plan.counts[s])
        if r <= chunk or not plan.counts_known:
            units.append((s, 0, count if plan.counts_known else MAX_SAMPLES, r))
            continue
        taken = np.bincount(np.fromiter((x >> SAMPLE_SHIFT for x in excluded.in_shard(s)), np.int64), minlength=count)
        left = np.maximum(ppi - taken[:count], 0)
        lo, acc = 0, 0
        for j in range(count):
            acc += int(left[j])
            if acc >= chunk:
                units.append((s, lo, j + 1, acc))
                lo, acc = j + 1, 0
        if acc:
            units.append((s, lo, count, acc))
    return units


@dataclasses.dataclass(frozen=True)
class Share:
    """What one worker reads in one epoch: slot ``slot`` of ``segment``, ``batches`` batches, of
    which the first ``skip`` were handed out before this iteration; ``hints``: addresses this rank
    consumed in the segment (their tiles are known to be usable)."""

    segment: Segment
    slot: int
    batches: int
    skip: int
    hints: AddressSet = EMPTY


@dataclasses.dataclass(frozen=True)
class Start:
    """Where an iteration starts: ``done`` batches of ``segment`` were handed out before."""

    segment: Segment
    done: int = 0
    hints: AddressSet = EMPTY


def worker_shares(plan: Plan, start: Start, worker: int) -> Iterator[Share]:
    """Worker ``worker``'s share of each epoch of an iteration that begins at ``start``, endlessly."""
    w, seg, done = plan.workers, start.segment, start.done
    slot = (worker + done + seg.offset) % w
    yield Share(seg, slot, seg.slot_batches(slot, w), share(done, seg.offset, slot, w), start.hints)
    q = seg.batches - done  # the iteration's index of the next epoch's first batch
    for epoch in itertools.count(seg.epoch + 1):
        normal = plan_segment(plan, epoch, 0, EMPTY, 0)
        slot = (worker - q + normal.offset) % w
        yield Share(normal, slot, normal.slot_batches(slot, w), 0)
        q += normal.batches


# ------------------------------------------------------------------------------------ positions


_ARRAYS = ("excluded", "consumed")


@dataclasses.dataclass
class DataPosition:
    """The data position of one rank (see the module docstring); what a checkpoint stores."""

    epoch: int
    segment: int
    world_size: int
    workers: int
    batch_size: int
    batches: int  # per rank, in the segment
    done: int  # batches of the segment handed out
    target: int
    stream: str  # fingerprint of the listing and the stream options (replay needs the same)
    listing: str  # fingerprint of the listing alone (addresses need the same)
    excluded: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    consumed: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    def meta(self) -> dict:
        """Everything but the arrays, as JSON-able values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _ARRAYS}

    @classmethod
    def from_meta(cls, meta: dict, excluded: np.ndarray, consumed: np.ndarray) -> DataPosition:
        names = [f.name for f in dataclasses.fields(cls) if f.name not in _ARRAYS]
        return cls(**{n: meta[n] for n in names}, excluded=excluded, consumed=consumed)

    def topology(self) -> tuple[int, int, int]:
        return (self.world_size, self.workers, self.batch_size)


def fingerprints(plan: Plan, stream_options: dict) -> tuple[str, str]:
    """(stream, listing): hashes of the listing (urls' names and counts) and of it plus the options."""

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    listing = [[s.url.rsplit("/", 1)[-1], c] for s, c in zip(plan.shards, plan.counts, strict=True)]
    return digest([listing, stream_options, plan.resampled, plan.batches_per_epoch]), digest(listing)


def start_position(plan: Plan, epoch: int, stream: str, listing: str) -> DataPosition:
    """The position at the start of ``epoch`` (its own plan, nothing consumed)."""
    seg = plan_segment(plan, epoch, 0, EMPTY, 0)
    return DataPosition(
        epoch, 0, plan.world_size, plan.workers, plan.batch_size, seg.batches, 0, seg.target, stream, listing
    )


def resume_position(
    plan: Plan, saved: DataPosition, consumed_by_rank: Callable[[], list[np.ndarray]], stream: str, listing: str
) -> tuple[DataPosition, str | None]:
    """Where a resumed run starts, and a line saying how (None for a plain replay). ``saved`` is
    this rank's saved position; ``consumed_by_rank()``: every saved rank's consumed addresses
    (read only when the epoch is re-planned)."""
    if saved.listing != listing:
        return (
            start_position(plan, saved.epoch + 1, stream, listing),
            f"data: the shard listing changed since the checkpoint: epoch {saved.epoch} is not continued, "
            f"starting epoch {saved.epoch + 1}",
        )
    same = saved.topology() == (plan.world_size, plan.workers, plan.batch_size) and saved.stream == stream
    if same:
        return saved, None
    if saved.segment == 0 and saved.done == 0:  # nothing of the epoch taken yet: its own plan
        return start_position(plan, saved.epoch, stream, listing), None
    excluded = AddressSet(saved.excluded).union(*consumed_by_rank())
    seg = plan_segment(plan, saved.epoch, saved.segment + 1, excluded, saved.target)
    pos = DataPosition(
        saved.epoch,
        seg.index,
        plan.world_size,
        plan.workers,
        plan.batch_size,
        seg.batches,
        0,
        seg.target,
        stream,
        listing,
        excluded=excluded.array,
    )
    line = (
        f"data: epoch {saved.epoch} continues on {plan.world_size} rank(s) x {plan.workers} worker(s) x batch "
        f"{plan.batch_size} (was {saved.world_size} x {saved.workers} x {saved.batch_size}): "
        f"{len(excluded)} of its patches were consumed, the rest re-dealt: {seg.batches} batches per rank, "
        f"{seg.unread(plan)} patches left unread (uneven slots, rounding)"
    )
    return pos, line


def segment_of(plan: Plan, pos: DataPosition) -> Segment:
    """The segment ``pos`` is in, recomputed (from the listing, the excluded set and the topology)."""
    excluded = AddressSet(pos.excluded) if pos.segment else EMPTY
    seg = plan_segment(plan, pos.epoch, pos.segment, excluded, pos.target)
    if seg.batches != pos.batches:
        raise ValueError(
            f"data position: segment {pos.segment} of epoch {pos.epoch} has {seg.batches} batches "
            f"per rank now, {pos.batches} when saved"
        )
    return seg
