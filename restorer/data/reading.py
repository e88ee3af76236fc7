"""One slot's share of an epoch, read: shards -> tiles -> (clean patch, degradation, address).

* Without resampling, the slot reads its own shards of the segment (``position.Segment``) in a
  random order, then -- only if they ran short because a shard failed -- tops up from the others
  (``refill_tiles``). A shard that fails (truncated, undecodable, a read that failed after urlio's
  retries or timed out, a failing pipe) is counted as ``bad_shards``, one that does not exist as
  ``missing_shards``; both are skipped, and quarantined (restorer.data.quarantine). With
  resampling, shards are drawn with replacement, weighted by sample count.
* Each tile yields up to ``patches_per_image`` patches, numbered 0.. (fewer when the slot's share
  is full, or when a re-planned segment excludes some); every draw of a tile (crops,
  degradations) comes from a Generator seeded by (seed, epoch, shard, sample) (with resampling
  also by rank, slot and the shard's visit), so a patch's content depends on its address, not on
  who reads it or what was read before. The slot's own Generators (shard order, shuffle) are
  seeded by (seed, epoch, rank, slot, segment).
* Replay: when the share's first ``skip`` batches were handed out before a resume, the pushes that
  land in that prefix (``shuffle.consumed_pushes``) become placeholders (``Item.patch is None``)
  that the pipeline drops: a tile none of whose patches is still needed is not decoded when this
  rank consumed it before (its tiles are known to be usable), and a shard all of whose tiles are
  such is not even opened (counts from the listing).
* A stream that finds no usable tile in many shard tries in a row raises UserError naming the
  spec, instead of hanging.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from restorer.data import augment, shards
from restorer.data.augment import TileTooSmall
from restorer.data.config import StreamConfig
from restorer.data.degrade import Degradation, draw_degradation, parse_quality
from restorer.data.plan import Plan
from restorer.data.position import MAX_SAMPLES, Share, Unit, address
from restorer.data.quarantine import FOREVER, SharedQuarantine
from restorer.data.shuffle import consumed_pushes
from restorer.data.skips import Tally, warn
from restorer.errors import UserError

TILE_PURPOSE = 0x711E


class Item(NamedTuple):
    patch: np.ndarray | None  # None: a placeholder for a patch handed out before a resume
    degradation: Degradation | None
    address: int


@dataclasses.dataclass(frozen=True)
class ReadContext:
    plan: Plan
    cfg: StreamConfig
    rank: int
    quarantine: SharedQuarantine | None = None


def slot_rng(seed: int, share: Share, rank: int, purpose: int) -> np.random.Generator:
    """The slot's Generators in one epoch: purpose 0 reads (shard order), purpose 1 shuffles."""
    seg = share.segment
    return np.random.default_rng(np.random.SeedSequence([seed, seg.epoch, rank, share.slot, purpose, seg.index]))


def tile_rng(seed: int, epoch: int, shard: int, sample: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, shard, sample, TILE_PURPOSE, *extra]))


