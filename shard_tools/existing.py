"""What an output folder already holds, and whether a command may replace it.

No command of ``shard_tools`` replaces an existing output without ``--overwrite``, and none ever
writes into one of its inputs, even with it:

* ``build`` into a folder that holds *this* build (same settings and inputs: the split journals
  carry its fingerprints) skips or resumes it, as before. A folder holding anything else -- shards
  of another build, a merged or copied shard folder (no journal), other files -- is refused with
  one line; ``--overwrite`` removes what an earlier build or merge wrote there (manifest first)
  and builds. Files that are not the builder's are never removed.
* ``merge`` into a folder that is not empty is refused; ``--overwrite`` replaces it the same way.
* An output that is an input, or holds one (``merge``: or lies inside one), is refused always.

``build --out URL``: see :mod:`shard_tools.remote` (the bucket's manifest decides).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from restorer.errors import UserError
from shard_tools.layout import JOURNAL, MANIFEST, SHARD_RE, is_split_file
from shard_tools.writer import read_journal

log = logging.getLogger("shard_tools.existing")


def refusal(where: str | Path, what: str) -> UserError:
    """The one line of a refused replacement."""
    return UserError(f"{where}: {what}; add --overwrite to replace it, or choose another output")


def check_not_input(out: Path, inputs: Iterable[tuple[str, str | Path]], *, inside_input: bool = False) -> None:
    """Refuse an output that is one of ``inputs`` ((flag, path) pairs) or holds one; with
    ``inside_input``, also one that lies inside an input folder."""
    where = out.expanduser().resolve()
    for flag, path in inputs:
        given = Path(path).expanduser().resolve()
        if given == where or where in given.parents or (inside_input and given in where.parents):
            raise UserError(f"{out}: the output overlaps the input {flag} {path} (choose another output folder)")


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _split_conflict(split_dir: Path, expected: str | None) -> str | None:
    """Why ``split_dir`` is not this build's (None: it is this build's, or holds nothing yet)."""
    names = [p.name for p in split_dir.iterdir()]
    other = [n for n in names if not is_split_file(n) and not n.startswith(".")]
    if other:
        return f"holds other files ({split_dir.name}/{sorted(other)[0]}): not a shard folder"
    if not any(SHARD_RE.match(n) or n == JOURNAL for n in names):
        return None  # an empty split folder (a build killed as it started)
    journal = read_journal(split_dir)
    fingerprint = journal[0].get("fingerprint") if journal else None
    if fingerprint is None:
        return f"holds shards without a build journal in {split_dir.name}/ (a merged or copied shard folder)"
    if fingerprint != expected:
        return f"holds shards of another build ({split_dir.name}: other inputs or settings)"
    return None


def _manifest_splits(out: Path) -> list[str] | None:
    try:
        return list(json.loads((out / MANIFEST).read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_conflict(out: Path, expected: dict[str, str]) -> str | None:
    """Why building into ``out`` would replace something that is not this build (None: nothing
    would be). ``expected``: split -> the fingerprint this build's journal of it carries."""
    if not out.is_dir():
        return None
    for entry in _visible(out):
        if entry.name == MANIFEST:
            continue
        if not entry.is_dir():
            return f"holds other files ({entry.name}): not a shard folder"
        problem = _split_conflict(entry, expected.get(entry.name))
        if problem:
            return problem
    if (out / MANIFEST).exists():
        listed = _manifest_splits(out)
        if listed is None:
            return f"holds an unreadable {MANIFEST}"
        # this builder's manifest: a journal in each listed split that is still there (a split
        # folder removed since is rebuilt), and in one at least
        journals = [read_journal(out / split) for split in listed if (out / split).is_dir()]
        if not journals or not all(journals):
            return f"holds the {MANIFEST} of another build"
    return None


def clear(out: Path) -> None:
    """Remove what a build or merge wrote in ``out``, the manifest first (a reader never sees it
    over changing shards). Files that are not the builder's stay."""
    (out / MANIFEST).unlink(missing_ok=True)
    for entry in _visible(out):
        if entry.is_dir():
            for p in entry.iterdir():
                if is_split_file(p.name) and p.is_file():
                    p.unlink()


def check_build_output(out: Path, expected: dict[str, str], overwrite: bool) -> None:
    """Refuse (or with ``overwrite`` clear) an ``out`` that holds something other than this build."""
    problem = build_conflict(out, expected)
    if problem is None:
        return
    if not overwrite:
        raise refusal(out, problem)
    log.warning("%s: %s; replacing it (--overwrite)", out, problem)
    clear(out)


def check_merge_output(out: Path, overwrite: bool) -> None:
    """Refuse (or with ``overwrite`` clear) an ``out`` that exists and is not empty."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if not _visible(out):
        return
    what = "holds a shard folder" if (out / MANIFEST).exists() else "exists and is not empty"
    if not overwrite:
        raise refusal(out, what)
    log.warning("%s: %s; replacing it (--overwrite)", out, what)
    clear(out)
