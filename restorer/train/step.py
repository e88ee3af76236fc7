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
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch

from restorer.data.batch import to_device_float
from restorer.errors import AgreedError, UserError
from restorer.train.checkpoint import latest_checkpoint
from restorer.train.context import TrainContext
from restorer.train.losses import CHARBONNIER_EPS, LOSSES, pixel_loss  # noqa: F401 (step.LOSSES: the loss vocabulary)
from restorer.train.schedule import lr_at
from restorer.train.state import TrainState
from restorer.train.tracking import say


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one attempt gives the loop (its only way out: the loop adds it to its ``Window``)."""

    taken: bool  # False: skipped (non-finite)
    loss: float  # mean loss over processes and micro-batches (NaN when skipped)
    grad_norm: float  # before clipping (NaN when skipped)
    lr: float
    stop: bool  # a stop (SIGTERM/SIGUSR1) was requested on some process
    mse: float = float("nan")  # mean MSE whatever --loss is, for train/psnr (NaN when skipped)
    wait: float = 0.0  # seconds this process waited for the loader


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


def micro_batch_loss(ctx: TrainContext, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(the ``--loss`` of the forward of the degraded images against clean, its detached MSE for PSNR
    logging), in fp32, the forward under the Accelerator's autocast."""
    deg, clean, q = batch
    cfg, device = ctx.cfg, ctx.accelerator.device
    x = to_device_float(deg, device, ctx.channels_last)
    y = to_device_float(clean, device, ctx.channels_last)
    with ctx.accelerator.autocast():
        out = ctx.call_forward()(x, q.to(device) if cfg.model.condition_on_quality else None)
    value = pixel_loss(cfg.loss, out, y)
    mse = value.detach() if cfg.loss == "mse" else (out.detach().float() - y).square().mean()
    return value, mse


def optimizer_step(ctx: TrainContext) -> StepResult:
    """Attempt optimizer step ``ctx.state.step``; updates ``ctx.state``.

    ``ctx.model`` is the prepared (DDP) module, ``ctx.forward`` what to call it through (it or its
    compiled wrapper). Raises :class:`AgreedError` on every process after ``cfg.max_nonfinite``
    skipped steps in a row."""
    cfg, accelerator, state = ctx.cfg, ctx.accelerator, ctx.state
    lr = lr_at(
        state.step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps, min_ratio=cfg.min_lr_ratio
    )
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    loss_sum, mse_sum, wait = _accumulate(ctx)
    bad, stop, mean_loss, mean_mse = _agree_step(ctx, loss_sum, mse_sum)
    grad_norm = float("nan")
    if not bad:
        clip = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
        grad_norm = float(accelerator.clip_grad_norm_(ctx.model.parameters(), clip))
        # fp16: the loss scaler skips such steps itself
        bad = accelerator.mixed_precision != "fp16" and not math.isfinite(grad_norm)
    if bad:
        ctx.optimizer.zero_grad(set_to_none=True)
        _count_nonfinite(ctx)
        return StepResult(False, float("nan"), float("nan"), lr, stop, wait=wait)
    state.consecutive_bad = 0
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.ema is not None:
        ctx.ema.update(ctx.model)
    state.step += 1
    return StepResult(True, mean_loss, grad_norm, lr, stop, mse=mean_mse, wait=wait)


def _accumulate(ctx: TrainContext) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Forward and backward of ``cfg.grad_accum`` micro-batches (the gradient all-reduce with the
    last); (summed loss, summed MSE, seconds waited for the loader)."""
    cfg, accelerator = ctx.cfg, ctx.accelerator
    batches = ctx.next_batches()
    loss_sum = torch.zeros((), device=accelerator.device)
    mse_sum = torch.zeros((), device=accelerator.device)
    wait = 0.0
    for micro in range(cfg.grad_accum):
        t_wait = time.perf_counter()
        batch = take_batch(batches, ctx.state, ctx.batches_per_epoch)
        wait += time.perf_counter() - t_wait
        sync = nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(ctx.model)
        with sync:
            loss, mse = micro_batch_loss(ctx, batch)
            accelerator.backward(loss / cfg.grad_accum)
        loss_sum += loss.detach()
        mse_sum += mse
    return loss_sum, mse_sum, wait


def _agree_step(ctx: TrainContext, loss_sum: torch.Tensor, mse_sum: torch.Tensor) -> tuple[bool, bool, float, float]:
    """One small all-reduce per step: every process learns whether any loss was non-finite, the
    summed loss and MSE, and whether a stop was requested -- so all take the same branch. Returns
    (bad, stop, mean loss, mean MSE)."""
    accelerator = ctx.accelerator
    flags = torch.stack(
        [
            (~torch.isfinite(loss_sum)).float(),
            torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0),
            torch.tensor(float(ctx.stop.requested), device=accelerator.device),
            torch.nan_to_num(mse_sum, nan=0.0, posinf=0.0),
        ]
    )
    flags = accelerator.reduce(flags, reduction="sum")
    parts = accelerator.num_processes * ctx.cfg.grad_accum
    return float(flags[0]) > 0, float(flags[2]) > 0, float(flags[1]) / parts, float(flags[3]) / parts


def _count_nonfinite(ctx: TrainContext) -> None:
    state = ctx.state
    state.nonfinite_total += 1
    state.consecutive_bad += 1
    say(
        ctx.accelerator,
        f"step {state.step}: non-finite loss or gradient, step skipped ({state.consecutive_bad} in a "
        f"row, {state.nonfinite_total} in total)",
    )
    if state.consecutive_bad >= ctx.cfg.max_nonfinite:
        last = latest_checkpoint(ctx.ckpt_root)
        raise AgreedError(
            f"{state.consecutive_bad} non-finite losses in a row at step {state.step}: stopped; last "
            f"good checkpoint: {last or 'none'} (lower --lr, or check the data)"
        )