class _ShardTries:
    """The shards one share reads, in order, and which of them failed (this epoch)."""

    def __init__(self, ctx: ReadContext, share: Share, rng: np.random.Generator, tally: Tally):
        self.ctx, self.share, self.rng, self.tally = ctx, share, rng, tally
        self.epoch = share.segment.epoch
        n = len(ctx.plan.shards)
        self.give_up_after = (0 if ctx.plan.resampled else n) + 2 * n + (8 if ctx.plan.resampled else 0)
        self.current: int | None = None
        self.refill = False
        self.handler = shards.ShardErrors()  # webdataset's exception handler: the current shard's error
        self.first_error: str | None = None
        self.failed: set[int] = set()
        self.quarantined: set[int] = set()
        self.fruitless = 0  # shard tries since the last usable tile

    def order(self) -> Iterator[tuple[Unit, bool]]:
        """((shard, first sample, end sample), whether it is a top-up) in reading order, endless."""
        plan, seg = self.ctx.plan, self.share.segment
        n = len(plan.shards)
        if plan.resampled:
            weights = np.asarray(plan.counts, dtype=np.float64)
            weights /= weights.sum()
            while True:
                i = int(self.rng.choice(n, p=weights))
                if self._usable(i):
                    yield (i, 0, MAX_SAMPLES), False
        units = seg.units_of(plan, self.ctx.rank, self.share.slot)
        for k in self.rng.permutation(len(units)).tolist():
            if self._usable(units[k][0]):
                yield units[k], False
        while True:  # only reached when the own shards ran short
            for i in self.rng.permutation(n).tolist():
                if seg.remaining is not None and not seg.remaining[i]:
                    self._note_try()
                elif self._usable(i):
                    yield (i, 0, MAX_SAMPLES), True

    def _usable(self, i: int) -> bool:
        q = self.ctx.quarantine
        if i in self.failed:  # failed once this epoch: not retried, but it counts as a fruitless try
            self._note_try()
            return False
        if q is not None and q.blocked(i, self.epoch):
            if i not in self.quarantined:
                self.quarantined.add(i)
                self.tally.add(self.epoch, "quarantined_shards")
            self._note_try()
            return False
        return True

    def begin(self, index: int, refill: bool) -> None:
        self._note_try()
        self.current, self.refill = index, refill

    def end(self) -> None:
        counter, error = self.handler.take()
        index, self.current = self.current, None
        if index is None or error is None or counter is None:  # counter and error are set together
            return
        url = self.ctx.plan.shards[index].url
        self.tally.add(self.epoch, counter)
        self.failed.add(index)
        self.first_error = self.first_error or f"{url}: {error}"
        what = "missing shard" if counter == "missing_shards" else "bad shard"
        q = self.ctx.quarantine
        until = q.release_epoch(self.epoch) if q is not None else None
        note = ""
        if q is not None and until is not None:
            q.add(index, until)
            self.tally.failures.append((index, until))
            note = "; quarantined for the rest of the run" if until == FOREVER else f"; quarantined until epoch {until}"
        warn.warning("%s: %s skipped: %s%s", url, what, error, note)

    def _note_try(self) -> None:
        self.fruitless += 1
        if self.fruitless > self.give_up_after:
            t = self.tally.total
            raise UserError(
                f"{self.ctx.plan.spec}: no usable samples in {self.fruitless - 1} shard tries "
                f"({t['bad_shards']} unreadable, {t['missing_shards']} missing, {t['quarantined_shards']} quarantined, "
                f"{t['corrupt_samples']} corrupt samples, {t['small_tiles']} tiles smaller than patch_size "
                f"{self.ctx.cfg.patch_size}); first error: {self.first_error or 'none'}"
            )

    def progress(self) -> None:
        self.fruitless = 0


