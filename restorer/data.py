"""Training and validation streams: WebDataset shards -> patches -> JPEG-degraded uint8 batches.

Train stream, one epoch, per rank and DataLoader worker (a "slot")::

    shard list (manifest / sizes.json / URL spec)
      -> this slot's shards (the epoch's shard permutation, balanced by sample count)  | or resampled
      -> tar members -> samples -> decode tile -> ``patches_per_image`` augmented patches (augment.py)
      -> patch shuffle buffer -> JPEG round trip at the patch's quality -> uint8 batch in the worker

Guarantees (see ``make_train_loader``):

* Every rank yields exactly ``loader.batches_per_epoch`` batches per epoch, computed in the main
  process from the shard sample counts, so DDP ranks never wait on each other.
* Without ``resampled`` no sample is read twice in an epoch: the shards are split between the
  ``world_size x num_workers`` slots (greedy balance by sample count over the epoch's shard
  permutation, so slot sizes are the same every epoch and only which shard goes where changes);
  the epoch length is the smallest slot total, so larger slots leave a few samples for next epoch.
  With ``resampled`` each slot draws shards with replacement (weighted by sample count).
* More slots than shards would starve workers: the worker count is capped at
  ``shards // world_size`` (with a warning); with more ranks than shards the stream falls back to
  resampling (with a warning).
* A corrupt sample or shard (truncated tar, undecodable image, missing or vanished file, failing
  pipe) is logged (rate-limited), skipped and counted (``loader.stats()``, and one log line per
  epoch). A slot that runs short because of that tops up from the epoch's other shards (counted as
  ``refill_tiles``), so batch counts stay equal. The plan depends only on the shard listing
  (manifest, sizes.json, URL spec), so every rank computes the same ``batches_per_epoch``.
  A stream that yields nothing raises :class:`~restorer.errors.UserError` naming the path
  instead of hanging. Shard listing and tar reading live in :mod:`restorer.shardio`.
* Given (seed, epoch, rank, worker) the stream is reproducible: its numpy Generator is seeded
  from all four (Python's global ``random`` is left alone); the epoch is read from
  :class:`SharedEpoch` in each worker.
* ``epoch_samples`` counts *patches* per epoch over all ranks (what the trainer's option means).

Choices (measured with bench/loader.py): augmentation resamples only each patch's region
(augment.crop_first, 5x faster than rescaling/rotating the whole 512 px tile per patch); the
shuffle buffer holds clean *patches* (``shuffle_buffer`` of them, ~49 KB each at 128 px RGB), so
patches of one tile are spread apart, and the JPEG step runs as a patch leaves the buffer; workers
collate their own batches (``batch_size=None`` DataLoader) with one ``np.stack`` into NHWC memory,
handed out as a [B,C,P,P] view with channels_last strides (no transposing copy in the worker), and
batches stay uint8 until :func:`to_device_float` on the device (4x fewer bytes through pinned
memory and PCIe), which converts dtype and memory layout in one pass.
Per-worker throughput is bound by tile decoding (WebP lossless ~5 ms per 512 px tile here);
PPM shards (``shard_tools build --encoding ppm``) roughly double it.
"""
from __future__ import annotations

import dataclasses
import heapq
import logging
import multiprocessing as mp
import signal
import time
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from restorer import augment
from restorer.augment import AugmentParams, TileTooSmall
from restorer.degrade import SUBSAMPLING, jpeg_roundtrip, parse_quality
from restorer.errors import UserError
from restorer.shardio import Shard, image_of, iter_samples, resolve_shards  # noqa: F401

log = logging.getLogger("restorer.data")


# ----------------------------------------------------------------------------------------- config

