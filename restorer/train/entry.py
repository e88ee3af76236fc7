"""The trainer's command line: parse flags into a :class:`TrainConfig`, run :func:`train`, and
report errors as one line each.

Error protocol with several processes: an error every process raises together
(:class:`AgreedError`) is printed once, by rank 0; any other one by each process that met it, as
``error: [rank R] ...`` (a :class:`PeerError` -- another process failed and says why -- prints
nothing). The failing process then exits at once: its peers may be blocked in a collective that
will never complete, and the launcher tears them down when it sees a process exit.
"""

from __future__ import annotations

import logging
import os
import sys

from restorer.config import parse_config
from restorer.errors import AgreedError, PeerError, UserError
from restorer.train.config import EXAMPLES, TrainConfig

PROG = "accelerate launch launch/train.py"


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    """Parse ``argv`` (defaults < ``--config`` YAML < flags) and train."""
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = parse_config(TrainConfig, argv, prog=PROG, description=description, epilog=EXAMPLES)
    except UserError as exc:  # from the command line alone: the same on every process
        raise AgreedError(str(exc)) from None
    from restorer.train.loop import train

    return train(cfg)


def run(argv: list[str] | None = None, description: str | None = None) -> int:
    """:func:`main` with the one-line error protocol (see the module doc); returns the exit code."""
    try:
        return main(argv, description)
    except UserError as exc:
        if os.environ.get("RESTORER_DEBUG"):
            raise
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if isinstance(exc, AgreedError):
            line = f"error: {exc}" if rank == 0 else None
        elif isinstance(exc, PeerError):
            line = None
        else:
            line = f"error: [rank {rank}] {exc}" if world > 1 else f"error: {exc}"
        if line:
            print(line, file=sys.stderr, flush=True)
        if world > 1:  # no atexit work (W&B, loader workers, the process group) that could wait on peers
            sys.stdout.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        return 130
