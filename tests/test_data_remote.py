"""The training and validation streams over shards in object storage, for real: a moto S3 server
and an HTTP server with injected faults, both on 127.0.0.1 (tests/objstore.py). The same shards
read locally, over ``http://`` (a brace pattern) and from ``s3://bucket/prefix`` give the same
plan and the same batches; dropped connections, 5xx, stalls, missing objects and a hanging
``pipe:`` command are retried, timed out, skipped and counted, and ranks stay in step. Every test
is bounded in time; the read timeouts are made small through the RESTORER_* variables."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import FIT_ARGS, check, launch, metrics, write_shards

from restorer.data.config import StreamConfig
from restorer.data.loader import make_train_loader
from restorer.data.val import make_val_loader
from restorer.errors import UserError

pytestmark = pytest.mark.timeout(240)

FAST_READS = {
    "RESTORER_CONNECT_TIMEOUT": "1",
    "RESTORER_READ_TIMEOUT": "1",
    "RESTORER_READ_RETRIES": "2",
    "RESTORER_RETRY_BACKOFF": "0.05",
}


def fast_reads(monkeypatch) -> None:
    """Small timeouts and retry waits, for this process and the ones it starts."""
    for k, v in FAST_READS.items():
        monkeypatch.setenv(k, v)


def cfg_for(spec: str, **kw) -> StreamConfig:
    return StreamConfig(**{**dict(shards=spec, patch_size=32, patches_per_image=2, shuffle_buffer=8, seed=0), **kw})


def epochs(loader, n: int = 1) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(iter(loader), n * loader.batches_per_epoch))


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def upload(root: Path, bucket_url: str, prefix: str) -> str:
    """Copy a local shards dir to ``s3://bucket/prefix`` (what ``shard_tools build --out s3://``
    writes: byte-identical shards, sizes.json, manifest.json); returns the URL."""
    import boto3

    s3 = boto3.client("s3")
    bucket = bucket_url[len("s3://") :]
    for rel, data in files_of(root).items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)
    return f"{bucket_url}/{prefix}"


def serve(root: Path, http) -> str:
    """Copy a local shards dir under the HTTP server; returns its base URL."""
    shutil.copytree(root, http.root / root.name)
    return http.url(root.name)


@pytest.fixture(autouse=True)
def fresh_warning_limit(monkeypatch):
    """Skip warnings are rate-limited per process (the first 5, then one per 30 s): start each
    test with a fresh allowance so that its own warnings can be checked."""
    from restorer.data.skips import warn

    monkeypatch.setattr(warn, "count", 0)
    monkeypatch.setattr(warn, "last", 0.0)


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """16 train tiles in 4 shards (+ sizes.json), 4 val tiles in 2 shards, 96 px real photos."""
    return write_shards(tmp_path / "shards", splits={"train": 16, "val": 4}, samples_per_shard=4, tile=96)


# ------------------------------------------------------------------------------ same data, any URL
def test_http_and_s3_streams_equal_the_local_one(shards, s3_bucket, http_faults):
    """Plan, batches and validation items are the same whichever way the shards are reached."""
    s3 = upload(shards, s3_bucket, "p")
    http = serve(shards, http_faults)
    specs = {
        "local": str(shards),
        "s3": s3,
        "http": f"{http}/train/shard-{{000000..000003}}.tar",
    }  # counts from the served sizes.json
    for rank in (0, 1):
        got = {}
        for name, spec in specs.items():
            loader = make_train_loader(cfg_for(spec), batch_size=4, num_workers=0, rank=rank, world_size=2)
            got[name] = (loader.batches_per_epoch, epochs(loader, 2), loader.stats())
        bpe, local, stats = got["local"]
        assert bpe == 16 * 2 // 2 // 4
        for name in ("s3", "http"):
            assert got[name][0] == bpe, name
            assert all(torch.equal(a, b) for x, y in zip(local, got[name][1]) for a, b in zip(x, y)), name
            assert got[name][2] == stats, name  # tiles read, nothing skipped
        assert stats["bad_shards"] == stats["missing_shards"] == 0
    val = {
        name: make_val_loader(spec, split=split, qualities=(10, 30), crop=64, world_size=1, batch_size=4)
        for name, spec, split in (
            ("local", str(shards), "val"),
            ("s3", s3, "val"),
            ("http", f"{http}/val/shard-{{000000..000001}}.tar", None),
        )
    }
    items = {name: [torch.cat(t) for t in zip(*v)] for name, v in val.items()}
    assert items["local"][0].shape[0] == 4 * 2
    for name in ("s3", "http"):
        assert all(torch.equal(a, b) for a, b in zip(items["local"], items[name])), name
        assert val[name].stats()["tiles"] == 4 and val[name].stats()["bad_shards"] == 0


def test_s3_stream_in_dataloader_workers(shards, s3_bucket):
    """Forked DataLoader workers open their own S3 clients; same batch count as local shards."""
    s3 = upload(shards, s3_bucket, "w")
    local = make_train_loader(cfg_for(str(shards)), batch_size=4, num_workers=2)
    remote = make_train_loader(cfg_for(s3), batch_size=4, num_workers=2)
    assert remote.batches_per_epoch == local.batches_per_epoch == 8
    got = epochs(remote, 2)
    assert len(got) == 16 and all(b[0].shape == (4, 3, 32, 32) for b in got)
    assert remote.stats()["tiles"] == 32 and remote.stats()["bad_shards"] == 0


# ------------------------------------------------------------------------------ faults while loading
def test_faults_during_loading_are_retried_or_skipped_and_ranks_stay_in_step(shards, http_faults, monkeypatch, caplog):
    """Shard 0: the connection drops mid-body (resumed with Range); shard 1: 503 then 500
    (retried); shard 2: the server never answers (timed out, retried, then skipped as bad);
    shard 3: the object is gone (404, counted as missing). Both ranks yield exactly
    batches_per_epoch batches, two epochs, in bounded time."""
    fast_reads(monkeypatch)
    http = serve(shards, http_faults)
    name = lambda i: f"/shards/train/shard-{i:06d}.tar"  # noqa: E731
    http_faults.fail(name(0), "drop")
    http_faults.fail(name(1), "503", "500")
    http_faults.fail(name(2), "stall", always=True)
    (http_faults.root / name(3).lstrip("/")).unlink()
    spec = f"{http}/train/shard-{{000000..000003}}.tar"
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="restorer.data"):
        loaders = [make_train_loader(cfg_for(spec), batch_size=4, num_workers=0, rank=r, world_size=2) for r in (0, 1)]
        assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch == 4  # from the listing
        got = [epochs(loader, 2) for loader in loaders]
    assert time.monotonic() - t0 < 60
    assert [len(g) for g in got] == [8, 8]  # in step: equal batches, whatever was skipped
    stats = [loader.stats() for loader in loaders]
    assert sum(s["missing_shards"] for s in stats) >= 1  # shard 3 (then quarantined by the rank that met it)
    assert sum(s["bad_shards"] for s in stats) >= 1  # shard 2 (likewise)
    assert sum(s["refill_tiles"] for s in stats) > 0  # the ranks that lost shards topped up
    text = caplog.text
    assert f"{http}/train/shard-000002.tar: bad shard skipped: UrlReadError: TimeoutError" in text
    assert "(after 3 attempts)" in text
    assert f"{http}/train/shard-000003.tar: missing shard skipped: UrlNotFound: HTTP 404" in text
    assert "shard-000000.tar: bad" not in text and "shard-000001.tar: bad" not in text  # recovered
    assert any(p == name(0) and s > 0 for p, s in http_faults.ranges)  # resumed where it broke
    assert http_faults.hits[name(1)] >= 3  # two 5xx, then the shard


@pytest.mark.parametrize("workers", [0, 1])
def test_stalled_shard_is_retried_once_per_run_not_once_per_epoch(shards, http_faults, monkeypatch, caplog, workers):
    """A server that never answers for one shard: its retries are spent once, then it is
    quarantined -- four epochs cost (retries + 1) x the read timeout once, not four times."""
    fast_reads(monkeypatch)
    http = serve(shards, http_faults)
    stalled = "/shards/train/shard-000002.tar"
    http_faults.fail(stalled, "stall", always=True)
    loader = make_train_loader(cfg_for(f"{http}/train/shard-{{000000..000003}}.tar"), batch_size=4, num_workers=workers)
    with caplog.at_level(logging.WARNING, logger="restorer.data"):
        assert len(epochs(loader, 4)) == 4 * loader.batches_per_epoch
    assert http_faults.hits[stalled] == 3  # RESTORER_READ_RETRIES=2: three attempts, in the first epoch only
    stats = loader.stats()
    assert stats["bad_shards"] == 1 and stats["quarantined_shards"] >= 3 and stats["refill_tiles"] > 0
    if workers == 0:  # (a worker process logs where caplog does not see it)
        assert "shard-000002.tar: bad shard skipped: UrlReadError: TimeoutError" in caplog.text
        assert "quarantined for the rest of the run" in caplog.text


def test_missing_s3_object_is_counted_as_missing(shards, s3_bucket):
    import boto3

    s3 = upload(shards, s3_bucket, "m")
    boto3.client("s3").delete_object(Bucket=s3_bucket[len("s3://") :], Key="m/train/shard-000001.tar")
    loader = make_train_loader(cfg_for(s3), batch_size=4, num_workers=0)
    assert len(epochs(loader)) == loader.batches_per_epoch == 8
    stats = loader.stats()
    assert stats["missing_shards"] == 1 and stats["bad_shards"] == 0 and stats["refill_tiles"] >= 4


def test_hanging_pipe_command_is_timed_out_and_skipped(shards, monkeypatch, caplog):
    """One shard's command writes nothing and never exits: killed after the read timeout, the
    shard is counted as bad and the epoch is topped up from the others."""
    fast_reads(monkeypatch)
    monkeypatch.setenv("RESTORER_READ_RETRIES", "0")
    hang = "shard-000001"
    spec = f"pipe:sh -c 'case $0 in *{hang}*) sleep 120;; *) cat $0;; esac' {shards}/train/shard-{{000000..000003}}.tar"
    t0 = time.monotonic()
    loader = make_train_loader(cfg_for(spec, shuffle_buffer=0), batch_size=4, num_workers=0, epoch_patches=32)
    with caplog.at_level(logging.WARNING, logger="restorer.data"):
        assert len(epochs(loader)) == loader.batches_per_epoch == 8
    assert time.monotonic() - t0 < 20
    assert loader.stats()["bad_shards"] == 1
    assert f"{hang}.tar: bad shard skipped: UrlReadError: command wrote nothing for 1 s (killed)" in caplog.text


def test_missing_backend_package_stops_with_one_line():
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    with pytest.raises(UserError) as ei:
        make_train_loader(
            cfg_for("gs://bucket/shard-{000000..000001}.tar"), batch_size=4, num_workers=0, epoch_patches=64
        )
    assert str(ei.value) == (
        "gs://bucket/sizes.json: gs:// needs a package that is not installed: pip install 'restorer[gcs]'"
    )


def test_unreadable_remote_listing_stops_with_one_line(shards, http_faults, monkeypatch):
    """A sizes.json that keeps failing is not taken as 'counts unknown' (ranks would plan apart)."""
    fast_reads(monkeypatch)
    http = serve(shards, http_faults)
    http_faults.fail("/shards/train/sizes.json", "503", always=True)
    with pytest.raises(UserError) as ei:
        make_train_loader(cfg_for(f"{http}/train/shard-{{000000..000003}}.tar"), batch_size=4, num_workers=0)
    assert str(ei.value) == f"{http}/train/sizes.json: cannot read: HTTP 503 Service Unavailable (after 3 attempts)"
    with pytest.raises(UserError, match="no such object"):
        make_train_loader(cfg_for(f"{http}/absent"), batch_size=4, num_workers=0)


# ------------------------------------------------------------------------------ 2-process training
TRAIN_ARGS = [
    *FIT_ARGS,
    "--patch-size",
    "32",
    "--val-crop",
    "32",
    "--max-steps",
    "6",
    "--val-every",
    "3",
    "--save-every",
    "100",
    "--tracker",
    "none",
]


def _local_bpe(spec: str, workers: int) -> list[int]:
    """batches_per_epoch of each rank of a 2-process run with TRAIN_ARGS' data options."""
    cfg = StreamConfig(shards=spec, patch_size=32, patches_per_image=1, rescale_p=0, rotate_p=0, quality="10")
    return [
        make_train_loader(cfg, batch_size=2, num_workers=workers, rank=r, world_size=2).batches_per_epoch
        for r in (0, 1)
    ]


