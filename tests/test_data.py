"""Training and validation streams (restorer.data) over tiny real-photo shards."""

from __future__ import annotations

import itertools
import logging
import shutil
import signal
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import rewrite_tar as _rewrite
from conftest import write_shards

from restorer.data import batch, plan, shards, val, workers
from restorer.data.batch import to_device_float
from restorer.data.config import StreamConfig
from restorer.data.loader import SharedEpoch, make_train_loader
from restorer.data.val import make_val_loader
from restorer.errors import UserError
from restorer.metrics import psnr


def cfg_for(root, **kw) -> StreamConfig:
    base = dict(shards=str(root), patch_size=64, shuffle_buffer=16, seed=0)
    base.update(kw)
    return StreamConfig(**base)


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch from a fresh iterator (the stream is endless; one that ran short would raise)."""
    return list(itertools.islice(iter(loader), loader.batches_per_epoch))


def test_batch_shapes_dtypes_ranges(tiny_shards):
    loader = make_train_loader(cfg_for(tiny_shards, quality="10-90"), batch_size=4, num_workers=0)
    assert loader.batches_per_epoch == 12 * 4 // 4 and len(loader) == 12
    assert loader.num_samples == 48
    got = batches(loader)
    assert len(got) == loader.batches_per_epoch
    for deg, clean, q in got:
        assert deg.shape == clean.shape == (4, 3, 64, 64)
        assert deg.dtype == clean.dtype == torch.uint8
        assert q.dtype == torch.int64 and q.shape == (4,)
        assert int(q.min()) >= 10 and int(q.max()) <= 90
    qualities = torch.cat([b[2] for b in got])
    assert len(set(qualities.tolist())) > 5  # drawn per patch
    stats = loader.stats()
    assert stats["tiles"] == 12 and stats["patches"] == 48 and stats["batches"] == 12
    assert stats["corrupt_samples"] == stats["bad_shards"] == stats["refill_tiles"] == 0


def test_grayscale_gives_one_channel(tiny_shards):
    loader = make_train_loader(cfg_for(tiny_shards, grayscale=True), batch_size=6, num_workers=0)
    deg, clean, _ = next(iter(loader))
    assert deg.shape == clean.shape == (6, 1, 64, 64)


def test_jpeg_really_applied(tiny_shards):
    def mean_psnr(q: str) -> float:
        loader = make_train_loader(cfg_for(tiny_shards, quality=q), batch_size=8, num_workers=0)
        deg, clean, qual = next(iter(loader))
        assert set(qual.tolist()) == {int(q)}
        return float(psnr(to_device_float(deg, "cpu"), to_device_float(clean, "cpu")).mean())

    low, high = mean_psnr("10"), mean_psnr("90")
    assert low < 33 and high > low + 8, (low, high)


def test_to_device_float():
    t = torch.tensor([[[[0, 255], [128, 1]]]], dtype=torch.uint8)
    out = to_device_float(t, "cpu")
    assert out.dtype == torch.float32 and float(out.max()) == 1.0 and float(out.min()) == 0.0
    cl = to_device_float(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "cpu", channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    # the loader's batches: [B,C,H,W] views of NHWC memory -> either layout, same values
    nhwc = torch.arange(2 * 5 * 6 * 3, dtype=torch.uint8).reshape(2, 5, 6, 3)
    batch = nhwc.permute(0, 3, 1, 2)
    want = batch.contiguous().float() / 255
    as_cl = to_device_float(batch, "cpu", channels_last=True)
    as_nchw = to_device_float(batch, "cpu")
    assert as_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(as_cl, want)
    assert as_nchw.is_contiguous() and torch.equal(as_nchw, want)
    assert nhwc[0, 0, 0, 1] == 1  # the input is left alone


def test_stack_patches_nhwc_memory_nchw_shape():
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, (8, 6, 3), dtype=np.uint8) for _ in range(4)]
    t = batch.stack_patches(rgb)
    assert t.shape == (4, 3, 8, 6) and t.dtype == torch.uint8
    assert t.is_contiguous(memory_format=torch.channels_last)  # no transposing copy was made
    np.testing.assert_array_equal(t.numpy(), np.stack(rgb).transpose(0, 3, 1, 2))
    gray = batch.stack_patches([p[..., 0] for p in rgb])
    assert gray.shape == (4, 1, 8, 6)
    np.testing.assert_array_equal(gray[:, 0].numpy(), np.stack([p[..., 0] for p in rgb]))
    deg, clean, q = batch.collate([(p, p, i) for i, p in enumerate(rgb)])
    assert torch.equal(deg, clean) and q.dtype == torch.int64 and q.tolist() == [0, 1, 2, 3]


def test_loader_workers_ignore_stop_signals(tiny_shards):
    """SIGTERM/SIGUSR1 mean "checkpoint at the next step" for the trainer; SLURM and torchrun send them
    to every process, the loader's workers included: real workers must survive them (a worker killed
    by one would crash the trainer before it saves) and keep producing batches."""
    import psutil

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for sig in saved:  # the trainer's handlers, which a forked worker inherits
            signal.signal(sig, lambda *_: None)
        loader = make_train_loader(cfg_for(tiny_shards), batch_size=2, num_workers=2)
        stream = iter(loader)
        first = [next(stream) for _ in range(2)]
        kids = psutil.Process().children()
        assert len(kids) >= 2
        for kid in kids:
            for sig in saved:
                kid.send_signal(sig)
        more = [next(stream) for _ in range(loader.batches_per_epoch * 2)]  # into the next epochs
        assert all(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)
        assert len(first) + len(more) == loader.batches_per_epoch * 2 + 2
        del stream
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    threads = torch.get_num_threads()
    workers.init_worker(0)  # what each worker ran
    assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in saved) and torch.get_num_threads() == 1
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    torch.set_num_threads(threads)


def test_epoch_summary_logged_when_caller_stops_at_the_last_batch(tiny_shards, caplog):
    """One DEBUG line per epoch and rank (an INFO line per epoch and rank flooded the console)."""
    with caplog.at_level(logging.INFO, logger="restorer.data"):
        quiet = make_train_loader(cfg_for(tiny_shards), batch_size=4, num_workers=0)
        batches(quiet)
    assert not [r for r in caplog.records if "data rank 0" in r.getMessage()]
    loader = make_train_loader(cfg_for(tiny_shards), batch_size=4, num_workers=0)
    with caplog.at_level(logging.DEBUG, logger="restorer.data"):
        for _ in range(2):  # like the trainer: take batches_per_epoch batches, never exhaust the iterator
            it = iter(loader)
            for _ in range(loader.batches_per_epoch):
                next(it)
    lines = [r.getMessage() for r in caplog.records if "data rank 0" in r.getMessage()]
    assert len(lines) == 2 and "epoch 0: 12 batches" in lines[0] and "epoch 1: 12 batches" in lines[1]
    assert "12 tiles, 0 corrupt samples, 0 bad shards" in lines[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_same_seed_same_batches_other_epoch_other_order(tiny_shards):
    cfg = cfg_for(tiny_shards)
    a = make_train_loader(cfg, batch_size=4, num_workers=0)
    b = make_train_loader(cfg, batch_size=4, num_workers=0)
    a0, b0 = batches(a), batches(b)
    for x, y in zip(a0, b0):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    a1 = batches(a)  # the loader counts epochs itself when no SharedEpoch is given
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a0, a1))
    other = batches(make_train_loader(cfg_for(tiny_shards, seed=1), batch_size=4, num_workers=0))
    assert not torch.equal(other[0][1], a0[0][1])


def test_shared_epoch_reaches_persistent_workers(tiny_shards):
    cfg = cfg_for(tiny_shards)
    epoch = SharedEpoch()
    loader = make_train_loader(cfg, batch_size=4, num_workers=2, shared_epoch=epoch)
    first, again, second = [], [], []
    for target, e in ((first, 0), (second, 1), (again, 0)):
        epoch.set_value(e)
        target.extend(batches(loader))
    assert len(first) == len(second) == loader.batches_per_epoch
    assert all(torch.equal(x[1], y[1]) for x, y in zip(first, again))  # (seed, epoch) reproduces
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(first, second))


def _record_reads(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = shards.open_shard

    def recording(url):
        seen.append(url)
        return real(url)

    monkeypatch.setattr(shards, "open_shard", recording)
    return seen


@pytest.mark.parametrize("train", [16, 14, 18])  # 4 equal shards; 4 shards, last short; 5 shards for 4 slots
def test_two_ranks_two_workers_split(tmp_path, monkeypatch, train):
    root = write_shards(tmp_path / "s", splits={"train": train}, samples_per_shard=4, tile=96)
    cfg = cfg_for(root, patch_size=32, patches_per_image=2)
    loaders = [make_train_loader(cfg, batch_size=2, num_workers=2, rank=r, world_size=2) for r in range(2)]
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch > 0
    all_urls = sorted(s.url for s in loaders[0].plan.shards)
    for epoch in (0, 1):
        seen = _record_reads(monkeypatch)
        owners: dict[str, tuple[int, int]] = {}
        refill_tiles = 0
        for rank, loader in enumerate(loaders):
            stream = loader._dataset
            count = 0
            for worker in range(loader.num_workers):
                start = len(seen)
                for b in stream.epoch_batches(epoch, worker):
                    count += 1
                    refill_tiles += sum(c.get("refill_tiles", 0) for c in b[3].values())
                for url in seen[start:]:
                    assert url not in owners, f"{url} read by {owners[url]} and {(rank, worker)}"
                    owners[url] = (rank, worker)
            assert count == loader.batches_per_epoch
        # the plan hands every shard to exactly one slot; those not read this epoch were not needed
        planned = sorted(
            loaders[0].plan.shards[i].url
            for r in range(2)
            for w in range(2)
            for i in loaders[0].plan.slot_shards(epoch, r, w)
        )
        assert planned == all_urls
        assert set(owners) <= set(all_urls)
        assert refill_tiles == 0
    # the real multi-process path gives the same counts on both ranks
    assert [len(batches(loader)) for loader in loaders] == [loaders[0].batches_per_epoch] * 2


def test_shard_assignment_changes_with_epoch_but_not_slot_sizes():
    counts = [4] * 9 + [2]
    a, b = plan.assign_shards(counts, 4, seed=0, epoch=0), plan.assign_shards(counts, 4, seed=0, epoch=1)
    assert a != b
    assert sorted(sum(counts[i] for i in s) for s in a) == sorted(sum(counts[i] for i in s) for s in b)
    assert sorted(i for s in a for i in s) == list(range(10))


def test_slot_batches_follow_the_dataloader_rotation():
    """Batch p of a rank comes from worker p % workers: each slot owes an epoch floor or ceil of
    batches_per_epoch / workers, and the shares add up to batches_per_epoch in every epoch."""

    def plan_of(bpe, workers):
        return plan.Plan(
            spec="x",
            shards=(),
            counts=(),
            counts_known=True,
            resampled=False,
            world_size=1,
            workers=workers,
            batch_size=1,
            seed=0,
            batches_per_epoch=bpe,
        )

    p = plan_of(5, 2)
    assert [p.slot_batches(0, s) for s in range(2)] == [3, 2]  # positions 0..4
    assert [p.slot_batches(1, s) for s in range(2)] == [2, 3]  # positions 5..9
    for bpe, w in ((6, 4), (7, 3), (1, 2), (37, 12)):
        p = plan_of(bpe, w)
        for epoch in range(5):
            shares = [p.slot_batches(epoch, s) for s in range(w)]
            assert sum(shares) == bpe and max(shares) - min(shares) <= 1
    # an iteration that starts at epoch 3 hands worker 0 the slot of absolute position 3 * bpe
    p = plan_of(5, 2)
    assert [p.slot_of(w, 3) for w in range(2)] == [1, 0] and p.slot_of(0, 2) == 0


def test_more_slots_than_shards(tmp_path, caplog):
    root = write_shards(tmp_path / "s", splits={"train": 12}, samples_per_shard=4, tile=96)  # 3 shards
    cfg = cfg_for(root, patch_size=32)
    with caplog.at_level(logging.WARNING, logger="restorer.data"):
        capped = make_train_loader(cfg, batch_size=2, num_workers=4, rank=0, world_size=2)
    assert capped.num_workers == 1 and not capped.resampled
    assert "worker(s) per rank" in caplog.text
    with caplog.at_level(logging.WARNING, logger="restorer.data"):
        resampled = make_train_loader(cfg, batch_size=2, num_workers=1, rank=3, world_size=4)
    assert resampled.resampled and "resampled" in caplog.text
    assert len(batches(resampled)) == resampled.batches_per_epoch == 12 * 4 // 4 // 2


def test_resampled_stream(tiny_shards):
    # epoch_patches counts patches over all ranks: 80 patches = 20 batches of 4 (beyond one pass: 48)
    loader = make_train_loader(cfg_for(tiny_shards, resampled=True), batch_size=4, num_workers=0, epoch_patches=80)
    assert loader.batches_per_epoch == 80 // 4 and loader.num_samples == 80
    assert len(batches(loader)) == 20


def test_epoch_patches_are_patches_over_all_ranks(tiny_shards, caplog):
    cfg = cfg_for(tiny_shards)  # 12 tiles x 4 patches = 48 patches per pass
    ranks = [
        make_train_loader(cfg, batch_size=4, num_workers=0, rank=r, world_size=2, epoch_patches=24) for r in range(2)
    ]
    assert [r.batches_per_epoch for r in ranks] == [3, 3] and ranks[0].num_samples == 24
    assert [len(batches(r)) for r in ranks] == [3, 3]
    odd = make_train_loader(cfg, batch_size=4, num_workers=0, rank=0, world_size=2, epoch_patches=30)
    assert odd.batches_per_epoch == 3  # rounded down to equal whole batches per rank
    with caplog.at_level(logging.WARNING, logger="restorer.data"):
        capped = make_train_loader(cfg, batch_size=4, num_workers=0, epoch_patches=1000)
    assert capped.batches_per_epoch == 12  # one pass without resampling
    assert "StreamConfig.resampled" in caplog.text and "--resampled" in caplog.text


def test_corrupt_shards_are_skipped_and_counted(tmp_path, caplog):
    root = write_shards(tmp_path / "s", splits={"train": 24}, samples_per_shard=4, tile=96)  # 6 shards
    shard = lambda i: root / "train" / f"shard-{i:06d}.tar"  # noqa: E731
    blob = shard(0).read_bytes()
    shard(0).write_bytes(blob[: len(blob) // 2])  # truncated tar
    first = {"done": False}

    def garbage(name, payload):
        if name.endswith(".png") and not first["done"]:
            first["done"] = True
            return b"this is not a png"
        return payload

    _rewrite(shard(1), garbage)  # one undecodable member
    shard(2).write_bytes(b"\x00garbage" * 300)  # not a tar at all
    cfg = cfg_for(root, patch_size=32)
    loader = make_train_loader(cfg, batch_size=4, num_workers=0)
    shard(3).unlink()  # disappears after the loader was made
    with caplog.at_level(logging.WARNING, logger="restorer.data"):
        got = batches(loader)
    assert len(got) == loader.batches_per_epoch  # topped up from the readable shards
    stats = loader.stats()
    assert stats["corrupt_samples"] >= 1  # counted per read: a top-up may read that shard again
    assert stats["bad_shards"] == 2  # truncated, not-a-tar (not retried during top-ups)
    assert stats["missing_shards"] == 1  # vanished: no such file
    assert stats["refill_tiles"] > 0
    assert "bad shard skipped" in caplog.text and "corrupt sample" in caplog.text
    assert "shard-000003.tar: missing shard skipped: UrlNotFound: no such file" in caplog.text


def test_missing_listed_shard_is_warned_and_counted(tmp_path):
    root = write_shards(tmp_path / "s", splits={"train": 12}, samples_per_shard=4, tile=96)
    (root / "train" / "shard-000002.tar").unlink()
    loader = make_train_loader(cfg_for(root, patch_size=32), batch_size=4, num_workers=0)
    assert loader.listed_missing == 1  # found (and warned about) when listed
    # the batch count comes from the listing (same on every rank); the gap is topped up
    assert len(batches(loader)) == loader.batches_per_epoch == 12 * 4 // 4
    stats = loader.stats()  # counted when read
    assert stats["missing_shards"] == 1 and stats["bad_shards"] == 0
    assert stats["tiles"] - stats["refill_tiles"] == 8 and stats["refill_tiles"] >= 4


@pytest.mark.parametrize("workers", [0, 1])
def test_stream_of_bad_shards_raises_clear_error(tmp_path, workers):
    root = write_shards(tmp_path / "s", splits={"train": 8}, samples_per_shard=4, tile=96)
    for p in (root / "train").glob("*.tar"):
        p.write_bytes(b"not a tar file" * 100)
    loader = make_train_loader(cfg_for(root, patch_size=32), batch_size=4, num_workers=workers)
    with pytest.raises(UserError, match=str(root)) as err:
        batches(loader)
    assert "\n" not in str(err.value) and "no usable samples" in str(err.value)


def test_wrong_paths_raise_user_error(tmp_path, tiny_shards):
    with pytest.raises(UserError, match="no such shards"):
        make_train_loader(cfg_for(tmp_path / "nope"), batch_size=4, num_workers=0)
    with pytest.raises(UserError, match="none of the 3 shard"):
        make_train_loader(cfg_for(f"{tmp_path}/x-{{0..2}}.tar"), batch_size=4, num_workers=0)
    with pytest.raises(UserError, match="no split 'test'"):
        make_train_loader(cfg_for(tiny_shards, splits=["test"]), batch_size=4, num_workers=0)
    with pytest.raises(UserError, match="no batch"):
        make_train_loader(cfg_for(tiny_shards), batch_size=1000, num_workers=0)
    with pytest.raises(UserError, match="quality"):
        make_train_loader(cfg_for(tiny_shards, quality="0-200"), batch_size=4, num_workers=0)


def test_tiles_smaller_than_patch_fail_clearly(tiny_shards):
    loader = make_train_loader(cfg_for(tiny_shards, patch_size=256), batch_size=4, num_workers=0)
    with pytest.raises(UserError, match="smaller than patch_size 256"):
        batches(loader)


def test_brace_pattern_and_pipe_urls(tiny_shards):
    brace = f"{tiny_shards}/train/shard-{{000000..000002}}.tar"
    loader = make_train_loader(cfg_for(brace), batch_size=4, num_workers=0)
    assert loader.batches_per_epoch == 12  # counts from train/sizes.json
    assert len(batches(loader)) == 12
    piped = f"pipe:cat {tiny_shards}/train/shard-{{000000..000002}}.tar"
    with pytest.raises(UserError, match="epoch_patches"):
        make_train_loader(cfg_for(piped), batch_size=4, num_workers=0)
    # epoch_patches in patches: 40 = 10 tiles = 3 estimated per shard, 10 batches asked
    odd = make_train_loader(cfg_for(piped), batch_size=4, num_workers=2, epoch_patches=40)
    assert odd.batches_per_epoch == 10 and sum(odd.plan.slot_batches(0, s) for s in range(odd.plan.workers)) == 10
    loader = make_train_loader(cfg_for(piped), batch_size=4, num_workers=1, epoch_patches=48)
    assert len(batches(loader)) == loader.batches_per_epoch == 12
    assert loader.stats()["tiles"] == 12 and loader.stats()["bad_shards"] == 0
    # a shorter epoch stops reading a pipe mid-shard: closed quietly, not counted as bad
    short = make_train_loader(cfg_for(piped, shuffle_buffer=0), batch_size=4, num_workers=0, epoch_patches=24)
    assert len(batches(short)) == 6 and short.stats()["bad_shards"] == 0
    # a plain folder of tars without a manifest, and '::'-joined URLs
    joined = "::".join(str(p) for p in sorted((tiny_shards / "train").glob("*.tar"))[:2])
    assert len(batches(make_train_loader(cfg_for(joined), batch_size=4, num_workers=0))) == 8


def _val_items(loader) -> list[tuple[bytes, int]]:
    out = []
    for deg, clean, q in loader:
        assert deg.dtype == clean.dtype == torch.uint8 and deg.shape == clean.shape
        out.extend((clean[i].numpy().tobytes(), int(q[i])) for i in range(len(q)))
    return out


def test_val_stream_deterministic_and_disjoint(tmp_path):
    root = write_shards(tmp_path / "s", splits={"val": 7}, samples_per_shard=3, tile=96)
    whole = make_val_loader(str(root), crop=64, batch_size=3)
    first = _val_items(whole)
    assert first == _val_items(whole)
    assert len(first) == 7 * 4 and Counter(q for _, q in first) == {10: 7, 20: 7, 30: 7, 40: 7}
    parts = [_val_items(make_val_loader(str(root), crop=64, batch_size=3, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == 4 * 4 and len(parts[1]) == 3 * 4
    assert not {c for c, _ in parts[0]} & {c for c, _ in parts[1]}
    assert sorted(parts[0] + parts[1]) == sorted(first)
    with_workers = _val_items(make_val_loader(str(root), crop=64, batch_size=3, num_workers=2))
    assert sorted(with_workers) == sorted(first)


def test_val_crops_centre_and_small_tiles(tiny_shards):
    # 192 px tiles, crop 256: the whole tile (a multiple of 8) is used
    loader = make_val_loader(str(tiny_shards), crop=256, batch_size=4, qualities=(10, 90))
    got = list(loader)
    assert all(b[0].shape[-2:] == (192, 192) for b in got)
    deg, clean, q = got[0]
    scores = psnr(to_device_float(deg, "cpu"), to_device_float(clean, "cpu"))
    assert float(scores[q == 10].mean()) + 8 < float(scores[q == 90].mean())
    assert val.val_crop_size(100, 300, 256) == 96


def test_val_never_reads_training_shards(tmp_path, tiny_shards):
    flat = tmp_path / "flat"  # a plain folder of (training) tars: no manifest, no val/ folder
    flat.mkdir()
    for tar in [*(tiny_shards / "train").glob("*.tar"), tiny_shards / "train" / "sizes.json"]:
        shutil.copy(tar, flat / tar.name)
    brace = f"{tiny_shards}/train/shard-{{000000..000002}}.tar"
    for spec in (str(flat), brace, f"pipe:cat {brace}", str(tiny_shards / "train" / "shard-000000.tar")):
        with pytest.raises(UserError, match="has no 'val' split") as err:
            make_val_loader(spec)
        assert spec in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="has no 'val' split"):
        make_train_loader(cfg_for(flat, splits=["train", "val"]), batch_size=4, num_workers=0)
    # the train split of a flat folder / pattern still works
    assert make_train_loader(cfg_for(flat), batch_size=4, num_workers=0).batches_per_epoch == 12
    assert make_train_loader(cfg_for(brace), batch_size=4, num_workers=0).batches_per_epoch == 12


def test_val_shards_given_explicitly(tmp_path, tiny_shards):
    """split=None: the spec itself names the validation shards (the trainer's --val-shards)."""
    reference = sorted(_val_items(make_val_loader(str(tiny_shards), crop=64)))  # the dir's val split
    assert len(reference) == 4 * 4
    pattern = f"{tiny_shards}/val/shard-{{000000..000000}}.tar"
    for spec in (pattern, str(tiny_shards / "val"), str(tiny_shards / "val" / "shard-000000.tar")):
        loader = make_val_loader(spec, split=None, crop=64)
        assert loader.num_tiles == 4  # counts from val/sizes.json
        assert sorted(_val_items(loader)) == reference
    only_val = write_shards(tmp_path / "v", splits={"val": 4}, samples_per_shard=4, tile=96)
    assert len(_val_items(make_val_loader(str(only_val), split=None, crop=64))) == 16  # a one-split manifest
    with pytest.raises(UserError, match="name the one to use"):
        make_val_loader(str(tiny_shards), split=None)  # train and val: which?


def test_val_unreadable_split_raises(tmp_path):
    root = write_shards(tmp_path / "s", splits={"val": 4}, samples_per_shard=4, tile=96)
    (root / "val" / "shard-000000.tar").write_bytes(b"junk" * 50)
    with pytest.raises(UserError, match="no readable validation samples"):
        list(make_val_loader(str(root)))


def test_stream_config_from_cli_flags():
    from restorer.config import parse_config

    cfg = parse_config(
        StreamConfig,
        [
            "--shards",
            "x",
            "--rescale-scales",
            "0.9",
            "0.8",
            "--splits",
            "train",
            "val",
            "--grayscale",
            "--quality",
            "10-90",
        ],
    )
    assert cfg.augment_params().rescale_scales == (0.9, 0.8) and cfg.splits == ["train", "val"] and cfg.grayscale
    with pytest.raises(UserError, match="rotate_p"):
        parse_config(StreamConfig, ["--shards", "x", "--rotate-p", "2"])


def _same(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b))


