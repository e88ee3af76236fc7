"""The trainer's speed choices on this machine: precision, channels_last, torch.compile.

The rules live in :mod:`restorer.hardware`; this module applies them to a :class:`TrainConfig`
(``auto`` or an explicit setting, which always wins), says what was chosen and why, and compiles
the model with a fallback to eager mode that never crashes a run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from restorer.errors import UserError
from restorer.hardware import Choice, choose_channels_last, choose_compile, choose_precision, compile_or_eager
from restorer.train.context import TrainContext


@dataclasses.dataclass(frozen=True)
class SpeedChoices:
    precision: Choice  # "fp32" | "bf16" | "fp16" (restorer.hardware.PRECISIONS)
    channels_last: Choice  # bool
    compile: Choice  # bool: asked for; whether it worked is recorded separately

    def record(self) -> dict[str, dict]:
        """For run_info.json and the W&B config: each value with its reason."""
        return {name: getattr(self, name).as_dict() for name in ("precision", "channels_last", "compile")}

    def summary(self) -> str:
        return "; ".join(
            f"{name} {getattr(self, name).value} ({getattr(self, name).reason})"
            for name in ("precision", "channels_last", "compile")
        )


def training_device_type() -> str:
    """Where the Accelerator will train: CUDA when there is a GPU, else CPU (gloo DDP)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_speed(mixed_precision: str, channels_last: str, compile: str, device_type: str) -> SpeedChoices:
    """Resolve the three options for ``device_type``; fp16 on CPU is refused with one line."""
    device = torch.device(device_type)
    try:
        precision = choose_precision(mixed_precision, device)
        if precision.value == "fp16" and device.type == "cpu":
            raise UserError("--mixed-precision fp16 needs a GPU; use auto, bf16 or fp32 on CPU")
        return SpeedChoices(
            precision,
            choose_channels_last(channels_last, device, str(precision.value)),
            choose_compile(compile, device),
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None


def smoke_step(ctx: TrainContext) -> Callable[[Callable], None]:
    """A forward/backward on a batch of the training shape, without any gradient all-reduce (so a
    process whose compile fails cannot leave its peers waiting in a collective)."""
    cfg, model, accelerator = ctx.cfg, ctx.model, ctx.accelerator
    batch_size, patch_size, device = cfg.batch_size, cfg.data.patch_size, accelerator.device

    def smoke(net: Callable) -> None:
        x = torch.rand(batch_size, cfg.model.in_channels, patch_size, patch_size, device=device)
        if ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        q = torch.full((batch_size,), 50, dtype=torch.int64, device=device) if cfg.model.condition_on_quality else None
        no_sync = accelerator.no_sync(model) if hasattr(model, "no_sync") else nullcontext()
        with no_sync:
            with accelerator.autocast():
                out = net(x, q)
            F.mse_loss(out.float(), x).backward()

    return smoke


def compiled_forward(model, smoke: Callable[[Callable], None], wanted: bool) -> tuple[Callable, str | None]:
    """The callable to train with: ``torch.compile(model)`` when ``wanted`` and it compiles and runs
    (``restorer.hardware.compile_or_eager``: one warning line and eager mode otherwise), else
    ``model``. ``model`` itself (the prepared module) stays what is saved and exported, so
    state-dict keys never carry ``_orig_mod.``. Returns (forward, why it is eager or None)."""
    if not wanted:
        return model, None
    return compile_or_eager(model, smoke)
