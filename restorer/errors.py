"""User-facing errors: one clear line naming the file and the problem, never a traceback wall."""
from __future__ import annotations

import functools
import logging
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input or environment; its message is printed as one line."""


def cli_entry(func: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI ``main``: a :class:`UserError` becomes ``error: <message>`` and exit code 2;
    Ctrl-C exits 130 quietly. Set RESTORER_DEBUG=1 to see the traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        import os

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
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