class _ShareReader:
    """Reads one share (see the module docstring); ``pushed`` counts the items yielded."""

    def __init__(self, ctx: ReadContext, share: Share, tally: Tally):
        self.ctx, self.share, self.tally = ctx, share, tally
        self.plan, self.cfg, self.epoch = ctx.plan, ctx.cfg, share.segment.epoch
        self.need = share.batches * self.plan.batch_size
        self.pushed = 0
        self.mask = None
        if share.skip:
            self.mask = consumed_pushes(
                self.need,
                share.skip * self.plan.batch_size,
                self.cfg.shuffle_buffer,
                slot_rng(self.cfg.seed, share, ctx.rank, 1),
            )
        self.params = self.cfg.augment_params()
        self.degrade_args = (
            parse_quality(self.cfg.quality),
            float(self.cfg.double_jpeg_p),
            self.cfg.subsamplings(),
            self.cfg.chain_params(),
        )
        self.tries = _ShardTries(ctx, share, slot_rng(self.cfg.seed, share, ctx.rank, 0), tally)

    def items(self) -> Iterator[Item]:
        if self.need <= 0:
            return
        for visit, (unit, refill) in enumerate(self.tries.order()):
            self.tries.begin(unit[0], refill)
            yield from self._shard(unit, visit)
            self.tries.end()
            if self.pushed >= self.need:
                return

    def _wanted(self, sample: int, excluded: frozenset[int]) -> list[int]:
        room = self.need - self.pushed
        ppi = self.plan.patches_per_image
        if not excluded:
            return list(range(min(ppi, room)))
        return [p for p in range(ppi) if (sample << 16 | p) not in excluded][:room]

    def _passed(self, n: int, sample: int, known: frozenset[int]) -> bool:
        """The next ``n`` pushes are all in the consumed prefix, and the tile is known to be usable."""
        return self.mask is not None and sample in known and bool(self.mask[self.pushed : self.pushed + n].all())

    def _shard(self, unit: Unit, visit: int) -> Iterator[Item]:
        """The items of samples ``lo <= j < end`` of shard ``index`` (``unit``)."""
        index, lo, end = unit
        seg = self.share.segment
        excluded = seg.excluded.in_shard(index) if seg.index else frozenset()
        known = self.share.hints.samples_in(index) if self.mask is not None else frozenset()
        if self.mask is not None and self.plan.counts_known and not self.plan.resampled:
            passed = self._pass_unopened(unit, excluded, known)
            if passed is not None:
                self.tries.progress()
                yield from passed
                return
        samples = shards.tar_samples(iter([self.plan.shards[index].url]), self.tries.handler)
        try:
            for j, sample in enumerate(samples):
                if j < lo:  # another slot's run of this shard: read past, never decoded
                    continue
                if j >= end:
                    break
                wanted = self._wanted(j, excluded)
                if not wanted:
                    continue
                items: list[Item] | None
                if self._passed(len(wanted), j, known):
                    items = [Item(None, None, address(index, j, p)) for p in wanted]
                else:
                    items = self._tile(sample, index, j, wanted, visit)
                    if items is None:
                        continue
                self.tries.progress()
                self.pushed += len(items)
                yield from items
                if self.pushed >= self.need:
                    break
        finally:
            samples.close()  # stops a shard read part way (quietly) and frees its stream

    def _pass_unopened(self, unit: Unit, excluded: frozenset[int], known: frozenset[int]) -> list[Item] | None:
        """Placeholders for the whole run when every tile of it (by the listing's count) is passed
        over; None when any tile must be read."""
        index, lo, end = unit
        out: list[Item] = []
        start = self.pushed
        for j in range(lo, min(end, self.plan.counts[index])):
            if self.pushed >= self.need:
                break
            wanted = self._wanted(j, excluded)
            if not wanted:
                continue
            if not self._passed(len(wanted), j, known):
                self.pushed = start
                return None
            out.extend(Item(None, None, address(index, j, p)) for p in wanted)
            self.pushed += len(wanted)
        return out

    def _tile(self, sample: dict, index: int, j: int, wanted: list[int], visit: int) -> list[Item] | None:
        """The wanted patches of one tile (placeholders for those in the consumed prefix); None when
        the tile is unusable (counted)."""
        epoch, plan = self.epoch, self.plan
        extra = (self.ctx.rank, self.share.slot, self.share.segment.index, visit) if plan.resampled else ()
        rng = tile_rng(self.cfg.seed, epoch, index, j, *extra)
        consumed = (
            self.mask[self.pushed : self.pushed + len(wanted)] if self.mask is not None else [False] * len(wanted)
        )
        try:
            img = augment.decode_image(shards.image_of(sample)[1], grayscale=self.cfg.grayscale)
            items = _patches(
                img, rng, dict(zip(wanted, consumed, strict=True)), self.params, self.degrade_args, address(index, j, 0)
            )
        except TileTooSmall as exc:
            self.tally.add(epoch, "small_tiles")
            warn.warning("%s: sample %s skipped: %s", sample.get("__url__"), sample.get("__key__"), exc)
            return None
        except Exception as exc:  # noqa: BLE001 (any decode failure = corrupt sample)
            self.tally.add(epoch, "corrupt_samples")
            warn.warning("%s: corrupt sample %s skipped: %s", sample.get("__url__"), sample.get("__key__"), exc)
            return None
        self.tally.add(epoch, "tiles")
        if self.tries.refill:
            self.tally.add(epoch, "refill_tiles")
        return items


def _patches(
    img,
    rng: np.random.Generator,
    wanted: dict[int, bool],
    params: augment.AugmentParams,
    degrade_args: tuple,
    base: int,
) -> list[Item]:
    """Patches 0..max(wanted) of a decoded tile are drawn in order (crop, then degradation); those
    in ``wanted`` are returned, cut only where ``wanted[p]`` is False (else placeholders)."""
    qrange, double_p, subs, chain = degrade_args
    array = None
    out = []
    for p in range(max(wanted) + 1):
        d = augment.draw(rng, img.height, img.width, params)
        degradation = draw_degradation(rng, qrange, double_p, subs, chain)
        if p not in wanted:
            continue
        if wanted[p]:
            out.append(Item(None, None, base | p))
            continue
        if array is None and d.size == (img.height, img.width):
            array = np.asarray(img)
        out.append(Item(augment.crop_first(img, d, params.patch_size, array), degradation, base | p))
    return out


def epoch_items(
    ctx: ReadContext, shares: Iterable[Share], tally: Tally, seen: dict[int, Share]
) -> Iterator[tuple[int, Item]]:
    """(epoch, Item) for each share in turn; ``seen[epoch]`` is set to the share as its reading starts."""
    for share in shares:
        seen[share.segment.epoch] = share
        for item in _ShareReader(ctx, share, tally).items():
            yield share.segment.epoch, item
