"""Shards in object storage (``s3://``, ``gs://``, any fsspec URL): ``build --out URL`` and
``verify URL``.

A build to a URL runs the local build unchanged in a staging folder (``--stage-dir``, kept so an
interrupted build resumes; by default a temporary folder, removed at the end), then uploads.
The upload keeps what object stores allow of the local guarantees:

- each object is written whole (one PUT, or a multipart upload that appears only once complete);
- **the manifest is written last**: when anything is about to change, the old ``manifest.json``
  is deleted first, then the shards, then each ``<split>/sizes.json``, then the new manifest. A
  reader therefore sees either a manifest whose shards are all present and match it, or no
  manifest (a build in progress or one that failed: re-run it);
- a shard the remote manifest already lists with the same sha256 and byte count, and whose
  object has that size, is not uploaded again (so re-running the same command uploads nothing);
- remote shards that the new manifest does not list are deleted after it is written;
- a URL whose manifest belongs to another build is replaced only with ``--overwrite``: other
  content settings are refused before anything is built, other shards (e.g. changed inputs)
  before anything is uploaded. A URL without a manifest holds no finished output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from restorer.data import urlio
from restorer.errors import UserError, describe
from shard_tools.existing import refusal
from shard_tools.layout import MANIFEST, NO_MANIFEST, SHARD_RE, SIZES

log = logging.getLogger("shard_tools.remote")


def is_remote(out: str | os.PathLike) -> bool:
    """True for a URL other than a local path or ``file://``."""
    return urlio.local_path(os.fspath(out)) is None


def _join(url: str, rel: str) -> str:
    return url.rstrip("/") + "/" + rel


class RemoteTree:
    """A shard folder at ``url``: what :func:`shard_tools.verify.verify` needs of it."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = urlio.filesystem(self.url)
        self.fs.invalidate_cache()  # fsspec instances are shared: forget listings made before

    def where(self, rel: str) -> str:
        return _join(self.url, rel)

    def manifest_text(self) -> str | None:
        try:
            return urlio.read_text(self.where(MANIFEST))
        except urlio.UrlNotFound:
            return None
        except urlio.UrlReadError as exc:
            raise UserError(str(exc)) from None

    def manifest(self) -> dict | None:
        """The manifest, or None when there is none; UserError when it is unreadable."""
        text = self.manifest_text()
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise UserError(f"{self.where(MANIFEST)}: unreadable manifest ({exc})") from None

    def load_manifest(self) -> dict:
        manifest = self.manifest()
        if manifest is None:
            raise UserError(f"{self.where(MANIFEST)}: {NO_MANIFEST}")
        return manifest

    def size(self, rel: str) -> int | None:
        try:
            return int(self.fs.info(_join(self.root, rel))["size"])
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 (any transport error)
            raise UserError(f"{self.where(rel)}: cannot stat ({describe(exc)})") from None

    def sha256(self, rel: str) -> str:
        """Streams the object (with urlio's timeouts and retries)."""
        h = hashlib.sha256()
        try:
            with urlio.open_url(self.where(rel)) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except urlio.UrlReadError as exc:
            raise UserError(str(exc)) from None
        return h.hexdigest()

    def names(self, folder: str) -> list[str]:
        """Object names directly under ``folder`` (none when it does not exist)."""
        path = _join(self.root, folder)
        self.fs.invalidate_cache(path)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def put(self, local: Path, rel: str) -> None:
        try:
            self.fs.put_file(str(local), _join(self.root, rel))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{self.where(rel)}: cannot upload ({describe(exc)})") from None

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(_join(self.root, rel))
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{self.where(rel)}: cannot delete ({describe(exc)})") from None


def check_writable(url: str) -> None:
    """Fail at once, with one line, when the bucket/prefix cannot be written (no bucket, no
    credentials, no endpoint) -- before any image is decoded."""
    tree = RemoteTree(url)
    probe = f".write-test-{os.getpid()}"
    try:
        tree.fs.pipe_file(_join(tree.root, probe), b"")
        tree.fs.rm_file(_join(tree.root, probe))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{url}: output is not writable ({describe(exc)})") from None


@contextlib.contextmanager
def staging(url: str, stage_dir: str | None) -> Iterator[Path]:
    """The local folder the build of ``url`` is made in: ``stage_dir`` (kept), or a temporary
    folder removed on exit."""
    if stage_dir:
        path = Path(stage_dir).expanduser()
        log.info("building %s in %s (kept: re-running resumes from it)", url, path)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="restorer-shards-"))
    log.info("building %s in temporary folder %s", url, path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _shards(manifest: dict | None) -> dict[str, tuple[str, int]]:
    """path -> (sha256, bytes) of every shard a manifest lists."""
    splits = (manifest or {}).get("splits", {})
    return {s["path"]: (s["sha256"], s["bytes"]) for info in splits.values() for s in info["shards"]}


def check_replace(url: str, content: dict, overwrite: bool) -> None:
    """Before building for ``url``: refuse at once, unless ``overwrite``, when ``url`` holds the
    manifest of a build with other content settings (``content``: the build's, as its manifest's
    ``config`` records them) or one that cannot be read."""
    if overwrite:
        return
    tree = RemoteTree(url)
    text = tree.manifest_text()
    if text is None:
        return
    try:
        old = json.loads(text)["config"]
        same = {k: old.get(k) for k in content} == content
    except (ValueError, KeyError, TypeError, AttributeError):
        raise refusal(url, f"holds an unreadable {MANIFEST}") from None
    if not same:
        raise refusal(url, "holds the shards of a build with other settings")


def upload(local: Path, url: str, manifest: dict, overwrite: bool = False) -> dict:
    """Upload a finished local build (``local`` holds its manifest) to ``url``, manifest last
    (see the module doc). Without ``overwrite``, a ``url`` whose manifest lists other shards is
    refused before anything is written. Returns counts: uploaded, kept, deleted shards."""
    tree = RemoteTree(url)
    old_text = tree.manifest_text()
    try:
        old = json.loads(old_text) if old_text is not None else None
    except ValueError:
        old = {}  # unreadable
    old_shards = _shards(old)
    if old_text is not None and not overwrite and old_shards != _shards(manifest):
        raise refusal(url, "holds other shards (its manifest lists other inputs or settings)")
    todo, kept = [], 0
    for info in manifest["splits"].values():
        for s in info["shards"]:
            same = old_shards.get(s["path"]) == (s["sha256"], s["bytes"])
            if same and tree.size(s["path"]) == s["bytes"]:
                kept += 1
            else:
                todo.append(s["path"])
    changed = bool(todo) or old_text != (local / MANIFEST).read_text()
    if changed:
        if old_text is not None:
            tree.delete(MANIFEST)  # no reader may see the old manifest over changing shards
        for rel in todo:
            tree.put(local / rel, rel)
        for split in manifest["splits"]:
            tree.put(local / split / SIZES, f"{split}/{SIZES}")
        tree.put(local / MANIFEST, MANIFEST)
    deleted = 0
    for split, info in manifest["splits"].items():
        listed = {Path(s["path"]).name for s in info["shards"]}
        for name in tree.names(split):
            if SHARD_RE.match(name) and name not in listed:
                tree.delete(f"{split}/{name}")
                deleted += 1
    log.info(
        "%s: %d shard(s) uploaded, %d already there, %d stale deleted; manifest written last",
        url,
        len(todo),
        kept,
        deleted,
    )
    return {"uploaded": len(todo), "kept": kept, "deleted": deleted}
