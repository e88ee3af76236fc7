"""User-facing errors: one clear line naming the file and the problem, never a traceback wall."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input or environment; its message is printed as one line."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-blank line of ``str(exc)`` (at most ``limit`` characters), or the
    exception's type name when it has no message: for one-line error reports."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__


def describe(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line`` (just ``Type`` when the exception has no message)."""
    name = type(exc).__name__
    line = first_line(exc, limit)
    return name if line == name else f"{name}: {line}"


def cli_entry(func: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI ``main``: a :class:`UserError` becomes ``error: <message>`` and exit code 2;
    Ctrl-C exits 130 quietly. Set RESTORER_DEBUG=1 to see the traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:

        try:
            return int(func(*args, **kwargs) or 0)
        except UserError as exc:
            if os.environ.get("RESTORER_DEBUG"):
                raise
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


class AgreedError(UserError):
    """An error every process raises together with the same text (decided after an all-reduce, or
    from the command line alone): ``launch/train.py`` prints it once, on rank 0."""


class PeerError(UserError):
    """This process stops because another one failed, and that one prints the reason:
    ``launch/train.py`` prints nothing for it."""
