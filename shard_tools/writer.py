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
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from webdataset import ShardWriter

from restorer.errors import UserError
from restorer.fsutil import atomic_write_text, fsync_dir
from shard_tools.config import NON_CONTENT_FIELDS

log = logging.getLogger("shard_tools.writer")

SHARD_PATTERN = "shard-%06d.tar"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
JOURNAL = ".journal.jsonl"
FORMAT = 1


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
class Journal:
    def __init__(self, split_dir: Path, fingerprint: str):
        self.path = split_dir / JOURNAL
        self.fingerprint = fingerprint
        self.records: list[dict] = []

    def load(self) -> list[dict]:
        """Records of a previous run with the same fingerprint whose shards are intact."""
        try:
            lines = self.path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []
        recs = []
        for line in lines:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn last line of a killed run
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
        n = int(SHARD_RE.match(final.name).group(1))
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
        tmp = p.name.startswith(".shard-") and p.name.endswith(".tmp")
        if tmp or (m and int(m.group(1)) >= keep):
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- manifest
def journalled_images(records: list[dict]) -> dict[str, str]:
    """sha256 -> path of every image whose tiles the journalled shards hold."""
    out: dict[str, str] = {}
    for rec in records:
        out.update(rec.get("images", {}))
    return out


def split_summary(records: list[dict], split: str) -> tuple[dict, Counter, list[dict]]:
    shards, sources, skipped = [], Counter(), []
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
    write_json_atomic(split_dir / "sizes.json", {Path(s["path"]).name: s["samples"] for s in shards})


NO_MANIFEST = "no manifest (not a shard folder, or the build did not finish)"


def load_manifest(out: Path) -> dict:
    path = out / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {NO_MANIFEST}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc})") from None


class LocalTree:
    """A local shard folder: what :func:`verify` needs of it (``shard_tools.remote.RemoteTree``
    is the same for a bucket)."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def where(self, rel: str) -> str:
        return str(self.out / rel)

    def load_manifest(self) -> dict:
        return load_manifest(self.out)

    def size(self, rel: str) -> int | None:
        p = self.out / rel
        return p.stat().st_size if p.is_file() else None

    def sha256(self, rel: str) -> str:
        return sha256_file(self.out / rel)

    def names(self, folder: str) -> list[str]:
        d = self.out / folder
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def verify(out: str | Path) -> list[str]:
    """Re-hash every shard against the manifest, in a local folder or at a URL (``s3://...``).
    Returns one line per problem."""
    from shard_tools.remote import RemoteTree, is_remote

    tree = RemoteTree(str(out)) if is_remote(out) else LocalTree(Path(out))
    manifest = tree.load_manifest()
    problems = []
    for split, info in sorted(manifest.get("splits", {}).items()):
        listed = set()
        for s in info["shards"]:
            rel, where = s["path"], tree.where(s["path"])
            listed.add(Path(rel).name)
            size = tree.size(rel)
            if size is None:
                problems.append(f"{where}: missing")
                continue
            if size != s["bytes"]:
                problems.append(f"{where}: size {size} != manifest {s['bytes']}")
                continue
            digest = tree.sha256(rel)
            if digest != s["sha256"]:
                problems.append(f"{where}: sha256 {digest[:16]}... != manifest {s['sha256'][:16]}...")
        for name in tree.names(split):
            if SHARD_RE.match(name) and name not in listed:
                problems.append(f"{tree.where(f'{split}/{name}')}: shard not listed in the manifest")
        if sum(s["samples"] for s in info["shards"]) != info["samples"]:
            problems.append(f"{tree.where('manifest.json')}: split {split} sample count inconsistent")
    return problems


# ----------------------------------------------------------------------------------- merge
def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, dst)


def merge(out: Path, parts: list[Path]) -> dict:
    """Join the outputs of ``--num-jobs K --job-index I`` runs into one shard folder."""
    manifests = []
    for part in parts:
        if not part.is_dir():
            raise UserError(f"{part}: part folder not found")
        manifests.append((part, load_manifest(part)))
    ignored = NON_CONTENT_FIELDS + ("job_index",)  # may differ between the parts
    ref_cfg = {k: v for k, v in manifests[0][1]["config"].items() if k not in ignored}
    seen_jobs: dict[int, Path] = {}
    for part, m in manifests:
        cfg = {k: v for k, v in m["config"].items() if k not in ignored}
        if cfg != ref_cfg or m["encoding"] != manifests[0][1]["encoding"]:
            raise UserError(f"{part}: built with different settings than {manifests[0][0]}")
        j = m["config"]["job_index"]
        if j in seen_jobs:
            raise UserError(f"{part}: job index {j} already given by {seen_jobs[j]}")
        seen_jobs[j] = part
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create output folder ({exc.strerror or exc})") from None
    splits: dict[str, dict] = {}
    sources: dict[str, Counter] = {}
    skipped: list[dict] = []
    for part, m in sorted(manifests, key=lambda pm: pm[1]["config"]["job_index"]):
        for split, info in sorted(m["splits"].items()):
            dst_dir = out / split
            dst_dir.mkdir(exist_ok=True)
            entry = splits.setdefault(split, {"samples": 0, "shards": []})
            for s in info["shards"]:
                n = len(entry["shards"])
                dst = dst_dir / (SHARD_PATTERN % n)
                _link_or_copy(part / s["path"], dst)
                entry["shards"].append({**s, "path": f"{split}/{dst.name}"})
                entry["samples"] += s["samples"]
        for src, per in m["sources"].items():
            sources.setdefault(src, Counter()).update(per)
        skipped.extend(m["skipped"])
    for split, entry in splits.items():
        clean_split_dir(out / split, keep=len(entry["shards"]))
        write_sizes(out / split, entry["shards"])
    base = manifests[0][1]
    missing = sorted(set(range(base["config"]["num_jobs"])) - set(seen_jobs))
    manifest = {
        "format": FORMAT,
        "package_version": base["package_version"],
        "encoding": base["encoding"],
        "encoding_measurement": base.get("encoding_measurement"),
        "splits": splits,
        "sources": {k: dict(v) for k, v in sources.items()},
        "skipped": skipped,
        "config": {**base["config"], "out": str(out), "job_index": None},
        "merged_from": [str(p) for p, _ in manifests],
        "missing_jobs": missing,
    }
    write_json_atomic(out / "manifest.json", manifest)
    if missing:
        log.warning("merge: job index(es) %s not given; the result is incomplete", missing)
    return manifest
