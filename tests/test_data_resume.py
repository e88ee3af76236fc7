"""Exact and elastic resume of the training stream (restorer.data.position), and quarantined
shards, over tiny real-photo shards: a loader started at a saved position yields exactly the
uninterrupted stream's remaining batches (same bytes), without decoding what was consumed; a
position re-planned for another topology reads each remaining patch once; a shard that failed is
skipped (and counted) from then on."""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_shards

from restorer.data import augment, shards, shuffle, skips
from restorer.data.config import StreamConfig
from restorer.data.loader import make_train_loader
from restorer.data.position import AddressSet, address, resume_position, start_position, unpack
from restorer.errors import UserError


def cfg_for(root, **kw) -> StreamConfig:
    return StreamConfig(
        **{**dict(shards=str(root), patch_size=32, patches_per_image=2, shuffle_buffer=8, seed=0), **kw}
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """24 tiles in 6 shards of 4 (96 px), 2 patches per tile."""
    return write_shards(tmp_path_factory.mktemp("resume") / "s", splits={"train": 24}, samples_per_shard=4, tile=96)


def take(loader, n: int, start=None) -> list[tuple[torch.Tensor, ...]]:
    if start is not None:
        loader.start_at(start)
    return list(itertools.islice(iter(loader), n))


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(u, v) for u, v in zip(x, y, strict=True)) for x, y in zip(a, b, strict=True)
    )


def position_after(cfg, k: int, **kw):
    loader = make_train_loader(cfg, batch_size=2, **kw)
    take(loader, k)
    return loader.position()


def test_addresses_pack_and_sets_look_up_by_shard():
    a = [address(3, 7, 1), address(3, 9, 0), address(0, 0, 0), address(5, 2**24 - 1, 2**16 - 1)]
    assert unpack(a).tolist() == [[3, 7, 1], [3, 9, 0], [0, 0, 0], [5, 2**24 - 1, 2**16 - 1]]
    s = AddressSet(a + a)
    assert len(s) == 4 and s.samples_in(3) == {7, 9} and s.in_shard(3) == {7 << 16 | 1, 9 << 16}
    assert s.per_shard(6).tolist() == [1, 0, 0, 2, 0, 1] and not s.samples_in(4)


def test_buffer_positions_are_computed_without_the_items():
    """The shuffle's output order depends only on the number of pushes: the consumed prefix of an
    epoch is known before any item is read."""
    for pushes, size, consumed in (
        (40, 8, 13),
        (40, 0, 5),
        (7, 16, 7),
        (100, 10, 0),
        (9000, 8, 8500),
        (5000, 1000, 10),
    ):
        buf = shuffle.EpochBuffer(size, np.random.default_rng(5))
        for i in range(pushes):
            buf.push(f"item{i}")
        buf.close()
        first = {int(x[4:]) for x in list(buf.out)[:consumed]}
        mask = shuffle.consumed_pushes(pushes, consumed, size, np.random.default_rng(5))
        assert set(np.nonzero(mask)[0].tolist()) == first


@pytest.mark.parametrize("workers", [0, 2])
def test_replay_yields_the_uninterrupted_batches(root, workers):
    """Kill points inside an epoch, right before and at its end, and inside the next one: the batches
    after the resume point are the uninterrupted run's, byte for byte, across the epoch boundary."""
    cfg = cfg_for(root)
    ref = make_train_loader(cfg, batch_size=2, num_workers=workers)
    bpe = ref.batches_per_epoch
    run = take(ref, 2 * bpe + 3)
    for k in (1, 5, bpe - 1, bpe, bpe + 3):
        pos = position_after(cfg, k, num_workers=workers)
        assert (pos.epoch, pos.done) == divmod(k, bpe) and len(pos.consumed) == pos.done * 2
        again = make_train_loader(cfg, batch_size=2, num_workers=workers)
        assert same(take(again, len(run) - k, start=pos), run[k:]), k
        assert again.epoch == 2


