"""The training losses ``--loss`` chooses from, defined once (restorer.train.config takes its choices
from ``LOSSES``; restorer.train.step computes them). No imports from the trainer: the config can
import it without a cycle."""

from __future__ import annotations

import torch

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
