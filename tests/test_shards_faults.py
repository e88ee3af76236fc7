"""Fault injection for the shard builder: disk full mid-shard, SIGKILL mid-build, real BSDS500."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shard_fixtures import BSR, BSR_IMAGES, REPO, photo_crops, png_bytes, read_shards

from restorer.errors import UserError
from shard_tools import writer
from shard_tools.build import build
from shard_tools.config import BuildConfig
from shard_tools.verify import verify
from shard_tools.writer import sha256_file


def _folder(root: Path, n: int, seed: int = 5) -> Path:
    root.mkdir(parents=True)
    for i, arr in enumerate(photo_crops(n, h=96, w=128, seed=seed)):
        (root / f"p{i:03d}.png").write_bytes(png_bytes(arr))
    return root


def _cfg(out: Path, folder: Path, **kw) -> BuildConfig:
    base = dict(
        out=str(out),
        folder=[str(folder)],
        tile=64,
        min_size=32,
        workers=1,
        progress=False,
        max_samples=3,
        val_fraction=0.2,
    )
    return BuildConfig(**{**base, **kw})


def _shard_shas(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("shard-*.tar"))}


def test_disk_full_while_writing_a_shard(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "in", 12)
    clean = tmp_path / "clean"
    build(_cfg(clean, folder))
    out = tmp_path / "out"
    real_write = writer.HashingFile.write
    calls = {"n": 0}

    def full_disk(self, data):
        calls["n"] += 1
        if calls["n"] > 12:  # a few shards in, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(writer.HashingFile, "write", full_disk)
    with pytest.raises(UserError) as info:
        build(_cfg(out, folder))
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg
    failed = Path(msg.split(": ")[0])
    assert failed.name.startswith("shard-") and failed.parent.parent == out
    assert not failed.exists()
    # no temporary or partial file left; every shard under a final name is complete
    assert not list(out.rglob("*.tmp"))
    journal = [json.loads(x) for x in (failed.parent / ".journal.jsonl").read_text().splitlines()]
    done = {r["path"]: r for r in journal[1:] if "shard" in r}
    assert done, "some shards were complete before the disk filled"
    for p in failed.parent.glob("shard-*.tar"):
        assert p.name in done and sha256_file(p) == done[p.name]["sha256"]
        assert sha256_file(p) == sha256_file(clean / p.relative_to(out))
    # with space again, the same command finishes and equals an uninterrupted build
    monkeypatch.setattr(writer.HashingFile, "write", real_write)
    build(_cfg(out, folder))
    assert _shard_shas(out) == _shard_shas(clean)
    assert verify(out) == []


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


# The build run by the SIGKILL test: the real command in a child process that stops itself
# (SIGSTOP) right after journalling its 3rd shard, so that it is killed at a known point, never
# after it finished (a deterministic kill point instead of a race with a polling loop).
STOP_AFTER_3_SHARDS = """
import os, signal, sys
from shard_tools import writer
from shard_tools.__main__ import main
append = writer.Journal.append
def append_then_stop(self, rec):
    append(self, rec)
    if sum("shard" in r for r in self.records) == 3:
        os.kill(os.getpid(), signal.SIGSTOP)
writer.Journal.append = append_then_stop
sys.exit(main(sys.argv[1:]))
"""


def _state(pid: int) -> str:
    """The process state letter from /proc (T: stopped); '' once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.slow
def test_sigkill_midway_then_rerun(tmp_path):
    folder = _folder(tmp_path / "in", 40, seed=9)
    clean = tmp_path / "clean"
    build(_cfg(clean, folder, max_samples=2))
    out = tmp_path / "out"
    args = [
        "build",
        "--out",
        str(out),
        "--folder",
        str(folder),
        "--tile",
        "64",
        "--min-size",
        "32",
        "--workers",
        "2",
        "--max-samples",
        "2",
        "--val-fraction",
        "0.2",
        "--progress",
        "false",
    ]
    cmd = [sys.executable, "-m", "shard_tools", *args]
    log = tmp_path / "build.err"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", STOP_AFTER_3_SHARDS, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        while proc.poll() is None and _state(proc.pid) != "T":  # bounded by pytest's timeout
            time.sleep(0.01)
        assert proc.poll() is None, f"the build ended before its 3rd shard: {log.read_text()[-2000:]}"
        journal = (out / "train" / ".journal.jsonl").read_text()
        assert journal.count('"shard"') == 3 and '"final"' not in journal  # stopped midway, at a known point
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # its decode workers notice and exit by themselves (no orphans left running)
    deadline = time.time() + 120  # they poll every 0.5 s; a loaded machine is slower, not 240x slower
    while _processes_mentioning(str(out)) and time.time() < deadline:
        time.sleep(0.1)
    assert not _processes_mentioning(str(out)), "worker processes outlived the killed build"
    assert not (out / "manifest.json").exists()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resuming after" in r.stderr
    assert _shard_shas(out) == _shard_shas(clean)  # no duplicated, missing or changed sample
    got, want = read_shards(out), read_shards(clean)
    assert set(got) == set(want)
    assert (
        json.loads((out / "manifest.json").read_text())["splits"]
        == json.loads((clean / "manifest.json").read_text())["splits"]
    )
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_real_bsds500(tmp_path):
    if not BSR_IMAGES.is_dir():
        pytest.skip(f"real BSDS500 not found at {BSR} (CI has it at ../shared/datasets/BSR)")
    out = tmp_path / "bsr"  # its speed is measured by bench/shards.py, not asserted here
    m = build(BuildConfig(out=str(out), bsds=[str(BSR)], workers=2, tile=1024, progress=False, max_samples=64))
    assert m["sources"] == {"bsds": {"train": 200, "val": 100, "test": 200}}
    assert {s: info["samples"] for s, info in m["splits"].items()} == {"train": 200, "val": 100, "test": 200}
    assert m["skipped"] == []  # Thumbs.db ignored, not skipped
    assert verify(out) == []