def test_replay_does_not_decode_what_was_consumed(tmp_path, monkeypatch):
    """Resuming at the end of an epoch decodes about as many tiles as resuming at its start (the
    shuffle buffer's worth), and opens no shard all of whose tiles were consumed."""
    root = write_shards(tmp_path / "s", splits={"train": 48}, samples_per_shard=4, tile=96)  # 12 shards
    cfg = cfg_for(root)
    bpe = make_train_loader(cfg, batch_size=2, num_workers=0).batches_per_epoch  # 48 batches
    counts = {"decode": 0, "open": 0}
    real_decode, real_open = augment.decode_image, shards.open_shard

    def decode(*a, **kw):
        counts["decode"] += 1
        return real_decode(*a, **kw)

    def open_shard(url):
        counts["open"] += 1
        return real_open(url)

    monkeypatch.setattr(augment, "decode_image", decode)
    monkeypatch.setattr(shards, "open_shard", open_shard)
    seen = {}
    for k in (0, bpe // 2, bpe - 1):
        pos = position_after(cfg, k, num_workers=0)
        counts.update(decode=0, open=0)
        take(make_train_loader(cfg, batch_size=2, num_workers=0), 1, start=pos)
        seen[k] = dict(counts)
    limit = cfg.shuffle_buffer + 2 * 2  # a buffer of patches and a batch's tiles, whatever the position
    assert all(c["decode"] <= limit for c in seen.values()), seen
    assert seen[bpe - 1]["open"] <= 4 < 12, seen  # most shards were not opened at all


def _epoch_ledger(loaders, epoch: int) -> np.ndarray:
    return np.concatenate([a for loader in loaders for e, a in loader.take_ledger() if e == epoch])


@pytest.mark.parametrize("old, new", [((2, 0), (1, 0)), ((1, 0), (2, 0)), ((2, 2), (1, 1)), ((1, 2), (2, 2))])
def test_elastic_resume_reads_every_remaining_patch_once(root, old, new):
    """(ranks, workers) change mid-epoch: the remaining patches are re-dealt; over the epoch no
    patch is read twice, and the unread ones are exactly those the plan states."""
    cfg = cfg_for(root)
    (w0, n0), (w1, n1) = old, new
    olds = [make_train_loader(cfg, batch_size=2, num_workers=n0, rank=r, world_size=w0) for r in range(w0)]
    for loader in olds:
        loader.keep_ledger = True
        take(loader, 3)
    saved = [loader.position() for loader in olds]
    got = [_epoch_ledger(olds, 0)]
    news = [make_train_loader(cfg, batch_size=2, num_workers=n1, rank=r, world_size=w1) for r in range(w1)]
    batches, lines = set(), set()
    for rank, loader in enumerate(news):
        mine = saved[rank] if rank < w0 else saved[0]
        pos, line = resume_position(loader.plan, mine, lambda: [p.consumed for p in saved], *loader.fingerprints)
        assert pos.segment == 1 and pos.done == 0 and "re-dealt" in line
        batches.add(pos.batches)
        lines.add(line)
        loader.keep_ledger = True
        take(loader, pos.batches + 1, start=pos)  # the rest of epoch 0, then epoch 1's first batch
        assert loader.epoch == 1
    assert len(batches) == len(lines) == 1  # every rank plans the same
    got.append(_epoch_ledger(news, 0))
    epoch = np.concatenate(got)
    assert len(np.unique(epoch)) == len(epoch) == 3 * 2 * w0 + batches.pop() * 2 * w1  # no patch twice
    unread = int(re.search(r"(\d+) patches left unread", lines.pop()).group(1))
    assert len(epoch) == saved[0].target - unread  # what the epoch owed, but for what the plan states


def test_replay_inside_a_replanned_segment(root):
    """A run resumed on another topology and interrupted again resumes exactly (same topology)."""
    cfg = cfg_for(root)
    olds = [make_train_loader(cfg, batch_size=2, num_workers=0, rank=r, world_size=2) for r in range(2)]
    for loader in olds:
        take(loader, 2)
    saved = [loader.position() for loader in olds]
    one = make_train_loader(cfg, batch_size=2, num_workers=2)
    pos, _ = resume_position(one.plan, saved[0], lambda: [p.consumed for p in saved], *one.fingerprints)
    run = take(one, pos.batches + 4, start=pos)
    for k in (1, pos.batches - 1, pos.batches + 1):
        part = make_train_loader(cfg, batch_size=2, num_workers=2)
        take(part, k, start=pos)
        mid = part.position()
        assert mid.segment == (1 if k < pos.batches else 0)
        assert same(take(make_train_loader(cfg, batch_size=2, num_workers=2), len(run) - k, start=mid), run[k:])


def test_changed_listing_or_options(root, tmp_path):
    cfg = cfg_for(root)
    pos = position_after(cfg, 5, num_workers=0)
    other = write_shards(tmp_path / "o", splits={"train": 20}, samples_per_shard=4, tile=96)
    loader = make_train_loader(cfg_for(other), batch_size=2, num_workers=0)
    again, line = resume_position(loader.plan, pos, lambda: [pos.consumed], *loader.fingerprints)
    assert (again.epoch, again.done) == (1, 0) and "listing changed" in line
    # other stream options (here the seed): the epoch is re-planned by addresses, not replayed
    reseeded = make_train_loader(cfg_for(root, seed=1), batch_size=2, num_workers=0)
    again, line = resume_position(reseeded.plan, pos, lambda: [pos.consumed], *reseeded.fingerprints)
    assert again.segment == 1 and len(again.excluded) == 10
    with pytest.raises(UserError, match="cannot continue"):
        make_train_loader(cfg, batch_size=4, num_workers=0).start_at(pos)  # not re-planned for batch 4


def test_start_position_is_a_plain_epoch_start(root):
    cfg = cfg_for(root)
    loader = make_train_loader(cfg, batch_size=2, num_workers=0)
    fresh = make_train_loader(cfg, batch_size=2, num_workers=0)
    assert same(
        take(loader, 3, start=start_position(loader.plan, 2, *loader.fingerprints)),
        take(fresh, 2 * fresh.batches_per_epoch + 3)[-3:],
    )
    # a position at an epoch's start resumed on another topology: that topology's own plan, no re-plan
    at_start = position_after(cfg, 2 * fresh.batches_per_epoch, num_workers=0)
    two = make_train_loader(cfg, batch_size=2, num_workers=0, rank=1, world_size=2)
    again, line = resume_position(two.plan, at_start, lambda: [at_start.consumed], *two.fingerprints)
    assert line is None and (again.epoch, again.segment, again.done, again.batches) == (2, 0, 0, two.batches_per_epoch)


# ------------------------------------------------------------------------------------ quarantine


def _with_a_bad_shard(tmp_path, monkeypatch) -> tuple[Path, Path, list[str]]:
    """Shards with shard 2 replaced by garbage, and the list of every shard URL opened from now on."""
    root = write_shards(tmp_path / "s", splits={"train": 24}, samples_per_shard=4, tile=96)
    bad = root / "train" / "shard-000002.tar"
    bad.write_bytes(b"not a tar" * 300)
    opened: list[str] = []
    real = shards.open_shard
    monkeypatch.setattr(shards, "open_shard", lambda url: opened.append(url) or real(url))
    return root, bad, opened


def test_failed_shard_is_quarantined_for_the_run(tmp_path, monkeypatch, caplog):
    root, bad, opened = _with_a_bad_shard(tmp_path, monkeypatch)
    monkeypatch.setattr(skips.warn, "count", 0)  # the rate limit is per process: earlier tests' warnings count
    loader = make_train_loader(cfg_for(root), batch_size=2, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="restorer.data"):
        take(loader, 4 * loader.batches_per_epoch)
    assert opened.count(str(bad)) == 1  # tried once in four epochs
    stats = loader.stats()
    assert stats["bad_shards"] == 1 and stats["quarantined_shards"] >= 1
    assert "bad shard skipped: ReadError" in caplog.text and "quarantined for the rest of the run" in caplog.text
    assert loader.take_failures() == [(2, 2**31 - 1)] and loader.take_failures() == []
    assert loader.quarantine.snapshot().tolist() == [[2, 2**31 - 1]]


def test_quarantine_epochs_and_news_from_other_ranks(tmp_path, monkeypatch):
    root, bad, opened = _with_a_bad_shard(tmp_path, monkeypatch)
    loader = make_train_loader(cfg_for(root, quarantine_epochs=1), batch_size=2, num_workers=0)
    take(loader, 5 * loader.batches_per_epoch)
    assert opened.count(str(bad)) == 3  # epochs 0, 2, 4 (skipped in the epoch after each failure)
    never = make_train_loader(cfg_for(root, quarantine_epochs=0), batch_size=2, num_workers=0)
    opened.clear()
    take(never, 3 * never.batches_per_epoch)
    assert opened.count(str(bad)) == 3 and never.take_failures() == []  # 0: the old behaviour
    told = make_train_loader(cfg_for(root), batch_size=2, num_workers=2)
    told.add_quarantine([(2, 2**31 - 1)])  # what another rank met (shared by the trainer)
    take(told, 2 * told.batches_per_epoch)  # the workers (other processes) see it too
    assert told.stats()["bad_shards"] == 0 and told.stats()["quarantined_shards"] >= 1
