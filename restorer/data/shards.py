"""Shard listing and reading: shard specs as users write them (a shards dir with manifest.json,
split folders with sizes.json, brace/``::``/``pipe:`` URL patterns) -> :class:`Shard` lists with
sample counts; and tar shards -> samples through webdataset's tar stages.

Every read -- shards, manifest.json, sizes.json, local or remote -- goes through
:mod:`restorer.data.urlio` (timeouts, bounded retries with Range resume; the ``RESTORER_*``
environment variables set them). How a shard read can end:

* :class:`~restorer.data.urlio.UrlNotFound` (no such file / object, HTTP 404): the shard is skipped
  and counted as ``missing_shards``;
* :class:`~restorer.data.urlio.UrlReadError` (retries spent, a stalled server, a failing or silent
  ``pipe:`` command) and any corrupt tar: skipped and counted as ``bad_shards``;
* :class:`~restorer.errors.UserError` (e.g. the package of a URL scheme is not installed): raised,
  the run stops with that one line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from restorer.data import urlio
from restorer.data.urlio import UrlNotFound, UrlReadError
from restorer.errors import UserError
from restorer.imagecore import TILE_ENCODINGS as IMAGE_EXTS  # the builder's tile encodings

log = logging.getLogger("restorer.data")

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# ------------------------------------------------------------------------------------ shard lists


@dataclasses.dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None  # None when no manifest/sizes.json gives the count


def _is_local(url: str) -> bool:
    return urlio.local_path(url) is not None


def _join(base: str, rel: str) -> str:
    return str(Path(base) / rel) if _is_local(base) else base.rstrip("/") + "/" + rel


def _key(url: str) -> str:
    """``url`` as the sizes.json lookup key: a local path in normal form, a remote URL as is."""
    path = urlio.local_path(url)
    return url if path is None else str(path)


def _parent(url: str) -> str:
    path = urlio.local_path(url)
    return url.rsplit("/", 1)[0] if path is None else str(path.parent)


def _read_listing(url: str) -> str | None:
    """The text of a manifest.json / sizes.json; None when it does not exist. Any other failure
    (after urlio's retries) stops with one line: every rank must plan from the same listing."""
    try:
        return urlio.read_text(url)
    except UrlNotFound:
        return None
    except UrlReadError as exc:
        raise UserError(f"{url}: cannot read: {exc.reason}") from None


def _from_manifest(base: str, text: str, splits: Sequence[str] | None) -> list[Shard]:
    where = _join(base, "manifest.json")
    try:
        manifest = json.loads(text)
        known = manifest["splits"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{where}: not a shard manifest (expected JSON with 'splits')") from None
    if manifest.get("format") != 1:
        raise UserError(f"{where}: manifest format {manifest.get('format')!r} is not supported (expected 1)")
    if splits is None:  # the spec as is: only a one-split manifest says which shards that is
        if len(known) != 1:
            raise UserError(f"{where}: has splits {', '.join(sorted(known)) or 'none'}: name the one to use")
        splits = list(known)
    shards = []
    for split in splits:
        if split not in known:
            raise UserError(f"{where}: no split {split!r} (has {', '.join(sorted(known)) or 'none'})")
        for entry in known[split]["shards"]:
            shards.append(Shard(_join(base, entry["path"]), int(entry["samples"])))
    return shards


def _sizes_for(urls: Sequence[str]) -> dict[str, int]:
    """Counts from the sizes.json next to the shards (the builder writes one per split dir), local
    or remote; ``pipe:`` URLs have none."""
    out: dict[str, int] = {}
    folders = dict.fromkeys(_parent(u) for u in urls if urlio.scheme(u) != "pipe")
    for folder in folders:
        where = _join(folder, "sizes.json")
        text = _read_listing(where)
        if text is None:
            continue
        try:
            for name, n in json.loads(text).items():
                out[_join(folder, name)] = int(n)
        except (ValueError, AttributeError, TypeError):
            log.warning("%s: unreadable, shard sizes unknown", where)
    return out


def _no_split(spec: str, split: str) -> UserError:
    return UserError(
        f"{spec}: has no {split!r} split (not a shards dir with a manifest.json or a {split}/ "
        f"folder); pass the {split} shards explicitly"
    )


def resolve_shards(spec: str, splits: Sequence[str] | None = ("train",)) -> tuple[list[Shard], int]:
    """Shards named by ``spec``, with sample counts where known; and how many listed local shards
    are missing (warned about here; counted as ``missing_shards`` when read). Raises UserError
    when nothing usable is named. Remote specs are listed from their manifest.json (a shards dir)
    or the sizes.json next to the shards (a pattern), never by listing the bucket.

    ``splits`` picks the splits of a shards dir (its manifest.json, else its ``<split>/`` folders).
    A spec without that structure (a folder of tars, a brace/``::``/``pipe:`` pattern, one tar)
    serves the ``train`` split only: asking it for any other split raises UserError, so that
    validation never reads training shards by accident. ``splits=None`` takes the spec as is: a
    pattern or a folder's ``*.tar`` as they are, a manifest's only split."""
    spec = str(spec).strip()
    if not spec:
        raise UserError("no shards given")
    if splits is not None:
        splits = list(splits)
        if not splits:
            raise UserError(f"{spec}: no split named")
    braces = "{" in spec or "::" in spec
    is_tar = spec.lower().endswith(TAR_SUFFIXES)
    if not braces and not is_tar and urlio.scheme(spec) != "pipe":
        root = urlio.local_path(spec)
        if root is None:  # remote shards dir: read its manifest
            where = _join(spec, "manifest.json")
            text = _read_listing(where)
            if text is None:
                raise UserError(f"{where}: no such object (a remote shards dir needs its manifest.json)")
            return _from_manifest(spec, text, splits), 0
        if not root.exists():
            raise UserError(f"{root}: no such shards directory or file")
        if root.is_dir():
            text = _read_listing(str(root / "manifest.json"))
            if text is not None:
                shards = _from_manifest(str(root), text, splits)
            else:  # a folder of split folders of tars, or (train split only) of tars
                shards = _from_folder(root, spec, splits)
            return _check_local(shards, spec)
    for split in splits or ():
        if split != "train":  # a pattern has no splits: it is the training data
            raise _no_split(spec, split)
    urls = wds.shardlists.expand_urls(spec)
    sizes = _sizes_for(urls)
    return _check_local([Shard(u, sizes.get(_key(u))) for u in urls], spec)


def _from_folder(root: Path, spec: str, splits: Sequence[str] | None) -> list[Shard]:
    """A local folder without manifest: ``<split>/*.tar`` per split; its own ``*.tar`` for the
    train split when it has no ``train/`` folder, or for ``splits=None``."""
    tars: list[Path] = []
    for split in splits if splits is not None else [None]:
        if split is not None and (root / split).is_dir():
            found = sorted((root / split).glob("*.tar"))
            if not found:
                raise UserError(f"{root / split}: no .tar shards")
        elif split is None or split == "train":
            found = sorted(root.glob("*.tar"))
            if not found:
                raise UserError(f"{root}: no manifest.json and no .tar shards")
        else:
            raise _no_split(spec, split)
        tars.extend(found)
    sizes = _sizes_for([str(p) for p in tars])
    return [Shard(str(p), sizes.get(str(p))) for p in tars]


def _check_local(shards: list[Shard], spec: str) -> tuple[list[Shard], int]:
    """Fail when no listed local shard exists. Missing ones are only warned about and counted:
    they stay in the list (and fail, counted, when read) so that the plan -- and so the batch
    count -- depends on the listing alone, never on what one node's file system shows."""
    present = [s for s in shards if (path := urlio.local_path(s.url)) is None or path.is_file()]
    missing = len(shards) - len(present)
    if not present:
        first = shards[0].url if shards else spec
        raise UserError(f"{spec}: none of the {len(shards)} shard file(s) exist (first: {first})")
    if missing:
        log.warning(
            "%s: %d of %d shard files missing (they will be skipped and counted as missing shards)",
            spec,
            missing,
            len(shards),
        )
    shards = [s for s in shards if s.samples != 0]
    if not shards:
        raise UserError(f"{spec}: every shard is empty")
    return shards, missing


# ------------------------------------------------------------------------------------ tar reading


def open_shard(url: str) -> IO[bytes]:
    """An open byte stream of one shard, through :func:`urlio.open_url` (local file, ``file://``,
    ``http(s)://``, ``pipe:``, any fsspec protocol), with the ``RESTORER_*`` read policy."""
    return urlio.open_url(url)


class ShardErrors:
    """webdataset's exception handler for the shard being read: keeps its first error and the
    counter it belongs to (``missing_shards`` for a file or object that does not exist,
    ``bad_shards`` for anything else), and skips the rest of the shard. A UserError (a setup
    problem such as a missing package) is raised: it stops the stream with its one line."""

    def __init__(self):
        self.error: str | None = None
        self.counter: str | None = None

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, UserError):
            raise UserError(str(exn.args[0]) if exn.args else str(exn)) from None
        if self.error is None:
            if isinstance(exn, UrlReadError):  # webdataset appends to its args: use the parts
                self.error = f"{exn.__class__.__name__}: {exn.reason}"
            else:
                self.error = f"{exn.__class__.__name__}: {exn.args[0] if exn.args else exn}"
            self.counter = "missing_shards" if isinstance(exn, UrlNotFound) else "bad_shards"
        return True

    def take(self) -> tuple[str | None, str | None]:
        """(counter, error) of the shard just read (both None if it read cleanly); then reset."""
        out = (self.counter, self.error)
        self.error = self.counter = None
        return out


def _opened(urls: Iterable[str], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset's ``url_opener`` with :func:`open_shard`: {"url", "stream"} per shard. A stream
    left early (the epoch had enough samples) is closed quietly; one read to the end is closed
    with its errors going to ``handler``."""
    for url in urls:
        try:
            stream = open_shard(url)
        except UserError:
            raise
        except Exception as exn:  # noqa: BLE001 (missing file, failing transport)
            if handler(exn):
                continue
            raise
        finished = False
        try:
            yield {"url": url, "stream": stream}
            finished = True
        finally:
            try:
                stream.close()
            except Exception as exn:  # noqa: BLE001
                if finished and not handler(exn):
                    raise


def tar_samples(urls: Iterable[str], handler: Callable[[Exception], bool]) -> Generator[dict, None, None]:
    """Samples ({"__key__", "__url__", ext: bytes}) of the tar shards ``urls``, read by webdataset's
    tar stages (``tar_file_expander`` + ``group_by_keys``, as ``wds.tarfile_to_samples`` does).
    ``handler(exn)`` sees every read error of a shard; returning True skips the rest of it."""
    return group_by_keys(tar_file_expander(_opened(urls, handler), handler=handler), handler=handler)


def image_of(sample: dict) -> tuple[str, bytes]:
    """The (extension, bytes) of the sample's image member (the builder's tile encodings)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    names = sorted(k for k in sample if not k.startswith("__"))
    raise ValueError(f"no image member (has {', '.join(names) or 'nothing'})")
