"""Atomic file writes, shared by every writer in the project (weights, eval tables, restored
images, plots, configs, shard manifests and journals).

:func:`atomic_write` writes to a temporary name in the target's folder, fsyncs it, renames it over
the target (``os.replace``) and fsyncs the folder, so a reader (or a crash) sees the old file or
the new one, never half of one. The temporary file is removed on any failure, and an ``OSError``
becomes one :class:`~restorer.errors.UserError` line ``<path>: cannot write (<reason>)``.
:func:`jsonable` is the one rule for numbers JSON cannot hold (NaN -> null, infinities -> "inf").
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from restorer.errors import UserError


def jsonable(value: Any) -> Any:
    """A value for ``json.dumps`` in every JSON file the project writes: a 0-d tensor or numpy
    scalar as its Python number; NaN (no value: nothing measured) as null; +-inf as "inf" /
    "-inf" (JSON has neither, and the line stays parseable)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable; silently does nothing where folders can't be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_name(path: Path) -> Path:
    """The hidden temporary name used for ``path`` (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object], *, replace: bool = True) -> Path:
    """Call ``write_fn(tmp)`` to write the content to a temporary path, then move it to ``path``.

    ``replace=False`` never clobbers: the file is hard-linked into place, so a ``path`` that
    exists (or appears meanwhile) raises :class:`FileExistsError` and is left untouched (on
    filesystems without hard links, an existence check followed by a rename).
    Other ``OSError`` -> :class:`UserError`; errors raised by ``write_fn`` itself propagate.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) create 0600 files
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # filesystems without hard links
                if path.exists():
                    raise FileExistsError(17, "File exists", str(path)) from None
                os.replace(tmp, path)
    except FileExistsError:
        if replace:
            raise UserError(f"{path}: cannot write (file exists)") from None
        raise
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))
