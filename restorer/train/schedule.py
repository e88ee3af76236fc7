"""Learning-rate schedule: linear warmup, then cosine decay to ``min_ratio * base_lr``.

The schedule is a pure function of the optimizer step (the number of optimizer updates done so
far), not an object that is stepped: with several processes or gradient accumulation nothing can
advance it twice, and a resumed run gets the right LR from the step it restores.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """LR for optimizer step ``step`` (0-based): ``base_lr * (step + 1) / warmup_steps`` during
    warmup, then a half cosine from ``base_lr`` at the end of warmup to ``min_ratio * base_lr`` at
    ``total_steps``; constant at the floor after that."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = base_lr * min_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
