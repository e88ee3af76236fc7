"""The epoch plan: how many batches every rank yields per epoch, and which shards each slot reads.

A *slot* is one (rank, worker) reader. Computed in every process from the shard listing alone
(manifest / sizes.json / URL spec, never from what a node's file system shows), so all ranks agree:

* ``batches_per_epoch`` -- the same on every rank. Without resampling every slot can fill its
  share from its own shards in every epoch (the smallest slot decides), so no tile is read twice
  in an epoch; with resampling it is the epoch's patches / ranks / batch size.
* The DataLoader takes batches from its workers in strict rotation, so batch ``p`` of an
  iteration comes from worker ``p % workers``. Counting positions from epoch 0 (a rank's batch
  ``p`` is batch ``p % batches_per_epoch`` of epoch ``p // batches_per_epoch``), worker ``w`` of
  an iteration started at epoch ``s`` plays slot ``(w + s * batches_per_epoch) % workers``, and
  slot ``l`` owes epoch ``e`` :meth:`Plan.slot_batches` batches: floor or ceil of
  batches_per_epoch / workers. So an epoch's batches do not depend on where the iteration began.
  An iteration that starts inside an epoch (a resume), or whose first epoch is re-planned for
  another topology, follows the same rule per epoch (:func:`restorer.data.position.worker_shares`).
* :func:`assign_shards` deals the shards of each epoch to the ``ranks x workers`` slots.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from restorer.data.config import StreamConfig
from restorer.data.shards import Shard
from restorer.errors import UserError

if TYPE_CHECKING:  # the loader imports this module; only the type is needed here
    from restorer.data.loader import LoaderOptions

log = logging.getLogger("restorer.data")


def assign_shards(counts: Sequence[int], slots: int, seed: int, epoch: int) -> list[list[int]]:
    """Split shard indices between ``slots``: the epoch's permutation of the shards, stably sorted
    by sample count, dealt greedily to the least-loaded slot. Slot totals depend only on the
    counts (so they are the same every epoch); which shard lands where changes with the epoch."""
    perm = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5A4D])).permutation(len(counts))
    order = sorted(perm.tolist(), key=lambda i: -counts[i])
    heap = [(0, s) for s in range(slots)]
    out: list[list[int]] = [[] for _ in range(slots)]
    for i in order:
        load, s = heapq.heappop(heap)
        out[s].append(i)
        heapq.heappush(heap, (load + counts[i], s))
    return out


def positions(n: int, slot: int, workers: int) -> int:
    """How many of the positions 0..n-1 are ``slot`` modulo ``workers``."""
    return max(0, (n - slot + workers - 1) // workers)


@dataclasses.dataclass(frozen=True)
class Plan:
    spec: str
    shards: tuple[Shard, ...]
    counts: tuple[int, ...]  # known or estimated samples per shard
    counts_known: bool
    resampled: bool
    world_size: int
    workers: int  # slots per rank (1 when the DataLoader runs in the main process)
    batch_size: int
    seed: int
    batches_per_epoch: int
    patches_per_image: int = 1

    @property
    def tiles_per_pass(self) -> int:
        return sum(self.counts)

    def slot_of(self, worker: int, start_epoch: int) -> int:
        """The slot that worker ``worker`` plays in an iteration that starts at ``start_epoch``."""
        return (worker + start_epoch * self.batches_per_epoch) % self.workers

    def slot_batches(self, epoch: int, slot: int) -> int:
        """Batches slot ``slot`` yields in ``epoch`` (over a rank's slots they sum to batches_per_epoch)."""
        first = epoch * self.batches_per_epoch
        end = first + self.batches_per_epoch
        return positions(end, slot, self.workers) - positions(first, slot, self.workers)

    def slot_shards(self, epoch: int, rank: int, slot: int) -> list[int]:
        """Indices of the shards slot ``slot`` of ``rank`` reads in ``epoch`` (without resampling)."""
        return assign_shards(self.counts, self.world_size * self.workers, self.seed, epoch)[rank * self.workers + slot]


def make_plan(shards: Sequence[Shard], cfg: StreamConfig, options: LoaderOptions) -> Plan:
    """The plan for ``shards`` of the stream ``cfg`` read as ``options`` say (see the module
    docstring). ``num_workers`` is capped at shards // world_size without resampling (with a
    warning), and more ranks than shards fall back to resampling (with a warning), so that no slot
    starves."""
    spec, ppi, epoch_patches, world_size = cfg.shards, cfg.patches_per_image, options.epoch_patches, options.world_size
    known = all(s.samples is not None for s in shards)
    if not known and not epoch_patches:
        raise UserError(
            f"{spec}: shard sample counts unknown (no manifest.json or sizes.json next to the "
            "shards): pass epoch_patches (patches per epoch, all ranks; --epoch-patches)"
        )
    if known:
        counts = [int(s.samples or 0) for s in shards]
    else:  # spread the given epoch's tiles over the shards; short shards are topped up at run time
        counts = [max(1, -(-int(epoch_patches or 0) // ppi) // len(shards))] * len(shards)
    resampled, workers = _slots(spec, len(shards), bool(cfg.resampled), options)
    plan = Plan(
        spec=spec,
        shards=tuple(shards),
        counts=tuple(counts),
        counts_known=known,
        resampled=resampled,
        world_size=world_size,
        workers=workers,
        batch_size=options.batch_size,
        seed=cfg.seed,
        batches_per_epoch=0,
        patches_per_image=ppi,
    )
    bpe = _batches_per_epoch(plan, epoch_patches)
    if bpe < 1:
        asked_text = f" (epoch_patches={epoch_patches})" if epoch_patches else ""
        raise UserError(
            f"{spec}: {sum(counts)} tiles x {ppi} patches{asked_text} over {world_size} rank(s) give no "
            f"batch of {options.batch_size}: use more data, more patches_per_image or a smaller batch"
        )
    return dataclasses.replace(plan, batches_per_epoch=bpe)


def _slots(spec: str, n_shards: int, resampled: bool, options: LoaderOptions) -> tuple[bool, int]:
    """(resampled, workers per rank): more ranks than shards fall back to resampling, more slots
    than shards cap the workers (each with a warning)."""
    world_size, workers = options.world_size, max(1, options.num_workers)
    if not resampled and world_size > n_shards:
        log.warning(
            "%s: %d shards for %d ranks: falling back to resampled shards (with replacement)",
            spec,
            n_shards,
            world_size,
        )
        resampled = True
    if not resampled and world_size * workers > n_shards:
        capped = n_shards // world_size
        log.warning(
            "%s: %d shards cannot feed %d ranks x %d workers: using %d worker(s) per rank",
            spec,
            n_shards,
            world_size,
            workers,
            capped,
        )
        workers = capped
    return resampled, workers


def _batches_per_epoch(plan: Plan, epoch_patches: int | None) -> int:
    """Batches every rank yields per epoch (see the module docstring); may be 0."""
    spec, counts, ppi, world_size, batch_size = (
        plan.spec,
        plan.counts,
        plan.patches_per_image,
        plan.world_size,
        plan.batch_size,
    )
    one_pass = sum(counts) * ppi // world_size // batch_size
    asked = int(epoch_patches) // world_size // batch_size if epoch_patches else None
    if plan.resampled or not plan.counts_known:
        return asked if asked is not None else one_pass
    slots = assign_shards(counts, world_size * plan.workers, plan.seed, 0)  # slot sizes are the same every epoch
    smallest = min(sum(counts[i] for i in slot) for slot in slots) * ppi // batch_size
    bpe = plan.workers * smallest
    if asked is not None and asked > bpe:
        log.warning(
            "%s: epoch_patches=%d asks for %d batches per rank, but one pass without resampling "
            "gives %d: using one pass (set StreamConfig.resampled / --resampled for longer epochs)",
            spec,
            epoch_patches,
            asked,
            bpe,
        )
    elif asked is not None:
        bpe = asked
    elif bpe * batch_size * world_size < 0.9 * sum(counts) * ppi:
        log.warning(
            "%s: uneven shards: an epoch uses %d of %d patches (the rest wait for later epochs)",
            spec,
            bpe * batch_size * world_size,
            sum(counts) * ppi,
        )
    return bpe