def _trained(run: Path, steps: int = 6) -> tuple[dict, list[dict]]:
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["end_step"] == steps and info["weights_identical_across_ranks"]
    rows = [r for r in metrics(run) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert any("val/psnr_q10" in r for r in metrics(run))  # validated from the same server
    return info, rows


@pytest.mark.slow
def test_two_process_training_streams_s3_and_http(shards, s3_bucket, http_faults, tmp_path):
    s3 = upload(shards, s3_bucket, "train-run")
    http = serve(shards, http_faults)
    want = _local_bpe(str(shards), workers=1)
    assert want[0] == want[1] == 16 // 2 // 2
    run = tmp_path / "run-s3"  # train and val split both from the bucket; a forked worker per rank
    check(launch(["--shards", s3, "--run-dir", str(run), *TRAIN_ARGS, "--num-workers", "1"], tmp_path))
    info, rows = _trained(run)
    assert info["batches_per_epoch"] == want[0]
    assert rows[-1]["data/bad_shards"] == rows[-1]["data/missing_shards"] == 0
    run = tmp_path / "run-http"
    check(
        launch(
            [
                "--shards",
                f"{http}/train/shard-{{000000..000003}}.tar",
                "--run-dir",
                str(run),
                *TRAIN_ARGS,
                "--val-shards",
                f"{http}/val/shard-{{000000..000001}}.tar",
            ],
            tmp_path,
        )
    )
    info, rows = _trained(run)
    assert info["batches_per_epoch"] == _local_bpe(str(shards), workers=0)[0]
    assert rows[-1]["data/bad_shards"] == rows[-1]["data/missing_shards"] == 0


@pytest.mark.slow
def test_two_process_training_survives_http_faults(shards, http_faults, tmp_path, monkeypatch):
    """Drop, 5xx, stall and a missing object during 2-process training: it finishes every step,
    logs the counts, and its replicas stay identical (no rank waited forever)."""
    fast_reads(monkeypatch)
    http = serve(shards, http_faults)
    name = lambda i: f"/shards/train/shard-{i:06d}.tar"  # noqa: E731
    http_faults.fail(name(0), "drop", "drop")
    http_faults.fail(name(1), "503", "500")
    http_faults.fail(name(2), "stall", always=True)
    (http_faults.root / name(3).lstrip("/")).unlink()
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = check(
        launch(
            [
                "--shards",
                f"{http}/train/shard-{{000000..000003}}.tar",
                "--run-dir",
                str(run),
                *TRAIN_ARGS,
                "--val-shards",
                f"{http}/val/shard-{{000000..000001}}.tar",
            ],
            tmp_path,
            timeout=200,
        )
    )
    assert time.monotonic() - t0 < 200
    _, rows = _trained(run)
    assert rows[-1]["data/bad_shards"] >= 1 and rows[-1]["data/missing_shards"] >= 1
    out = proc.stdout + proc.stderr
    assert "shard-000002.tar: bad shard skipped" in out and "shard-000003.tar: missing shard skipped" in out
    assert any(p == name(0) and s > 0 for p, s in http_faults.ranges)  # the dropped read resumed


@pytest.mark.slow
def test_two_process_training_tries_a_stalled_shard_once(shards, http_faults, tmp_path, monkeypatch):
    """A shard whose server never answers, over 4 epochs of 2-process training: the rank that meets
    it spends its retries once; the quarantine reaches the other rank at the next step (--log-every
    1), which never asks for it -- (retries + 1) requests in the whole run, not per epoch."""
    fast_reads(monkeypatch)
    http = serve(shards, http_faults)
    stalled = "/shards/train/shard-000002.tar"
    http_faults.fail(stalled, "stall", always=True)
    run = tmp_path / "run"
    args = ["--shards", f"{http}/train/shard-{{000000..000003}}.tar", "--run-dir", str(run), *TRAIN_ARGS]
    extra = ["--val-shards", f"{http}/val/shard-{{000000..000001}}.tar", "--shuffle-buffer", "0"]
    check(launch([*args, *extra, "--max-steps", "16", "--val-every", "100"], tmp_path, timeout=300))
    info, rows = _trained(run, steps=16)
    assert info["batches_per_epoch"] == 4  # 16 steps = 4 epochs
    assert http_faults.hits[stalled] == 3  # RESTORER_READ_RETRIES=2: three attempts in the whole run
    assert rows[-1]["data/bad_shards"] == 1 and rows[-1]["data/quarantined_shards"] >= 3
    saved = json.loads((run / "checkpoints" / "step-0000016" / "train_state.json").read_text())
    assert saved["quarantine"] == [[2, 2**31 - 1]]  # a resumed run keeps skipping it
