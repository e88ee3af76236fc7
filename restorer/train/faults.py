"""Fault-injection hooks for the reliability tests, off unless ``RESTORER_FAULTS`` is set.

``RESTORER_FAULTS`` is a comma-separated list of:

``nan@S``            rank 0's batch at optimizer step S is NaN, once (the step must be skipped)
``nan@S+``           rank 0's batches are NaN at every attempt from step S on (training must stop
                     after ``--max-nonfinite`` in a row)
``kill_in_save@S``   the main process SIGKILLs itself while writing the checkpoint of step S, after
                     Accelerate's files are in the temporary directory and before it is complete
``enospc_in_save@S`` writing the checkpoint of step S fails with ENOSPC ("No space left on
                     device") after part of a file is written, as a full disk would
``slow_rank@R:SEC``  rank R sleeps SEC seconds before each training batch and validation pass
``vanish@S:PATH``    the main process deletes the file PATH after optimizer step S (a shard that
                     disappears mid-run: the loader must skip it, count it and go on)
``fail@S:R``         rank R alone raises a UserError after optimizer step S (an error only one
                     process meets: it must print its line and exit, not leave the others blocked)

They exist so that tests exercise the real code paths (the real save, the real skip logic) rather
than mocks; a user never needs them. A run without them has no fault object at all
(``restorer.train.context.with_faults`` hooks an active one into the batches and the forward once).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from restorer.errors import UserError

ENV = "RESTORER_FAULTS"


@dataclasses.dataclass
class Faults:
    nan_step: int | None = None
    nan_forever: bool = False
    kill_in_save: int | None = None
    enospc_in_save: int | None = None
    slow_rank: int | None = None
    slow_seconds: float = 0.0
    vanish_step: int | None = None
    vanish_path: str | None = None
    fail_step: int | None = None
    fail_rank: int | None = None
    _nan_done: bool = False

    @classmethod
    def from_env(cls, text: str | None = None) -> Faults:
        text = os.environ.get(ENV, "") if text is None else text
        faults = cls()
        for item in filter(None, (t.strip() for t in text.split(","))):
            name, _, arg = item.partition("@")
            try:
                if name == "nan":
                    faults.nan_forever = arg.endswith("+")
                    faults.nan_step = int(arg.rstrip("+"))
                elif name == "kill_in_save":
                    faults.kill_in_save = int(arg)
                elif name == "enospc_in_save":
                    faults.enospc_in_save = int(arg)
                elif name == "slow_rank":
                    rank, _, sec = arg.partition(":")
                    faults.slow_rank, faults.slow_seconds = int(rank), float(sec)
                elif name == "vanish":
                    step, _, path = arg.partition(":")
                    faults.vanish_step, faults.vanish_path = int(step), path
                elif name == "fail":
                    step, _, rank = arg.partition(":")
                    faults.fail_step, faults.fail_rank = int(step), int(rank)
                else:
                    raise ValueError(name)
            except ValueError:
                raise UserError(f"{ENV}: cannot parse {item!r} (see restorer/train/faults.py)") from None
        return faults

    def active(self) -> bool:
        """Whether any fault is asked for."""
        return self != Faults()

    def wrap_batches(self, batches: Iterator, rank: int) -> Iterator:
        """``batches``, with this rank sleeping before each one when it is the slow rank."""
        if self.slow_rank != rank or self.slow_seconds <= 0:
            return batches
        return self._slow(batches, rank)

    def _slow(self, batches: Iterator, rank: int) -> Iterator:
        while True:
            self.maybe_sleep(rank)
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch

    def wrap_forward(self, forward: Callable, step: Callable[[], int], rank: int) -> Callable:
        """``forward``, with its input made NaN when :meth:`poison_batch` says so (``step()``: the
        optimizer step being attempted)."""
        if self.nan_step is None or rank != 0:
            return forward

        def poisoned(x, q):
            if self.poison_batch(step(), rank):
                x = x * float("nan")
            return forward(x, q)

        return poisoned

    def poison_batch(self, step: int, rank: int) -> bool:
        """True when this rank's batch at this optimizer step must be made NaN."""
        if self.nan_step is None or rank != 0 or step < self.nan_step:
            return False
        if self.nan_forever:
            return True
        if step == self.nan_step and not self._nan_done:
            self._nan_done = True
            return True
        return False

    def maybe_sleep(self, rank: int) -> None:
        if self.slow_rank == rank and self.slow_seconds > 0:
            time.sleep(self.slow_seconds)

    def after_step(self, step: int, is_main: bool, rank: int = 0) -> None:
        if is_main and self.vanish_step == step and self.vanish_path:
            Path(self.vanish_path).unlink(missing_ok=True)
        if self.fail_step == step and self.fail_rank == rank:
            raise UserError(f"injected failure after step {step} ({ENV})")

    def after_accelerate_save(self, step: int, tmp_dir: Path, is_main: bool) -> None:
        """Called once Accelerate's files are written into the temporary checkpoint directory."""
        if self.kill_in_save == step and is_main:
            (tmp_dir / "partial.bin").write_bytes(b"\0" * 4096)  # a file cut short by the kill
            os.kill(os.getpid(), signal.SIGKILL)

    @contextmanager
    def during_save(self, step: int, tmp_dir: Path, is_main: bool) -> Iterator[None]:
        """While Accelerate writes the checkpoint: make ``torch.save`` hit a full disk if asked."""
        if self.enospc_in_save != step or not is_main:
            yield
            return
        real_save = torch.save

        def full_disk_save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and Path(f).parent == tmp_dir:
                with open(f, "wb") as fh:
                    fh.write(b"\0" * 1024)  # what fitted before the disk filled up
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return real_save(obj, f, *args, **kwargs)

        torch.save = full_disk_save
        try:
            yield
        finally:
            torch.save = real_save