def test_endless_iterator_crosses_epochs_and_any_epoch_reproduces(tmp_path):
    """One iterator runs epoch after epoch (workers never restart); an odd batch count makes the
    two workers' shares alternate, and an iteration started at epoch e gives epoch e's batches."""
    root = write_shards(tmp_path / "s", splits={"train": 20}, samples_per_shard=4, tile=96)  # 5 shards
    cfg = cfg_for(root, patch_size=32, patches_per_image=2)
    loader = make_train_loader(cfg, batch_size=2, num_workers=2, epoch_patches=14)
    bpe = loader.batches_per_epoch
    assert bpe == 7
    it = iter(loader)
    run = [next(it) for _ in range(3 * bpe + 1)]  # three epochs and the first batch of the fourth
    assert loader.stats()["batches"] == 3 * bpe + 1 and loader.stats()["patches"] == (3 * bpe + 1) * 2
    for start in (1, 2):
        epoch = SharedEpoch(start)
        again = make_train_loader(cfg, batch_size=2, num_workers=2, shared_epoch=epoch, epoch_patches=14)
        got = list(itertools.islice(iter(again), bpe))
        assert all(_same(x, y) for x, y in zip(got, run[start * bpe : (start + 1) * bpe]))
    assert not _same(run[0], run[bpe])


def test_one_pass_epoch_reads_every_tile_once(tmp_path):
    """Without resampling an epoch's clean patches come from distinct tiles, ppi per tile, and
    the next epoch reads them again (other crops)."""
    root = write_shards(tmp_path / "s", splits={"train": 16}, samples_per_shard=4, tile=96)
    cfg = cfg_for(root, patch_size=96, patches_per_image=1, rescale_p=0.0, rotate_p=0.0)  # patch = whole tile
    loader = make_train_loader(cfg, batch_size=2, num_workers=2)
    assert loader.batches_per_epoch == 8
    it = iter(loader)
    for _ in range(2):
        epoch = [next(it) for _ in range(8)]
        tiles = [b[1][i].numpy().tobytes() for b in epoch for i in range(2)]
        assert len(tiles) == 16 and len(set(tiles)) == 16
