"""Shards, journal, manifest: everything written atomically, and resumable.

A split's samples come in a deterministic order (see build.py), so shard N of a given build
always holds the same samples. As each shard is finished it is fsynced, renamed from a hidden
temporary name (``.shard-000003.tar.tmp``) to its final name, and then one line is appended to
``<split>/.journal.jsonl``: its sample count, bytes, sha256, size/mtime and the *position* in the
sample order where the next shard starts. The first journal line is the fingerprint of the
build (content config + ordered input list). A re-run with the same fingerprint keeps every
journalled shard whose file still has the recorded size and mtime, and resumes at the position
after the last one: finished shards are not read, decoded or rewritten. A different fingerprint
starts that split over. Tar members carry mtime 0, so shard bytes do not depend on when they
were built (an interrupted-and-resumed build equals an uninterrupted one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from webdataset import ShardWriter

from restorer.errors import UserError
from restorer.fsutil import atomic_write_text, fsync_dir
from shard_tools.layout import FORMAT, JOURNAL, MANIFEST, NO_MANIFEST, SHARD_PATTERN, SHARD_RE, SIZES, is_temporary

log = logging.getLogger("shard_tools.writer")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via a temporary name + rename; an identical existing file is left untouched."""
    text = json.dumps(obj, indent=1) + "\n"
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class HashingFile:
    """A write-only file that hashes what goes through it (so a shard is never re-read)."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "wb")
        self._hash = hashlib.sha256()
        self.nbytes = 0

    def write(self, data) -> int:
        n = self._fh.write(data)
        self._hash.update(data)
        self.nbytes += len(data)
        return n

    def flush(self) -> None:
        self._fh.flush()

    def finish(self) -> str:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass
        self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- journal
def read_journal(split_dir: Path) -> list[dict]:
    """The lines of ``split_dir``'s journal as written (header first; [] when there is none),
    up to a torn last line of a killed run."""
    try:
        lines = (split_dir / JOURNAL).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    recs = []
    for line in lines:
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return recs


class Journal:
    def __init__(self, split_dir: Path, fingerprint: str):
        self.path = split_dir / JOURNAL
        self.fingerprint = fingerprint
        self.records: list[dict] = []

    def load(self) -> list[dict]:
        """Records of a previous run with the same fingerprint whose shards are intact."""
        recs = read_journal(self.path.parent)
        if not recs or recs[0].get("fingerprint") != self.fingerprint:
            if recs:
                log.info("%s: inputs or settings changed; rebuilding this split", self.path.parent)
            self.records = []
            return []
        good = []
        for rec in recs[1:]:
            if "shard" in rec:
                f = self.path.parent / rec["path"]
                try:
                    st = f.stat()
                except OSError:
                    break
                if st.st_size != rec["bytes"] or st.st_mtime_ns != rec["mtime_ns"]:
                    log.info("%s: changed since it was written; rebuilding from it", f)
                    break
            good.append(rec)
            if rec.get("final"):
                break
        self.records = good
        return good

    def start(self) -> None:
        """Rewrite the journal as header + the kept records (atomically)."""
        lines = [json.dumps({"format": FORMAT, "fingerprint": self.fingerprint})]
        lines += [json.dumps(rec) for rec in self.records]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def append(self, rec: dict) -> None:
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise UserError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        self.records.append(rec)


# ----------------------------------------------------------------------------------- shards
class ShardSink:
    """Feeds samples to webdataset's ShardWriter; each finished shard is made final atomically
    and journalled with the sample position where the next shard starts."""

    def __init__(self, split_dir: Path, journal: Journal, start_shard: int, max_samples: int, max_bytes: int):
        self.dir = split_dir
        self.journal = journal
        self.start_shard = start_shard
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self._writer: ShardWriter | None = None
        self._file: HashingFile | None = None
        self._fname: str | None = None
        self._pos: list[int] = [0, 0]
        self._count = 0
        self._sources: Counter = Counter()
        self._skipped: list[dict] = []
        self._images: dict[str, str] = {}  # sha256 of the original file -> its path

    # ShardWriter callbacks --------------------------------------------------------------------
    def _open(self, fname: str) -> HashingFile:
        final = Path(fname)
        self._fname = fname
        self._count = 0
        try:
            self._file = HashingFile(final.with_name(f".{final.name}.tmp"))
        except OSError as exc:
            raise UserError(f"{final}: cannot create shard ({exc.strerror or exc})") from None
        return self._file

    def _post(self, fname: str) -> None:
        final = Path(fname)
        assert self._file is not None
        f, self._file = self._file, None
        try:
            digest = f.finish()
            os.replace(f.path, final)
        except OSError as exc:
            f.discard()
            raise UserError(f"{final}: cannot write shard ({exc.strerror or exc})") from None
        fsync_dir(self.dir)
        st = final.stat()
        m = SHARD_RE.match(final.name)
        if m is None:  # ShardWriter names them by SHARD_PATTERN
            raise ValueError(f"{final}: not a shard name")
        n = int(m.group(1))
        self.journal.append(
            {
                "shard": n,
                "path": final.name,
                "samples": self._count,
                "bytes": st.st_size,
                "sha256": digest,
                "mtime_ns": st.st_mtime_ns,
                "end": list(self._pos),
                "sources": dict(self._sources),
                "skipped": self._skipped,
                "images": self._images,
            }
        )
        log.debug("finished %s (%d samples)", final, self._count)
        self._sources, self._skipped, self._images = Counter(), [], {}

    # public -----------------------------------------------------------------------------------
    def write(self, sample: dict, pos: tuple[int, int]) -> None:
        self._pos = list(pos)
        if self._writer is None:
            self._writer = ShardWriter(
                str(self.dir / SHARD_PATTERN),
                maxcount=self.max_samples,
                maxsize=self.max_bytes,
                post=self._post,
                start_shard=self.start_shard,
                verbose=0,
                opener=self._open,
                encoder=False,
                mtime=0,
                format="PAX_FORMAT",
            )
        self._guarded(self._writer.write, sample)
        self._count += 1

    def _guarded(self, op, *args) -> None:
        """Run a write on the shard writer; on failure drop the unfinished shard and raise one line."""
        try:
            op(*args)
        except UserError:
            self.abort()
            raise
        except OSError as exc:
            name = self._fname or str(self.dir)
            self.abort()
            raise UserError(f"{name}: cannot write shard ({exc.strerror or exc})") from None

    def note_image(self, source: str, sha256: str | None = None, where: str | None = None) -> None:
        """An image whose tiles are all written; its file hash is journalled (cross-split dedupe)."""
        self._sources[source] += 1
        if sha256 is not None:
            self._images[sha256] = where or ""

    def note_skip(self, entry: dict) -> None:
        self._skipped.append(entry)

    def close(self, end: tuple[int, int]) -> None:
        """Finish the last shard and journal the split as complete."""
        self._pos = list(end)
        if self._writer is not None:
            self._guarded(self._writer.close)
            self._writer = None
        self.journal.append(
            {
                "final": True,
                "end": list(end),
                "sources": dict(self._sources),
                "skipped": self._skipped,
                "images": self._images,
            }
        )

    def abort(self) -> None:
        """Drop the shard being written (never leaves a partial file under a final name)."""
        if self._file is not None:
            self._file.discard()
            self._file = None
        self._writer = None


def clean_split_dir(split_dir: Path, keep: int) -> None:
    """Remove temporary files of killed runs and shards numbered >= keep (from older builds)."""
    for p in split_dir.iterdir():
        m = SHARD_RE.match(p.name)
        if is_temporary(p.name) or (m and int(m.group(1)) >= keep):
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- manifest
def journalled_images(records: list[dict]) -> dict[str, str]:
    """sha256 -> path of every image whose tiles the journalled shards hold."""
    out: dict[str, str] = {}
    for rec in records:
        out.update(rec.get("images", {}))
    return out


def split_summary(records: list[dict], split: str) -> tuple[dict, Counter, list[dict]]:
    shards: list[dict] = []
    sources: Counter[str] = Counter()
    skipped: list[dict] = []
    for rec in records:
        if "shard" in rec:
            shards.append(
                {
                    "path": f"{split}/{rec['path']}",
                    "samples": rec["samples"],
                    "bytes": rec["bytes"],
                    "sha256": rec["sha256"],
                }
            )
        sources.update(rec.get("sources", {}))
        skipped.extend(rec.get("skipped", []))
    return ({"samples": sum(s["samples"] for s in shards), "shards": shards}, sources, skipped)


def write_sizes(split_dir: Path, shards: list[dict]) -> None:
    write_json_atomic(split_dir / SIZES, {Path(s["path"]).name: s["samples"] for s in shards})


def load_manifest(out: Path) -> dict:
    path = out / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {NO_MANIFEST}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc})") from None
