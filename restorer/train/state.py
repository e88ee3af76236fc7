"""What the trainer counts: :class:`TrainState` (saved in every checkpoint) and :class:`Window`
(the figures of one logging interval).

The data epoch is not counted here: the loader knows it (``loader.epoch``) and its position
(``loader.position()``, restorer.data.position), which every checkpoint stores
(restorer.train.datapos); a resumed run continues the epoch exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from restorer.train.step import StepResult


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    batches_taken: int = 0  # micro-batches taken from the loader by this process since it started
    nonfinite_total: int = 0  # skipped steps, over the whole run
    consecutive_bad: int = 0  # skipped steps in a row, now
    wandb_id: str | None = None  # the W&B run a resumed run continues
    last_val: dict[str, float] = dataclasses.field(default_factory=dict)  # the latest validation figures
    saved: dict[str, Any] = dataclasses.field(default_factory=dict)  # the train_state.json resumed from

    def to_checkpoint(self, data: dict[str, Any], *, world_size: int, global_batch: int, seed: int) -> dict[str, Any]:
        """The ``train_state.json`` of a checkpoint (its ``step`` is added by the saver); ``data``:
        the data position's entries (``datapos.checkpoint_data``)."""
        return {
            **data,
            "nonfinite_total": self.nonfinite_total,
            "world_size": world_size,
            "global_batch": global_batch,
            "seed": seed,
            "wandb_id": self.wandb_id,
            "val": self.last_val,
        }

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        """The state to continue from (the data position is restored by ``datapos.start_data``)."""
        return cls(
            step=int(saved["step"]),
            nonfinite_total=int(saved.get("nonfinite_total", 0)),
            wandb_id=saved.get("wandb_id"),
            last_val=dict(saved.get("val") or {}),
            saved=dict(saved),
        )


@dataclasses.dataclass
class Window:
    """Sums over the optimizer steps of one logging interval. Time spent in validation and
    checkpoints (``pause``) is left out of the speed figures."""

    t0: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    loss: float = 0.0
    mse: float = 0.0  # the MSE whatever --loss is, for train/psnr
    grad_norm: float = 0.0
    wait: float = 0.0  # seconds waiting for the loader
    pause: float = 0.0  # seconds of validation and checkpointing

    def add(self, result: StepResult) -> None:
        """Count one attempted step (a ``restorer.train.step.StepResult``): its wait for the loader
        always, its figures when it was taken."""
        self.wait += result.wait
        if result.taken:
            self.add_step(result.loss, result.grad_norm, result.mse)

    def add_step(self, loss: float, grad_norm: float, mse: float | None = None) -> None:
        self.steps += 1
        self.loss += loss
        self.mse += loss if mse is None else mse
        self.grad_norm += grad_norm

    def figures(self, patches_per_step: int) -> dict[str, float]:
        """Mean loss, PSNR of the mean MSE, mean gradient norm, patches/s and the data-wait fraction."""
        elapsed = max(time.perf_counter() - self.t0 - self.pause, 1e-9)
        mean_loss = self.loss / max(self.steps, 1)
        mean_mse = self.mse / max(self.steps, 1)
        return {
            "train/loss": mean_loss,
            "train/psnr": 10 * math.log10(1.0 / max(mean_mse, 1e-12)),
            "train/grad_norm": self.grad_norm / max(self.steps, 1),
            "perf/patches_per_s": patches_per_step * self.steps / elapsed,
            "perf/data_wait_frac": self.wait / elapsed,
        }
