"""``python -m shard_tools verify DIR|URL``: re-hash every shard against the manifest.

Reads only: nothing in the folder or bucket is written, moved or removed.
"""

from __future__ import annotations

from pathlib import Path

from shard_tools.layout import MANIFEST, SHARD_RE
from shard_tools.remote import RemoteTree, is_remote
from shard_tools.writer import load_manifest, sha256_file


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
            problems.append(f"{tree.where(MANIFEST)}: split {split} sample count inconsistent")
    return problems
