"""The files of a shard folder, named once for the writer, the uploader, ``verify`` and ``merge``.

``OUT/manifest.json``, ``OUT/<split>/shard-NNNNNN.tar``, ``OUT/<split>/sizes.json`` and the build's
``OUT/<split>/.journal.jsonl``, plus the hidden temporary names they are written under. What is
not one of these files is not the builder's: no command removes or replaces it.
"""

from __future__ import annotations

import re

MANIFEST = "manifest.json"
SIZES = "sizes.json"
JOURNAL = ".journal.jsonl"
SHARD_PATTERN = "shard-%06d.tar"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
FORMAT = 1
NO_MANIFEST = "no manifest (not a shard folder, or the build did not finish)"

_TEMP_RE = re.compile(r"^\.(shard-\d{6}\.tar|sizes\.json|manifest\.json|\.journal\.jsonl)\.tmp(-\d+)?$")


def is_temporary(name: str) -> bool:
    """A hidden temporary file a killed build or merge may leave (``.shard-000003.tar.tmp``,
    ``.sizes.json.tmp-1234``)."""
    return bool(_TEMP_RE.match(name))


def is_split_file(name: str) -> bool:
    """A file the builder writes inside ``OUT/<split>/``."""
    return bool(SHARD_RE.match(name)) or name in (SIZES, JOURNAL) or is_temporary(name)
