"""Shard listing and reading: shard specs as users write them (a shards dir with manifest.json,
split folders with sizes.json, brace/``::``/``pipe:`` URL patterns) -> :class:`Shard` lists with
sample counts; and tar shards -> samples through webdataset's tar stages, over local files,
webdataset's ``pipe:``/curl handlers or fsspec.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import urllib.request
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Optional, Sequence

from restorer.errors import UserError
from restorer.imagecore import TILE_ENCODINGS as IMAGE_EXTS  # the builder's tile encodings

log = logging.getLogger("restorer.data")

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# ------------------------------------------------------------------------------------ shard lists

@dataclasses.dataclass(frozen=True)
class Shard:
    url: str
    samples: Optional[int]  # None when no manifest/sizes.json gives the count


def _scheme(url: str) -> str:
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", url)
    # one letter before ':' is a Windows drive, not a scheme
    return m.group(1).lower() if m and len(m.group(1)) > 1 else ""


def _is_local(url: str) -> bool:
    return _scheme(url) in ("", "file")


def _local_path(url: str) -> Path:
    return Path(re.sub(r"^file://?", "/", url) if url.startswith("file:") else url)


def _read_text(url: str) -> str:
    if _is_local(url):
        return _local_path(url).read_text()
    if _scheme(url) in ("http", "https"):
        with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (user-given shard URL)
            return resp.read().decode()
    import fsspec

    with fsspec.open(url, "rt") as f:
        return f.read()


def _join(base: str, rel: str) -> str:
    return str(Path(base) / rel) if _is_local(base) else base.rstrip("/") + "/" + rel


def _from_manifest(base: str, text: str, splits: Optional[Sequence[str]]) -> list[Shard]:
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


def _sizes_for(paths: Sequence[Path]) -> dict[Path, int]:
    """Counts from the sizes.json next to local shards (the builder writes one per split dir)."""
    out: dict[Path, int] = {}
    for folder in {p.parent for p in paths}:
        sizes = folder / "sizes.json"
        if sizes.is_file():
            try:
                for name, n in json.loads(sizes.read_text()).items():
                    out[folder / name] = int(n)
            except (ValueError, AttributeError, TypeError):
                log.warning("%s: unreadable, shard sizes unknown", sizes)
    return out


def _no_split(spec: str, split: str) -> UserError:
    return UserError(f"{spec}: has no {split!r} split (not a shards dir with a manifest.json or a {split}/ "
                     f"folder); pass the {split} shards explicitly")


def resolve_shards(spec: str, splits: Optional[Sequence[str]] = ("train",)) -> tuple[list[Shard], int]:
    """Shards named by ``spec``, with sample counts where known; and how many listed local shards
    are missing (skipped with a warning). Raises UserError when nothing usable is named.

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
    if not braces and not is_tar and _scheme(spec) != "pipe":
        if _is_local(spec):
            root = _local_path(spec)
            if not root.exists():
                raise UserError(f"{root}: no such shards directory or file")
            if root.is_dir():
                if (root / "manifest.json").is_file():
                    shards = _from_manifest(str(root), (root / "manifest.json").read_text(), splits)
                else:  # a folder of split folders of tars, or (train split only) of tars
                    shards = _from_folder(root, spec, splits)
                return _check_local(shards, spec)
        else:  # remote shards dir: read its manifest
            try:
                text = _read_text(_join(spec, "manifest.json"))
            except Exception as exc:  # noqa: BLE001 (any transport error)
                raise UserError(f"{_join(spec, 'manifest.json')}: cannot read ({exc})") from None
            return _from_manifest(spec, text, splits), 0
    for split in splits or ():
        if split != "train":  # a pattern has no splits: it is the training data
            raise _no_split(spec, split)
    import webdataset as wds

    urls = wds.shardlists.expand_urls(spec)
    local = [_local_path(u) for u in urls if _is_local(u)]
    sizes = _sizes_for(local)
    shards = [Shard(u, sizes.get(_local_path(u)) if _is_local(u) else None) for u in urls]
    return _check_local(shards, spec)


def _from_folder(root: Path, spec: str, splits: Optional[Sequence[str]]) -> list[Shard]:
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
    sizes = _sizes_for(tars)
    return [Shard(str(p), sizes.get(p)) for p in tars]


def _check_local(shards: list[Shard], spec: str) -> tuple[list[Shard], int]:
    """Fail when no listed local shard exists. Missing ones are only warned about and counted:
    they stay in the list (and fail, counted, when read) so that the plan -- and so the batch
    count -- depends on the listing alone, never on what one node's file system shows."""
    present = [s for s in shards if not _is_local(s.url) or _local_path(s.url).is_file()]
    missing = len(shards) - len(present)
    if not present:
        first = shards[0].url if shards else spec
        raise UserError(f"{spec}: none of the {len(shards)} shard file(s) exist (first: {first})")
    if missing:
        log.warning("%s: %d of %d shard files missing (they will be skipped and counted as bad shards)",
                    spec, missing, len(shards))
    shards = [s for s in shards if s.samples != 0]
    if not shards:
        raise UserError(f"{spec}: every shard is empty")
    return shards, missing


# ------------------------------------------------------------------------------------ tar reading

def open_shard(url: str) -> IO[bytes]:
    """An open byte stream of one shard: a local file, webdataset's ``pipe:``/curl handlers, or
    fsspec for other schemes (s3://, gs:// with gcsfs, ...)."""
    scheme = _scheme(url)
    if scheme in ("", "file"):
        return open(_local_path(url), "rb")  # noqa: SIM115 (closed by the reader)
    from webdataset.gopen import gopen, gopen_schemes

    if scheme in gopen_schemes:
        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def _opened(urls: Iterable[str], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset's ``url_opener`` with :func:`open_shard`: {"url", "stream"} per shard. A stream
    left early (the epoch had enough samples) is closed quietly; one read to the end is closed
    with its errors going to ``handler`` (e.g. a ``pipe:`` command that failed)."""
    for url in urls:
        try:
            stream = open_shard(url)
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


def tar_samples(urls: Iterable[str], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Samples ({"__key__", "__url__", ext: bytes}) of the tar shards ``urls``, read by webdataset's
    tar stages (``tar_file_expander`` + ``group_by_keys``, as ``wds.tarfile_to_samples`` does).
    ``handler(exn)`` sees every read error of a shard; returning True skips the rest of it."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return group_by_keys(tar_file_expander(_opened(urls, handler), handler=handler), handler=handler)


def image_of(sample: dict) -> tuple[str, bytes]:
    """The (extension, bytes) of the sample's image member (the builder's tile encodings)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    names = sorted(k for k in sample if not k.startswith("__"))
    raise ValueError(f"no image member (has {', '.join(names) or 'nothing'})")
