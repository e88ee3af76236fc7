"""Exponential moving average of a model's weights, used for validation and exported weights.

The average lives in a full fp32 copy of the (unwrapped) model, so it can be evaluated directly.
Every process keeps its own copy: DDP keeps the weights identical on all ranks, so the copies stay
identical too, and distributed validation needs no broadcast. The state is a flat dict of tensors,
saved with safetensors (never pickled).
"""

from __future__ import annotations

import copy
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from restorer.modelfile import unwrap  # noqa: F401  (re-exported: the trainer imports it from here)


class EMA:
    """``ema = decay_t * ema + (1 - decay_t) * weights`` after every optimizer step, with
    ``decay_t = min(decay, (1 + t) / (10 + t))`` so that the average is not dominated by the random
    initial weights early on (t = number of updates so far)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(unwrap(model)).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        src = unwrap(model)
        ema_p: list[torch.Tensor] = list(self.model.parameters())
        new_p = [p.detach().float() for p in src.parameters()]
        torch._foreach_lerp_(ema_p, new_p, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), src.buffers()):
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        state["updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.updates = int(state["updates"])
        weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        self.model.load_state_dict(weights, strict=True)

    def save(self, path: str | os.PathLike) -> None:
        save_file(self.state_dict(), str(path))

    def load(self, path: str | os.PathLike) -> None:
        device = next(self.model.parameters()).device
        self.load_state_dict(load_file(str(path), device=str(device)))
