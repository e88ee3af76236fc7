"""The objects one training run shares, as one typed object: :class:`TrainContext`.

``train()`` builds it once (``restorer.train.loop.start_run``); the step, validation, checkpoint
and logging functions take it instead of the dozen objects it holds. ``forward``, ``batches``,
``tracker`` and ``ledger`` may be left unset (tests): the model itself, ``iter(loader)`` on first
use, no logging, no ledger.

Fault injection (restorer.train.faults, ``RESTORER_FAULTS``) is ``faults``: None in every real run.
When set, :func:`with_faults` wraps the two hot-path objects it acts on once, at the start -- the
batch iterator (a slow rank sleeps before each batch) and the forward (a poisoned batch turns NaN)
-- so the optimizer step itself has no fault branch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from restorer.data.loader import TrainLoader
from restorer.train.config import TrainConfig
from restorer.train.datapos import Ledger
from restorer.train.ema import EMA, unwrap
from restorer.train.faults import Faults
from restorer.train.state import TrainState
from restorer.train.tracking import Tracker
from restorer.train.world import StopRequest


@dataclasses.dataclass
class TrainContext:
    """The objects one training run shares (see the module docstring)."""

    accelerator: Accelerator
    cfg: TrainConfig
    run_dir: Path  # resolved
    model: nn.Module  # the prepared (DDP) module: what is saved and exported
    ema: EMA | None
    optimizer: torch.optim.Optimizer  # prepared AdamW
    loader: TrainLoader  # this process's own (never prepared)
    channels_last: bool  # the speed choice the inputs follow
    state: TrainState = dataclasses.field(default_factory=TrainState)
    forward: Callable[..., torch.Tensor] | None = None  # what the step calls: model, compiled or fault-wrapped
    batches: Iterator[Any] | None = None  # iter(loader), endless (possibly fault-wrapped)
    tracker: Tracker | None = None  # set once run facts are written (start_tracking)
    ledger: Ledger | None = None  # --data-ledger
    faults: Faults | None = None  # RESTORER_FAULTS (tests only)
    stop: StopRequest = dataclasses.field(default_factory=StopRequest)  # no handlers unless listen()ed

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def batches_per_epoch(self) -> int:
        return int(self.loader.batches_per_epoch)

    def eval_net(self) -> nn.Module:
        """What validation and the exported weights use: the EMA model, else the plain model."""
        return self.ema.model if self.ema is not None else unwrap(self.model)

    def call_forward(self) -> Callable[..., torch.Tensor]:
        return self.forward if self.forward is not None else self.model

    def next_batches(self) -> Iterator[Any]:
        if self.batches is None:
            self.batches = iter(self.loader)  # endless: epoch after epoch (restorer.data's loader contract)
        return self.batches


def with_faults(ctx: TrainContext, faults: Faults | None) -> TrainContext:
    """``ctx`` with ``faults`` hooked into its batches and forward (``ctx`` itself when None or idle)."""
    if faults is None or not faults.active():
        return ctx
    rank = ctx.accelerator.process_index
    forward, batches, state = ctx.call_forward(), ctx.next_batches(), ctx.state
    return dataclasses.replace(
        ctx,
        faults=faults,
        forward=faults.wrap_forward(forward, lambda: state.step, rank),
        batches=faults.wrap_batches(batches, rank),
    )
