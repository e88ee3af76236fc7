"""``python -m shard_tools merge OUT PART...``: join the outputs of ``build --num-jobs K --job-index I``.

Shards are hard-linked (or copied) into ``OUT`` and renumbered, manifests and ``sizes.json``
combined. ``OUT`` must be new or empty unless ``--overwrite`` (see :mod:`shard_tools.existing`);
the parts are only read, and an ``OUT`` that overlaps a part is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path

from restorer.errors import UserError
from shard_tools.config import NON_CONTENT_FIELDS
from shard_tools.existing import check_merge_output, check_not_input
from shard_tools.layout import FORMAT, MANIFEST, SHARD_PATTERN
from shard_tools.writer import clean_split_dir, load_manifest, write_json_atomic, write_sizes

log = logging.getLogger("shard_tools.merge")


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


def read_parts(parts: list[Path]) -> list[tuple[Path, dict]]:
    """Each part with its manifest; one line when a part is missing or was built differently."""
    manifests = []
    for part in parts:
        if not part.is_dir():
            raise UserError(f"{part}: part folder not found")
        manifests.append((part, load_manifest(part)))
    ignored = NON_CONTENT_FIELDS + ("job_index",)  # may differ between the parts
    ref_part, ref = manifests[0]
    ref_cfg = {k: v for k, v in ref["config"].items() if k not in ignored}
    seen_jobs: dict[int, Path] = {}
    for part, m in manifests:
        cfg = {k: v for k, v in m["config"].items() if k not in ignored}
        if cfg != ref_cfg or m["encoding"] != ref["encoding"]:
            raise UserError(f"{part}: built with different settings than {ref_part}")
        j = m["config"]["job_index"]
        if j in seen_jobs:
            raise UserError(f"{part}: job index {j} already given by {seen_jobs[j]}")
        seen_jobs[j] = part
    return sorted(manifests, key=lambda pm: pm[1]["config"]["job_index"])


def merge(out: Path, parts: list[Path], overwrite: bool = False) -> dict:
    """Join the outputs of ``--num-jobs K --job-index I`` runs into one shard folder."""
    check_not_input(out, [("part", p) for p in parts], inside_input=True)
    manifests = read_parts(parts)
    check_merge_output(out, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create output folder ({exc.strerror or exc})") from None
    splits: dict[str, dict] = {}
    sources: dict[str, Counter] = {}
    skipped: list[dict] = []
    for part, m in manifests:
        for split, info in sorted(m["splits"].items()):
            dst_dir = out / split
            dst_dir.mkdir(exist_ok=True)
            entry = splits.setdefault(split, {"samples": 0, "shards": []})
            for s in info["shards"]:
                dst = dst_dir / (SHARD_PATTERN % len(entry["shards"]))
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
    missing = sorted(set(range(base["config"]["num_jobs"])) - {m["config"]["job_index"] for _, m in manifests})
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
    write_json_atomic(out / MANIFEST, manifest)
    if missing:
        log.warning("merge: job index(es) %s not given; the result is incomplete", missing)
    return manifest