@dataclasses.dataclass
class StreamConfig:
    shards: str = dataclasses.field(default="data/shards", metadata={
        "help": "shards dir with manifest.json, or URLs: shard-{000000..000099}.tar, pipe:CMD, s3://, https:// "
                "('::' separates several)"})
    splits: list[str] = dataclasses.field(default_factory=lambda: ["train"], metadata={
        "help": "splits of a shards dir (a folder of tars or a URL pattern has only 'train')"})
    patch_size: int = 128
    patches_per_image: int = 4
    quality: str = dataclasses.field(default="10-90", metadata={"help": "JPEG quality, or a range like 10-90 drawn per patch"})
    rescale_p: float = 0.5
    rescale_scales: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6)
    rotate_p: float = 0.5
    flip_p: float = 0.0
    chroma_subsampling: str = dataclasses.field(default="4:2:0", metadata={"choices": list(SUBSAMPLING)})
    grayscale: bool = False
    shuffle_buffer: int = dataclasses.field(default=1000, metadata={"help": "patches held per worker for shuffling"})
    resampled: bool = dataclasses.field(default=False, metadata={
        "help": "draw shards with replacement (weighted by size): epochs of any length, samples may repeat"})
    seed: int = 0

    def augment_params(self) -> AugmentParams:
        return AugmentParams(patch_size=int(self.patch_size), rescale_p=float(self.rescale_p),
                             rescale_scales=tuple(float(s) for s in self.rescale_scales),
                             rotate_p=float(self.rotate_p), flip_p=float(self.flip_p))

    def validate(self) -> None:
        try:
            parse_quality(self.quality)
            self.augment_params().validate()
        except ValueError as exc:
            raise UserError(f"stream config: {exc}") from None
        if self.chroma_subsampling not in SUBSAMPLING:
            raise UserError(f"stream config: chroma_subsampling must be one of {', '.join(SUBSAMPLING)}, "
                            f"got {self.chroma_subsampling!r}")
        if self.patches_per_image < 1 or self.shuffle_buffer < 0 or self.seed < 0:
            raise UserError("stream config: patches_per_image >= 1, shuffle_buffer >= 0 and seed >= 0 required")
        if not str(self.shards).strip():
            raise UserError("stream config: no shards given (a shards dir or a URL pattern)")


class SharedEpoch:
    """An epoch number the trainer sets and every DataLoader worker (forked or spawned) reads."""

    def __init__(self, epoch: int = 0):
        self.value = mp.Value("i", int(epoch))

    def set_value(self, epoch: int) -> None:
        self.value.value = int(epoch)

    def get_value(self) -> int:
        return int(self.value.value)


