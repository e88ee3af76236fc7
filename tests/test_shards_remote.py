"""python -m shard_tools build --out s3://... and verify s3://..., against a moto S3 server on
127.0.0.1: same shards as a local build, manifest written last, nothing re-uploaded on a re-run,
an interrupted upload leaves no manifest, remote corruption found by verify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from shard_fixtures import REPO, photo_crops, png_bytes

from restorer.errors import UserError
from shard_tools import remote
from shard_tools.__main__ import main
from shard_tools.build import build
from shard_tools.config import BuildConfig

pytestmark = pytest.mark.timeout(300)
SMALL = dict(tile=64, min_size=32, workers=1, progress=False, max_samples=5, val_fraction=0.3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """8 crops of real photographs as PNG files (split train/val by the builder's path hash)."""
    root = tmp_path_factory.mktemp("photos")
    for i, arr in enumerate(photo_crops(8, h=100, w=140, seed=5)):
        (root / f"p{i}.png").write_bytes(png_bytes(arr))
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shard_tools", *args], cwd=REPO, capture_output=True, text=True, timeout=240
    )


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (the subprocess start costs seconds): exit code, stdout, stderr."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _s3():
    import boto3

    return boto3.client("s3")


def _objects(bucket_url: str, prefix: str) -> dict[str, bytes]:
    bucket = bucket_url[len("s3://") :]
    s3 = _s3()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {k[len(prefix) :]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


class Recorder:
    """Records the order of uploads and deletes (and can fail the n-th upload)."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.ops: list[tuple[str, str]] = []
        put, delete = remote.RemoteTree.put, remote.RemoteTree.delete
        rec = self

        def put_(tree, local, rel):
            if fail_at is not None and sum(op == "put" for op, _ in rec.ops) == fail_at:
                raise UserError(f"{tree.where(rel)}: cannot upload (injected)")
            rec.ops.append(("put", rel))
            put(tree, local, rel)

        def delete_(tree, rel):
            rec.ops.append(("delete", rel))
            delete(tree, rel)

        monkeypatch.setattr(remote.RemoteTree, "put", put_)
        monkeypatch.setattr(remote.RemoteTree, "delete", delete_)

    def puts(self) -> list[str]:
        return [rel for op, rel in self.ops if op == "put"]


def test_build_to_s3_equals_a_local_build_and_verifies(s3_bucket, photos, tmp_path):
    url = f"{s3_bucket}/shards/folder"
    r = _cli(
        "build",
        "--folder",
        str(photos),
        "--out",
        url,
        "--tile",
        "64",
        "--min-size",
        "32",
        "--workers",
        "1",
        "--progress",
        "false",
        "--max-samples",
        "5",
        "--val-fraction",
        "0.3",
    )
    assert r.returncode == 0, r.stderr
    local = build(BuildConfig(out=str(tmp_path / "local"), folder=[str(photos)], **SMALL))
    got = _objects(s3_bucket, "shards/folder/")
    want = {
        str(p.relative_to(tmp_path / "local")): p.read_bytes()
        for p in (tmp_path / "local").rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    assert sorted(got) == sorted(want)  # shards, sizes.json, manifest.json; no journal, no probe
    assert {"train", "val"} <= {k.split("/")[0] for k in got if "/" in k}
    for rel, data in want.items():
        if rel != "manifest.json":
            assert got[rel] == data, rel  # byte-identical shards and sizes.json
    manifest = json.loads(got["manifest.json"])
    assert manifest["splits"] == local["splits"] and manifest["config"]["out"] == url
    r = _cli("verify", url)
    assert r.returncode == 0 and r.stdout.strip() == f"{url}: all shards match the manifest", r.stderr


def test_manifest_is_written_last_and_a_rerun_uploads_nothing(s3_bucket, photos, monkeypatch):
    url = f"{s3_bucket}/p"
    rec = Recorder(monkeypatch)
    build(BuildConfig(out=url, folder=[str(photos)], **SMALL))
    puts = rec.puts()
    assert puts[-1] == "manifest.json" and puts.count("manifest.json") == 1
    assert sum(p.endswith(".tar") for p in puts) >= 3
    assert all(p.endswith(".tar") for p in puts[:-3])  # shards, then the sizes.json, then manifest
    rec.ops.clear()
    build(BuildConfig(out=url, folder=[str(photos)], **SMALL))
    assert rec.ops == []  # same command again: nothing uploaded, nothing deleted


def test_changed_build_deletes_the_old_manifest_first_and_stale_shards_last(s3_bucket, photos, monkeypatch, capsys):
    url = f"{s3_bucket}/p"
    build(BuildConfig(out=url, folder=[str(photos)], **{**SMALL, "max_samples": 2}))
    n_before = len([k for k in _objects(s3_bucket, "p/train/") if k.endswith(".tar")])
    rec = Recorder(monkeypatch)
    m = build(BuildConfig(out=url, folder=[str(photos)], overwrite=True, **SMALL))  # fewer, bigger shards
    assert rec.ops[0] == ("delete", "manifest.json")
    i_manifest = rec.ops.index(("put", "manifest.json"))
    assert all(op == "delete" and rel.endswith(".tar") for op, rel in rec.ops[i_manifest + 1 :])
    left = sorted(k for k in _objects(s3_bucket, "p/train/") if k.endswith(".tar"))
    assert left == sorted(Path(s["path"]).name for s in m["splits"]["train"]["shards"])
    assert len(left) < n_before
    assert _main(capsys, "verify", url)[0] == 0


def test_another_build_is_refused_before_anything_is_built_or_uploaded(s3_bucket, photos, tmp_path, monkeypatch):
    url, mine = f"{s3_bucket}/p", tmp_path / "mine"
    mine.mkdir()
    for p in photos.iterdir():
        (mine / p.name).write_bytes(p.read_bytes())
    build(BuildConfig(out=url, folder=[str(mine)], **SMALL))
    before = _objects(s3_bucket, "p/")
    rec = Recorder(monkeypatch)
    stage = tmp_path / "stage"
    with pytest.raises(UserError, match=r"holds the shards of a build with other settings; add --overwrite"):
        build(BuildConfig(out=url, folder=[str(mine)], stage_dir=str(stage), **{**SMALL, "max_samples": 2}))
    assert not stage.exists()  # refused before building
    (mine / "extra.png").write_bytes(png_bytes(photo_crops(1, h=100, w=140, seed=9)[0]))
    with pytest.raises(UserError, match=r"holds other shards .*--overwrite"):  # same settings, other inputs
        build(BuildConfig(out=url, folder=[str(mine)], **SMALL))
    assert rec.ops == [] and _objects(s3_bucket, "p/") == before


def test_interrupted_upload_leaves_no_manifest_and_a_rerun_completes(s3_bucket, photos, monkeypatch, capsys):
    url = f"{s3_bucket}/p"
    build(BuildConfig(out=url, folder=[str(photos)], **{**SMALL, "max_samples": 2}))
    with monkeypatch.context() as mp:
        Recorder(mp, fail_at=1)  # the 2nd upload of the changed build fails
        with pytest.raises(UserError, match="cannot upload"):
            build(BuildConfig(out=url, folder=[str(photos)], overwrite=True, **SMALL))
    assert "manifest.json" not in _objects(s3_bucket, "p/")  # readers see no half-made set
    build(BuildConfig(out=url, folder=[str(photos)], **SMALL))  # no manifest: nothing left to replace
    assert _main(capsys, "verify", url)[0] == 0


def test_verify_finds_changed_missing_and_unlisted_shards_in_the_bucket(s3_bucket, photos, capsys):
    url = f"{s3_bucket}/p"
    m = build(BuildConfig(out=url, folder=[str(photos)], **SMALL))
    bucket = s3_bucket[len("s3://") :]
    first, second = (s["path"] for s in m["splits"]["train"]["shards"][:2])
    original = _objects(s3_bucket, f"p/{first}")[""]
    _s3().put_object(Bucket=bucket, Key=f"p/{first}", Body=b"\0" * 1024 + original[1024:])
    _s3().delete_object(Bucket=bucket, Key=f"p/{second}")
    _s3().put_object(Bucket=bucket, Key="p/train/shard-000099.tar", Body=b"x")
    rc, out, err = _main(capsys, "verify", url)
    assert rc == 1, err
    lines = out.strip().splitlines()
    assert any(ln.startswith(f"{url}/{first}: sha256 ") for ln in lines), lines
    assert f"{url}/{second}: missing" in lines
    assert f"{url}/train/shard-000099.tar: shard not listed in the manifest" in lines


def test_missing_bucket_is_one_line_before_any_work(s3_bucket, photos, capsys):
    url = f"{s3_bucket}-absent/p"
    rc, out, err = _main(
        capsys, "build", "--folder", str(photos), "--out", url, "--workers", "1", "--progress", "false"
    )
    assert rc == 2 and out == ""
    assert err == (f"error: {url}: output is not writable (FileNotFoundError: The specified bucket does not exist)\n")
    rc, out, err = _main(capsys, "verify", url)
    assert rc == 2 and err.startswith(f"error: {url}/manifest.json: ") and len(err.splitlines()) == 1


def test_merge_refuses_urls(s3_bucket, capsys):
    rc, _, err = _main(capsys, "merge", f"{s3_bucket}/out", "part0")
    assert rc == 2
    assert err == f"error: {s3_bucket}/out: merge works on local folders (merge locally, then upload)\n"


def test_stage_dir_is_kept_and_a_rerun_rebuilds_and_uploads_nothing(s3_bucket, photos, tmp_path, monkeypatch):
    url, stage = f"{s3_bucket}/p", tmp_path / "stage"
    build(BuildConfig(out=url, folder=[str(photos)], stage_dir=str(stage), **SMALL))
    shards = sorted(stage.glob("*/shard-*.tar"))
    assert (stage / "manifest.json").is_file() and shards
    mtimes = [p.stat().st_mtime_ns for p in shards]
    rec = Recorder(monkeypatch)
    build(BuildConfig(out=url, folder=[str(photos)], stage_dir=str(stage), **SMALL))
    assert rec.ops == [] and [p.stat().st_mtime_ns for p in shards] == mtimes
