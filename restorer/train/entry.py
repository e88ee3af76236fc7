"""The trainer's command line: parse flags into a :class:`TrainConfig`, run :func:`train`, and
report errors as one line each.

Error protocol with several processes: an error every process raises together
(:class:`AgreedError`) is printed once, by rank 0; any other one by each process that met it, as
``error: [rank R] ...`` (a :class:`PeerError` -- another process failed and says why -- prints
nothing). The failing process then exits at once: its peers may be blocked in a collective that
will never complete, and the launcher tears them down when it sees a process exit. A collective
that fails because a peer died or froze (past ``--dist-timeout``) is one such line too, naming what
this process waited for (:func:`restorer.train.world.lost_peer`).

Under torchrun each process is tied to its launcher first (:func:`restorer.train.world.tie_to_launcher`):
it stops at the next step when the launcher dies.
"""

from __future__ import annotations

import logging
import os
import sys

from restorer.config import parse_config
from restorer.errors import AgreedError, PeerError, UserError
from restorer.train.config import EXAMPLES, TrainConfig
from restorer.train.loop import train
from restorer.train.world import lone_cpu_launch, lost_peer, tie_to_launcher

PROG = "accelerate launch launch/train.py"


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    """Parse ``argv`` (defaults < ``--config`` YAML < flags) and train."""
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = parse_config(TrainConfig, argv, prog=PROG, description=description, epilog=EXAMPLES)
    except UserError as exc:  # from the command line alone: the same on every process
        raise AgreedError(str(exc)) from None
    refusal = lone_cpu_launch()
    if refusal:
        raise AgreedError(refusal)
    return train(cfg)


def run(argv: list[str] | None = None, description: str | None = None) -> int:
    """:func:`main` with the one-line error protocol (see the module doc); returns the exit code."""
    tie_to_launcher()
    debug = bool(os.environ.get("RESTORER_DEBUG"))
    try:
        code = main(argv, description)
    except RuntimeError as exc:  # a collective that failed because a peer died or froze: one line
        line = None if debug else lost_peer(exc)
        if line is None:
            raise
        return _fail(UserError(line))
    except UserError as exc:
        if debug:
            raise
        return _fail(exc)
    except KeyboardInterrupt:
        return 130
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # everything is written: skip the interpreter's teardown
        _exit_now(code)  # (measured: 7-10 s per process on a loaded 2-core machine)
    return code


def _fail(exc: UserError) -> int:
    """Print ``exc`` by the protocol of the module doc; with several processes, exit at once."""
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
        _exit_now(2)
    return 2


def _exit_now(code: int) -> None:
    """Exit without atexit handlers and the interpreter's teardown, output flushed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
