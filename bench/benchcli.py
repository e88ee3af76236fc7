"""The command line every ``bench/`` script shares.

Each script's module docstring says what it measures, gives examples (``examples:``) and names its
summary line (``The last line is ``name: value````); ``--help`` prints all of it, and parses no
further (nothing is measured). The summary line is the last thing a script prints, so that
``make bench`` logs and CI can pick it up with ``tail -1``.
"""

from __future__ import annotations

import argparse


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose description is the docstring's first paragraph and whose epilog
    is the rest of it (the examples and the summary line), kept as written."""
    head, _, rest = (doc or "").strip().partition("\n\n")
    return argparse.ArgumentParser(
        description=head, epilog=rest or None, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def summary(name: str, value: float | None, spec: str = ".2f", unit: str = "") -> str:
    """The ``name: value`` line (``nan`` when there is no value)."""
    return f"{name}: {'nan' if value is None else format(value, spec) + unit}"
