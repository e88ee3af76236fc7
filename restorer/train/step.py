"""One optimizer step: micro-batches with gradient accumulation, one all-reduce that makes every
process take the same branch, clipping, the update, EMA.

Guarantees: a step whose loss (on any process) or gradient norm is not finite is skipped on every
process (weights, optimizer and EMA untouched; the step number does not advance) and counted;
``max_nonfinite`` such steps in a row stop the run on every process with one line. The LR is a
function of the step (:func:`restorer.train.schedule.lr_at`), set before each attempt.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from restorer.errors import AgreedError, UserError
from restorer.train.checkpoint import latest_checkpoint
from restorer.train.schedule import lr_at
from restorer.train.state import TrainState, Window
from restorer.train.tracking import say


@dataclasses.dataclass(frozen=True)
class StepResult:
    taken: bool  # False: skipped (non-finite)
    loss: float  # mean loss over processes and micro-batches (NaN when skipped)
    grad_norm: float  # before clipping (NaN when skipped)
    lr: float
    stop: bool  # a stop (SIGTERM/SIGUSR1) was requested on some process


def take_batch(batches: Iterator, state: TrainState, batches_per_epoch: int) -> Any:
    """The next micro-batch of the (endless) loader; counts it in ``state.batches_taken``."""
    try:
        batch = next(batches)
    except StopIteration:  # the loader broke its contract; this rank only: the entry point names it
        raise UserError(
            f"data loader ended after {state.batches_taken} batches ({batches_per_epoch} batches per epoch)"
        ) from None
    state.batches_taken += 1
    return batch


LOSSES = ("mse", "l1", "charbonnier")
CHARBONNIER_EPS = 1e-3  # sqrt((x-y)^2 + eps^2): smooth L1 (1e-3 as in restoration papers, on [0, 1] pixels)


def pixel_loss(name: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss ``--loss`` names, in fp32: mse, l1 or charbonnier."""
    diff = out.float() - target
    if name == "mse":
        return diff.square().mean()
    if name == "l1":
        return diff.abs().mean()
    if name == "charbonnier":
        return (diff.square() + CHARBONNIER_EPS**2).sqrt().mean()
    raise ValueError(f"unknown loss {name!r} (one of {', '.join(LOSSES)})")


def micro_batch_loss(
    forward: Callable,
    batch,
    accelerator,
    *,
    channels_last: bool,
    condition_on_quality: bool,
    loss: str = "mse",
    poison: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the ``loss`` of ``forward(degraded)`` against clean, its detached MSE for PSNR logging), in
    fp32, the forward under the Accelerator's autocast."""
    from restorer.data import to_device_float

    deg, clean, q = batch
    device = accelerator.device
    x = to_device_float(deg, device, channels_last)
    y = to_device_float(clean, device, channels_last)
    if poison:
        x = x * float("nan")
    with accelerator.autocast():
        out = forward(x, q.to(device) if condition_on_quality else None)
    value = pixel_loss(loss, out, y)
    mse = value.detach() if loss == "mse" else (out.detach().float() - y).square().mean()
    return value, mse


def optimizer_step(
    *,
    model,
    forward: Callable,
    optimizer,
    accelerator,
    ema,
    batches: Iterator,
    state: TrainState,
    cfg,
    batches_per_epoch: int,
    channels_last: bool,
    stop_requested: bool,
    faults,
    window: Window,
    ckpt_root: Path,
) -> StepResult:
    """Attempt optimizer step ``state.step``; updates ``state`` and ``window``.

    ``model`` is the prepared (DDP) module, ``forward`` what to call it through (it or its compiled
    wrapper). Raises :class:`AgreedError` on every process after ``cfg.max_nonfinite`` skipped
    steps in a row."""
    device, rank = accelerator.device, accelerator.process_index
    lr = lr_at(
        state.step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps, min_ratio=cfg.min_lr_ratio
    )
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    mse_sum = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        t_wait = time.perf_counter()
        batch = take_batch(batches, state, batches_per_epoch)
        faults.maybe_sleep(rank)
        window.wait += time.perf_counter() - t_wait
        sync = nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(model)
        with sync:
            loss, mse = micro_batch_loss(
                forward,
                batch,
                accelerator,
                channels_last=channels_last,
                condition_on_quality=cfg.model.condition_on_quality,
                loss=cfg.loss,
                poison=faults.poison_batch(state.step, rank),
            )
            accelerator.backward(loss / cfg.grad_accum)
        loss_sum += loss.detach()
        mse_sum += mse
    # one small all-reduce per step: every process learns whether any loss was non-finite, the
    # summed loss, and whether a stop was requested -- so all take the same branch
    flags = torch.stack(
        [
            (~torch.isfinite(loss_sum)).float(),
            torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0),
            torch.tensor(float(stop_requested), device=device),
            torch.nan_to_num(mse_sum, nan=0.0, posinf=0.0),
        ]
    )
    flags = accelerator.reduce(flags, reduction="sum")
    bad, stop = float(flags[0]) > 0, float(flags[2]) > 0
    mean_loss = float(flags[1]) / (accelerator.num_processes * cfg.grad_accum)
    mean_mse = float(flags[3]) / (accelerator.num_processes * cfg.grad_accum)
    grad_norm = float("nan")
    if not bad:
        grad_norm = float(
            accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        )
        # fp16: the loss scaler skips such steps itself
        bad = accelerator.mixed_precision != "fp16" and not math.isfinite(grad_norm)
    if bad:
        optimizer.zero_grad(set_to_none=True)
        _count_nonfinite(state, accelerator, cfg.max_nonfinite, ckpt_root)
        return StepResult(False, float("nan"), float("nan"), lr, stop)
    state.consecutive_bad = 0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model)
    state.step += 1
    faults.after_step(state.step, accelerator.is_main_process, rank)
    window.add_step(mean_loss, grad_norm, mean_mse)
    return StepResult(True, mean_loss, grad_norm, lr, stop)


def _count_nonfinite(state: TrainState, accelerator, max_nonfinite: int, ckpt_root: Path | None) -> None:
    state.nonfinite_total += 1
    state.consecutive_bad += 1
    say(
        accelerator,
        f"step {state.step}: non-finite loss or gradient, step skipped ({state.consecutive_bad} in a "
        f"row, {state.nonfinite_total} in total)",
    )
    if state.consecutive_bad >= max_nonfinite:
        last = latest_checkpoint(ckpt_root) if ckpt_root is not None else None
        raise AgreedError(
            f"{state.consecutive_bad} non-finite losses in a row at step {state.step}: stopped; last "
            f"good checkpoint: {last or 'none'} (lower --lr, or check the data)"
        )