def stack_patches(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """HxW or HxWxC uint8 arrays -> uint8 [B,C,H,W] tensor: one ``np.stack`` into NHWC memory,
    returned as a view with channels_last strides (pinning and ``.to()`` keep them)."""
    arr = np.stack(arrays)
    if arr.ndim == 3:
        arr = arr[..., None]
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def _collate(items: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(degraded, clean, quality)] -> (degraded uint8 [B,C,P,P], clean uint8 [B,C,P,P], quality int64 [B])."""
    return (stack_patches([it[0] for it in items]), stack_patches([it[1] for it in items]),
            torch.tensor([it[2] for it in items], dtype=torch.int64))


def to_device_float(t: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B,C,H,W] -> float32 in [0, 1] on ``device``, in channels_last memory format when
    ``channels_last``, else contiguous NCHW. The copy to the device moves bytes, not floats, and
    keeps the batch's strides; the dtype conversion writes the asked layout in the same pass (for
    the loader's channels_last batches with ``channels_last=True`` nothing is re-laid out)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t.to(device, non_blocking=True).to(torch.float32, memory_format=fmt).div_(255.0)


# ------------------------------------------------------------------------------------- bookkeeping

COUNTERS = ("tiles", "patches", "batches", "corrupt_samples", "bad_shards", "small_tiles", "refill_tiles")


class _Counters:
    """Counts shared by the workers and the main process (one multiprocessing array)."""

    def __init__(self):
        self.array = mp.Array("q", len(COUNTERS))

    def add(self, local: dict[str, int]) -> None:
        if not any(local.values()):
            return
        with self.array.get_lock():
            for i, name in enumerate(COUNTERS):
                self.array[i] += local[name]
        for name in local:
            local[name] = 0

    def snapshot(self) -> dict[str, int]:
        with self.array.get_lock():
            return {name: int(self.array[i]) for i, name in enumerate(COUNTERS)}


class _RateLimitedLog:
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


_warn = _RateLimitedLog()


def _worker_seed(*parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(p) for p in parts])


# ------------------------------------------------------------------------------------------ plan

def assign_shards(counts: Sequence[int], slots: int, seed: int, epoch: int) -> list[list[int]]:
    """Split shard indices between ``slots``: the epoch's permutation of the shards, stably sorted
    by sample count, dealt greedily to the least-loaded slot. Slot totals depend only on the
    counts (so they are the same every epoch); which shard lands where changes with the epoch."""
    perm = np.random.default_rng(_worker_seed(seed, epoch, 0x5A4D)).permutation(len(counts))
    order = sorted(perm.tolist(), key=lambda i: -counts[i])
    heap = [(0, s) for s in range(slots)]
    out: list[list[int]] = [[] for _ in range(slots)]
    for i in order:
        load, s = heapq.heappop(heap)
        out[s].append(i)
        heapq.heappush(heap, (load + counts[i], s))
    return out


def _split_quota(total: int, capacity: Sequence[int]) -> list[int]:
    """Share ``total`` batches between workers, roughly in proportion to capacity and none above
    it while the capacities allow (estimated capacities may not: then the excess goes round)."""
    cap_sum = sum(capacity)
    quota = [min(c, total * c // cap_sum) if cap_sum else 0 for c in capacity]
    rest = total - sum(quota)
    while rest > 0:
        spare = [i for i, c in enumerate(capacity) if quota[i] < c] or range(len(capacity))
        i = max(spare, key=lambda j: (capacity[j] - quota[j], -j))
        quota[i] += 1
        rest -= 1
    return quota


@dataclasses.dataclass
class _Plan:
    spec: str
    shards: list[Shard]
    counts: list[int]  # known or estimated samples per shard
    counts_known: bool
    resampled: bool
    world_size: int
    num_workers: int  # effective (>= 1 slot per rank even when the DataLoader runs in-process)
    batch_size: int
    seed: int
    quotas: list[list[int]]  # [rank][worker] batches per epoch
    batches_per_epoch: int
    tiles_per_epoch: int  # tiles the plan reads per epoch, all ranks (expected)

    def own_shards(self, epoch: int, rank: int, worker: int) -> list[int]:
        slots = assign_shards(self.counts, self.world_size * self.num_workers, self.seed, epoch)
        return slots[rank * self.num_workers + worker]


def _make_plan(cfg: StreamConfig, batch_size: int, num_workers: int, world_size: int,
               epoch_samples: Optional[int]) -> tuple[_Plan, tuple[int, int]]:
    shards, missing = resolve_shards(cfg.shards, cfg.splits)
    known = all(s.samples is not None for s in shards)
    if not known and not epoch_samples:
        raise UserError(f"{cfg.shards}: shard sample counts unknown (no manifest.json or sizes.json next to "
                        "the shards): pass epoch_samples (patches per epoch, all ranks)")
    ppi = cfg.patches_per_image
    if known:
        counts = [int(s.samples) for s in shards]
    else:  # spread the given epoch's tiles over the shards; short shards are topped up at run time
        counts = [max(1, -(-int(epoch_samples) // ppi) // len(shards))] * len(shards)
    nslots_workers = max(1, num_workers)
    resampled = bool(cfg.resampled)
    if not resampled and world_size > len(shards):
        log.warning("%s: %d shards for %d ranks: falling back to resampled shards (with replacement)",
                    cfg.shards, len(shards), world_size)
        resampled = True
    if not resampled and world_size * nslots_workers > len(shards):
        capped = len(shards) // world_size
        log.warning("%s: %d shards cannot feed %d ranks x %d workers: using %d worker(s) per rank",
                    cfg.shards, len(shards), world_size, nslots_workers, capped)
        nslots_workers = capped
        num_workers = capped if num_workers > 0 else 0
    total = sum(counts)  # tiles
    if resampled:
        bpe = int(epoch_samples or total * ppi) // world_size // batch_size
        base, extra = divmod(bpe, nslots_workers)
        quotas = [[base + (w < extra) for w in range(nslots_workers)] for _ in range(world_size)]
    else:
        slots = assign_shards(counts, world_size * nslots_workers, cfg.seed, 0)
        cap = [[sum(counts[i] for i in slots[r * nslots_workers + w]) * ppi // batch_size
                for w in range(nslots_workers)] for r in range(world_size)]
        bpe = min(sum(c) for c in cap)
        if epoch_samples:
            want = int(epoch_samples) // world_size // batch_size
            if want > bpe and known:
                log.warning("%s: epoch_samples=%d patches is more than one pass over the data gives (%d batches "
                            "of %d per rank x %d ranks); using %d batches per rank (set StreamConfig.resampled, "
                            "the trainer's --resampled, to draw shards with replacement)",
                            cfg.shards, epoch_samples, bpe, batch_size, world_size, bpe)
            bpe = min(bpe, want) if known else want
        quotas = [_split_quota(bpe, c) for c in cap]
        if known and bpe * batch_size * world_size < 0.9 * total * ppi and not epoch_samples:
            log.warning("%s: uneven shards: an epoch uses %d of %d patches (the rest wait for later epochs)",
                        cfg.shards, bpe * batch_size * world_size, total * ppi)
    if bpe < 1:
        asked = f" (epoch_samples={epoch_samples} patches)" if epoch_samples else ""
        raise UserError(f"{cfg.shards}: {total} tiles x {ppi} patches{asked} over {world_size} rank(s) give no "
                        f"batch of {batch_size}: use more data, more patches_per_image or a smaller batch")
    tiles = bpe * batch_size * world_size // ppi
    plan = _Plan(spec=cfg.shards, shards=shards, counts=counts, counts_known=known, resampled=resampled,
                 world_size=world_size, num_workers=nslots_workers, batch_size=batch_size, seed=cfg.seed,
                 quotas=quotas, batches_per_epoch=bpe, tiles_per_epoch=tiles)
    return plan, (num_workers, missing)


# -------------------------------------------------------------------------------- train worker

class _TrainStream(IterableDataset):
    def __init__(self, plan: _Plan, cfg: StreamConfig, rank: int, shared_epoch: SharedEpoch, counters: _Counters):
        super().__init__()
        self.plan, self.cfg, self.rank = plan, cfg, rank
        self.shared_epoch, self.counters = shared_epoch, counters
        self.params = cfg.augment_params()
        self.qrange = parse_quality(cfg.quality)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch = self.shared_epoch.get_value()
        return self.batches(epoch, worker)

    # one slot's shard order: its own shards, then (only if they ran short) top-ups from all shards
    def _shard_order(self, rng: np.random.Generator, epoch: int, worker: int) -> Iterator[tuple[int, bool]]:
        plan = self.plan
        n = len(plan.shards)
        if plan.resampled:
            weights = np.asarray(plan.counts, dtype=np.float64)
            weights /= weights.sum()
            while True:
                yield int(rng.choice(n, p=weights)), False
        own = plan.own_shards(epoch, self.rank, worker)
        for i in rng.permutation(own).tolist():
            yield i, False
        yield -1, False  # end of own shards: drain the shuffle buffer before any top-up
        while True:
            for i in rng.permutation(n).tolist():
                yield i, True

    def _patches(self, rng: np.random.Generator, epoch: int, worker: int, local: dict[str, int]):
        cfg, plan = self.cfg, self.plan
        empty_run, first_error, bad = 0, None, set()
        own_count = 0 if plan.resampled else len(plan.own_shards(epoch, self.rank, worker))
        limit = own_count + 2 * len(plan.shards) + (8 if plan.resampled else 0)
        for index, refill in self._shard_order(rng, epoch, worker):
            if index < 0:
                yield None
                continue
            url = plan.shards[index].url
            got = 0
            if refill and index in bad:  # failed once this epoch: do not retry it for top-ups
                empty_run += 1
                if empty_run >= limit:
                    raise self._nothing_usable(empty_run, local, first_error)
                continue
            try:
                for key, sample in iter_samples(url):
                    try:
                        img = augment.decode_image(image_of(sample)[1], grayscale=cfg.grayscale)
                        patches = augment.random_patches(img, cfg.patches_per_image, rng, self.params)
                    except TileTooSmall as exc:
                        local["small_tiles"] += 1
                        _warn.warning("%s: sample %s skipped: %s", url, key, exc)
                        continue
                    except Exception as exc:  # noqa: BLE001 (any decode failure = corrupt sample)
                        local["corrupt_samples"] += 1
                        _warn.warning("%s: corrupt sample %s skipped: %s", url, key, exc)
                        continue
                    got += 1
                    local["tiles"] += 1
                    local["refill_tiles"] += int(refill)
                    for patch in patches:
                        yield patch, augment.draw_quality(rng, self.qrange)
            except Exception as exc:  # noqa: BLE001 (unreadable, truncated or vanished shard)
                local["bad_shards"] += 1
                bad.add(index)
                first_error = first_error or f"{url}: {exc}"
                _warn.warning("%s: bad shard skipped after %d samples: %s", url, got, exc)
            empty_run = 0 if got else empty_run + 1
            if empty_run >= limit:
                raise self._nothing_usable(empty_run, local, first_error)

    def _nothing_usable(self, tries: int, local: dict[str, int], first_error: Optional[str]) -> UserError:
        return UserError(
            f"{self.plan.spec}: no usable samples in {tries} shard tries "
            f"({local['bad_shards']} unreadable, {local['corrupt_samples']} corrupt samples, "
            f"{local['small_tiles']} tiles smaller than patch_size {self.cfg.patch_size}); "
            f"first error: {first_error or 'none'}")

    def batches(self, epoch: int, worker: int):
        cfg, plan = self.cfg, self.plan
        quota = plan.quotas[self.rank][worker] if worker < len(plan.quotas[self.rank]) else 0
        if quota <= 0:
            return
        seq = _worker_seed(cfg.seed, epoch, self.rank, worker)
        rng = np.random.default_rng(seq)
        local = dict.fromkeys(COUNTERS, 0)
        size, bsz = cfg.shuffle_buffer, plan.batch_size
        buf: list = []
        batch: list = []
        produced = 0

        def emit(item):
            patch, q = item
            batch.append((jpeg_roundtrip(patch, q, cfg.chroma_subsampling), patch, q))

        def make_batch():
            out = _collate(batch)
            batch.clear()
            local["patches"] += bsz
            local["batches"] += 1
            self.counters.add(local)
            return out

        try:
            for item in self._patches(rng, epoch, worker, local):
                if item is None:  # own shards done: drain the buffer in random order
                    for j in rng.permutation(len(buf)).tolist():
                        emit(buf[j])
                        if len(batch) == bsz:
                            yield make_batch()
                            produced += 1
                            if produced >= quota:
                                return
                    buf.clear()
                    continue
                if len(buf) < size:
                    buf.append(item)
                    continue
                if size:
                    j = int(rng.integers(size))
                    item, buf[j] = buf[j], item
                emit(item)
                if len(batch) == bsz:
                    yield make_batch()
                    produced += 1
                    if produced >= quota:
                        return
        finally:
            self.counters.add(local)


# --------------------------------------------------------------------------------- train loader

def _unwrap_worker_error(exc: UserError) -> UserError:
    """DataLoader re-raises a worker's UserError with the worker traceback as its message: keep the
    one line the worker meant."""
    text = str(exc)
    marker = "UserError: "
    idx = text.rfind(marker)
    line = text[idx + len(marker):].strip() if "Traceback" in text and idx >= 0 else text
    return UserError(line.splitlines()[0] if line else text)


class TrainLoader:
    """Iterate once = one epoch of exactly ``batches_per_epoch`` batches of
    ``(degraded uint8 [B,C,P,P], clean uint8 [B,C,P,P], quality int64 [B])``."""

    def __init__(self, cfg: StreamConfig, *, batch_size: int, num_workers: int, rank: int, world_size: int,
                 shared_epoch: Optional[SharedEpoch], pin_memory: bool, epoch_samples: Optional[int]):
        cfg.validate()
        if batch_size < 1 or num_workers < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"train loader: need batch_size >= 1, num_workers >= 0 and 0 <= rank < world_size "
                            f"(got {batch_size}, {num_workers}, {rank}, {world_size})")
        self.cfg = cfg
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.plan, (self.num_workers, self.missing_shards) = _make_plan(
            cfg, batch_size, num_workers, world_size, epoch_samples)
        self.batches_per_epoch = self.plan.batches_per_epoch
        self.num_samples = self.batches_per_epoch * batch_size * world_size  # patches per epoch, all ranks
        self.num_tiles = self.plan.tiles_per_epoch
        self.resampled = self.plan.resampled
        self._own_epoch = shared_epoch is None
        self.shared_epoch = shared_epoch or SharedEpoch(0)
        self._next_epoch = self.shared_epoch.get_value()
        self._counters = _Counters()
        dataset = _TrainStream(self.plan, cfg, rank, self.shared_epoch, self._counters)
        extra = dict(persistent_workers=True, prefetch_factor=2,
                     worker_init_fn=_init_worker) if self.num_workers > 0 else {}
        self._loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                  pin_memory=pin_memory, **extra)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def stats(self) -> dict[str, int]:
        """Cumulative counts since the loader was made (tiles, patches, batches, corrupt_samples,
        bad_shards, small_tiles, refill_tiles, missing_shards)."""
        return {**self._counters.snapshot(), "missing_shards": self.missing_shards}

    def __iter__(self):
        if self._own_epoch:
            self.shared_epoch.set_value(self._next_epoch)
            self._next_epoch += 1
        epoch = self.shared_epoch.get_value()
        before = self.stats()
        start = time.perf_counter()
        n = 0
        try:
            for batch in self._loader:
                n += 1
                if n == self.batches_per_epoch:
                    # callers (the trainer) stop after this batch without exhausting the generator:
                    # summarise now, then end the epoch
                    self._epoch_summary(epoch, n, before, start)
                    yield batch
                    return
                yield batch
        except UserError as exc:
            raise _unwrap_worker_error(exc) from None
        self._epoch_summary(epoch, n, before, start)  # only reached when the stream ran short

    def _epoch_summary(self, epoch: int, n: int, before: dict[str, int], start: float) -> None:
        after = self.stats()
        delta = {k: after[k] - before[k] for k in after if k != "missing_shards"}
        if n != self.batches_per_epoch:
            log.error("rank %d epoch %d: %d batches instead of %d", self.rank, epoch, n, self.batches_per_epoch)
        log.info("data rank %d epoch %d: %d batches in %.1fs, %d tiles, %d corrupt samples, %d bad shards, "
                 "%d small tiles, %d refill tiles", self.rank, epoch, n, time.perf_counter() - start,
                 delta["tiles"], delta["corrupt_samples"], delta["bad_shards"], delta["small_tiles"],
                 delta["refill_tiles"])


def _init_worker(worker_id: int) -> None:
    """In each DataLoader worker: one torch thread, and the default SIGTERM/SIGUSR1 actions (a fork
    inherits the trainer's handlers, which must run in the trainer only)."""
    torch.set_num_threads(1)
    for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_DFL)


def make_train_loader(cfg: StreamConfig, *, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1,
                      shared_epoch: Optional[SharedEpoch] = None, pin_memory: bool = False,
                      epoch_samples: Optional[int] = None) -> TrainLoader:
    """The training stream of rank ``rank`` of ``world_size`` (see the module docstring).

    ``epoch_samples``: *patches* per epoch over all ranks (default: one pass, the tiles' count x
    ``patches_per_image``; required when the shard counts are unknown, e.g. ``pipe:`` URLs
    without sizes.json). Every rank gets ``epoch_samples // world_size // batch_size`` batches
    (rounded down). Without ``cfg.resampled`` it can only shorten an epoch (asking for more warns
    and uses one pass). If ``shared_epoch`` is None the loader counts epochs itself (0, 1, ... per
    iteration); otherwise the caller sets it before each epoch.
    """
    return TrainLoader(cfg, batch_size=batch_size, num_workers=num_workers, rank=rank, world_size=world_size,
                       shared_epoch=shared_epoch, pin_memory=pin_memory, epoch_samples=epoch_samples)


# ----------------------------------------------------------------------------------- validation

def val_crop_size(height: int, width: int, crop: int) -> int:
    """Side of the centre crop of a val tile: ``crop``, or the tile's short side when smaller,
    rounded down to a multiple of 8 (whole JPEG blocks)."""
    return min(crop, height, width) // 8 * 8


class _ValStream(IterableDataset):
    def __init__(self, shards: list[Shard], spec: str, qualities: Sequence[int], crop: int, rank: int,
                 world_size: int, batch_size: int, grayscale: bool, subsampling: str, counters: _Counters):
        super().__init__()
        self.shards, self.spec, self.qualities, self.crop = shards, spec, tuple(qualities), crop
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.grayscale, self.subsampling, self.counters = grayscale, subsampling, counters

    def __iter__(self):
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        local = dict.fromkeys(COUNTERS, 0)
        pending: list = []

        def flush():
            out = _collate(pending)
            pending.clear()
            local["batches"] += 1
            return out

        offset = 0  # global sample index at the start of each shard (from the counts when known)
        try:
            for shard in self.shards:
                index = offset
                try:
                    for key, sample in iter_samples(shard.url):
                        mine = index % self.world_size == self.rank and (index // self.world_size) % nw == worker
                        index += 1
                        if not mine:
                            continue
                        try:
                            img = augment.decode_image(image_of(sample)[1], grayscale=self.grayscale)
                        except Exception as exc:  # noqa: BLE001
                            local["corrupt_samples"] += 1
                            _warn.warning("%s: corrupt val sample %s skipped: %s", shard.url, key, exc)
                            continue
                        c = val_crop_size(img.height, img.width, self.crop)
                        if c < 8:
                            local["small_tiles"] += 1
                            continue
                        y, x = (img.height - c) // 2, (img.width - c) // 2
                        clean = np.asarray(img.crop((x, y, x + c, y + c)))
                        local["tiles"] += 1
                        for q in self.qualities:
                            if pending and pending[0][1].shape != clean.shape:
                                yield flush()
                            pending.append((jpeg_roundtrip(clean, q, self.subsampling), clean, int(q)))
                            local["patches"] += 1
                            if len(pending) == self.batch_size:
                                yield flush()
                except Exception as exc:  # noqa: BLE001
                    local["bad_shards"] += 1
                    _warn.warning("%s: bad val shard skipped: %s", shard.url, exc)
                offset = offset + shard.samples if shard.samples is not None else index
            if pending:
                yield flush()
        finally:
            self.counters.add(local)


class ValLoader:
    """Deterministic validation batches: centre crops of the split at each quality; this rank's
    share is the samples with global index % world_size == rank (disjoint, near-equal)."""

    def __init__(self, shards: str, *, split: Optional[str], qualities: Sequence[int], crop: int, rank: int,
                 world_size: int, batch_size: int, num_workers: int, grayscale: bool, chroma_subsampling: str):
        if not qualities or any(not 1 <= int(q) <= 100 for q in qualities):
            raise UserError(f"val qualities must lie in 1..100, got {list(qualities)}")
        if chroma_subsampling not in SUBSAMPLING or crop < 8 or batch_size < 1 or not 0 <= rank < world_size:
            raise UserError("val loader: need crop >= 8, batch_size >= 1, 0 <= rank < world_size and a known "
                            "chroma_subsampling")
        self.spec = shards
        self.shards, self.missing_shards = resolve_shards(shards, None if split is None else [split])
        self.rank, self.world_size = rank, world_size
        self.qualities = tuple(int(q) for q in qualities)
        total = sum(s.samples for s in self.shards) if all(s.samples is not None for s in self.shards) else None
        self.num_tiles = None if total is None else len(range(rank, total, world_size))  # this rank
        self._counters = _Counters()
        dataset = _ValStream(self.shards, shards, self.qualities, crop, rank, world_size, batch_size, grayscale,
                             chroma_subsampling, self._counters)
        extra = dict(worker_init_fn=_init_worker) if num_workers > 0 else {}
        self._loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, **extra)

    def stats(self) -> dict[str, int]:
        return {**self._counters.snapshot(), "missing_shards": self.missing_shards}

    def __iter__(self):
        before = self.stats()["patches"]
        try:
            yield from self._loader
        except UserError as exc:
            raise _unwrap_worker_error(exc) from None
        if self.num_tiles and self.stats()["patches"] == before:
            raise UserError(f"{self.spec}: no readable validation samples (rank {self.rank}: "
                            f"{self.stats()['bad_shards']} bad shards, {self.stats()['corrupt_samples']} corrupt)")


def make_val_loader(shards: str, *, split: Optional[str] = "val", qualities: Sequence[int] = (10, 20, 30, 40),
                    crop: int = 256, rank: int = 0, world_size: int = 1, batch_size: int = 8, num_workers: int = 0,
                    grayscale: bool = False, chroma_subsampling: str = "4:2:0") -> ValLoader:
    """Validation stream (see :class:`ValLoader`).

    ``split``: the split of the shards dir ``shards`` (manifest.json or a ``<split>/`` folder); a
    spec without splits (a folder of tars, a brace/``::``/``pipe:`` pattern) has none but
    ``train``, so asking it for ``val`` raises UserError instead of validating on training data.
    ``split=None``: ``shards`` *are* the validation shards -- a pattern or tar as is, a folder's
    ``*.tar``, or a manifest's only split (e.g. the trainer's ``--val-shards``).

    Crops are ``crop`` px squares from the tile centre, or the tile's short side (rounded down to
    a multiple of 8) for smaller tiles; a batch holds crops of one size only. Each sample gives
    one item per quality, in order."""
    return ValLoader(shards, split=split, qualities=qualities, crop=crop, rank=rank, world_size=world_size,
                     batch_size=batch_size, num_workers=num_workers, grayscale=grayscale,
                     chroma_subsampling=chroma_subsampling)
