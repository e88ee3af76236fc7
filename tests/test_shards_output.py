"""No shard_tools command replaces an existing output without --overwrite, and none writes into an
input even with it (shard_tools/existing.py): merge, build into each kind of existing folder,
verify. The bucket side is in tests/test_shards_remote.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from shard_fixtures import photo_crops, png_bytes, read_shards

from restorer.errors import UserError
from shard_tools import writer
from shard_tools.__main__ import main
from shard_tools.build import build
from shard_tools.config import BuildConfig
from shard_tools.verify import verify

SMALL = dict(tile=64, min_size=32, workers=1, progress=False, max_samples=3, val_fraction=0.25)


def _photos(root: Path, n: int, seed: int) -> Path:
    root.mkdir(parents=True)
    for i, arr in enumerate(photo_crops(n, h=96, w=128, seed=seed)):
        (root / f"p{i:02d}.png").write_bytes(png_bytes(arr))
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    return {"a": _photos(root / "a", 6, seed=1), "b": _photos(root / "b", 6, seed=2)}


def _build(out: Path, folder: Path, **kw) -> dict:
    return build(BuildConfig(out=str(out), folder=[str(folder)], **{**SMALL, **kw}))


def _snapshot(root: Path) -> dict[Path, tuple[int, int, int]]:
    """Every file under ``root`` with its inode, size and mtime: any replacement shows."""
    return {p: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _one_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_merge_refuses_an_existing_output_and_overwrite_replaces_it(tmp_path, inputs, capsys):
    shards = tmp_path / "shards"
    _build(shards, inputs["a"])  # what `make shards` made
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        _build(part, inputs["b"], num_jobs=2, job_index=i)
    before, parts_before = _snapshot(shards), [_snapshot(p) for p in parts]
    capsys.readouterr()
    assert main(["merge", str(shards), *map(str, parts)]) == 2
    line = _one_error(capsys)
    assert line.startswith(f"error: {shards}: holds a shard folder") and "--overwrite" in line
    assert _snapshot(shards) == before
    assert main(["merge", str(shards), *map(str, parts), "--overwrite"]) == 0
    whole = tmp_path / "whole"
    _build(whole, inputs["b"])
    assert set(read_shards(shards)) == set(read_shards(whole))
    assert verify(shards) == []
    assert [_snapshot(p) for p in parts] == parts_before  # the inputs are only read


def test_merge_into_a_part_is_refused_even_with_overwrite(tmp_path, inputs, capsys):
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        _build(part, inputs["b"], num_jobs=2, job_index=i)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    for out in (parts[0], parts[1] / "merged", tmp_path):  # the part, inside it, holding it
        assert main(["merge", str(out), *map(str, parts), "--overwrite"]) == 2
        assert "overlaps the input part" in _one_error(capsys)
    assert _snapshot(tmp_path) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["merge", str(empty), *map(str, parts)]) == 0  # an existing empty folder is new


def test_build_refuses_a_merged_folder_and_other_files(tmp_path, inputs):
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        _build(part, inputs["a"], num_jobs=2, job_index=i)
    merged = tmp_path / "merged"
    assert main(["merge", str(merged), *map(str, parts)]) == 0
    before = _snapshot(merged)
    with pytest.raises(UserError, match="without a build journal.*--overwrite"):
        _build(merged, inputs["a"])  # same settings, but a merged folder is not this build
    assert _snapshot(merged) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    (mine / "train").mkdir()
    (mine / "train" / "holiday.jpg").write_bytes(b"not the builder's")
    with pytest.raises(UserError, match=r"holds other files \(notes.txt\): not a shard folder"):
        _build(mine, inputs["a"])
    _build(mine, inputs["a"], overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me\n"  # what is not the builder's stays
    assert (mine / "train" / "holiday.jpg").read_bytes() == b"not the builder's"
    assert verify(mine) == []


def test_build_never_writes_into_an_input(tmp_path, inputs):
    folder = tmp_path / "photos"
    _photos(folder, 3, seed=4)
    before = _snapshot(folder)
    for out in (folder, tmp_path):  # the input itself, a folder holding it
        with pytest.raises(UserError, match="overlaps the input --folder"):
            _build(out, folder, overwrite=True)
    assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_an_interrupted_overwrite_resumes_without_asking_again(tmp_path, inputs, monkeypatch):
    real_write, calls = writer.HashingFile.write, [0]

    def counted(self, data):
        calls[0] += 1
        if calls[0] == fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(writer.HashingFile, "write", counted)
    fail_at = -1
    clean = _build(tmp_path / "clean", inputs["b"])
    writes_b = calls[0]
    out = tmp_path / "s"
    _build(out, inputs["a"])
    calls[0], fail_at = 0, writes_b // 2  # the disk fills halfway through build b
    with pytest.raises(UserError, match="No space left"):
        _build(out, inputs["b"], overwrite=True)
    assert not (out / "manifest.json").exists()
    assert _build(out, inputs["b"])["splits"] == clean["splits"]  # resumed: no --overwrite needed again
    assert verify(out) == []


def test_verify_writes_nothing(tmp_path, inputs):
    out = tmp_path / "s"
    m = _build(out, inputs["a"])
    victim = out / m["splits"]["train"]["shards"][0]["path"]
    victim.write_bytes(victim.read_bytes()[:-10])
    before = _snapshot(tmp_path)
    assert main(["verify", str(out)]) == 1
    assert _snapshot(tmp_path) == before
