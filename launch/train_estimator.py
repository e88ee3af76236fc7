#!/usr/bin/env python
"""Train the effective-quality estimator (restorer/estimator.py) on the training stream.

The patches come from the same stream as the restoration models' (``restorer.data``: shards ->
crops -> single saves and real-world chains, labelled with each chain's effective quality), so the
estimator learns the label the models are told. The stream options and their defaults are the
trainer's (``StreamConfig``); the release recipe sets the estimator's (chains on, 104 px patches). One process (the net is ~60k parameters); each
patch is cut at a random 0-7 px offset first, so that the estimator does not rely on the 8x8 grid
starting at its crop's corner (a screenshot or a cropped re-save moves it). L1 loss on quality/100,
AdamW, cosine LR. Writes ``RUN/estimator.safetensors`` (weights + facts) and ``RUN/log.jsonl``.

  .venv/bin/python launch/train_estimator.py --config launch/configs/release_estimator.yaml
  .venv/bin/python launch/train_estimator.py --shards data/bsr --steps 200 --run-dir runs/est_try

The packaged estimator (restorer/weights/estimator.safetensors) is this script's output with
``launch/configs/release_estimator.yaml``, copied there by ``make release-estimator``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from restorer.config import dump_config, parse_config
from restorer.data import StreamConfig, make_train_loader
from restorer.errors import UserError, cli_entry
from restorer.estimator import QualityNet, save_estimator


@dataclasses.dataclass
class EstimatorConfig:
    data: StreamConfig = dataclasses.field(
        default_factory=StreamConfig, metadata={"flatten": True, "rename": {"splits": "train_splits"}}
    )
    width: int = dataclasses.field(default=24, metadata={"help": "channels of the first convs (the net: 2x later)"})
    steps: int = dataclasses.field(default=3000, metadata={"help": "optimizer steps"})
    batch_size: int = dataclasses.field(default=32, metadata={"help": "patches per step"})
    lr: float = dataclasses.field(default=2e-3, metadata={"help": "peak learning rate (cosine to 5%)"})
    num_workers: int = dataclasses.field(default=1, metadata={"help": "loader worker processes"})
    cache_patches: int = dataclasses.field(
        default=0,
        metadata={"help": "draw this many patches from the stream once and train on them in random order "
                  "(0: a fresh batch from the stream every step)"},
    )
    threads: int = dataclasses.field(default=1, metadata={"help": "torch CPU threads"})
    log_every: int = dataclasses.field(default=100, metadata={"help": "steps between log lines"})
    run_dir: str = dataclasses.field(default="runs/estimator", metadata={"help": "output folder"})

    def validate(self) -> None:
        self.data.validate()
        for name in ("width", "steps", "batch_size", "num_workers", "threads", "log_every"):
            if getattr(self, name) < (0 if name == "num_workers" else 1):
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.data.patch_size < 16:
            raise UserError("--patch-size must be at least 16 (8 px of it go to the grid offset)")


def jitter(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each patch cut at its own (dy, dx) in 0..7, to side - 8: the 8x8 grid at a random phase."""
    side = batch.shape[-1] - 8
    out = torch.empty(batch.shape[:2] + (side, side), dtype=batch.dtype)
    for i, (dy, dx) in enumerate(rng.integers(0, 8, size=(batch.shape[0], 2)).tolist()):
        out[i] = batch[i, :, dy : dy + side, dx : dx + side]
    return out


def batch_source(cfg: EstimatorConfig, rng: np.random.Generator):
    """Endless (degraded uint8 batch, label batch): from the stream, or from a cache drawn from it."""
    loader = iter(make_train_loader(cfg.data, batch_size=cfg.batch_size, num_workers=cfg.num_workers))
    if not cfg.cache_patches:
        while True:
            degraded, _, q = next(loader)
            yield degraded, q
    parts, labels = [], []
    while sum(len(b) for b in parts) < cfg.cache_patches:
        degraded, _, q = next(loader)
        parts.append(degraded.clone())
        labels.append(q.clone())
    cache, qs = torch.cat(parts)[: cfg.cache_patches], torch.cat(labels)[: cfg.cache_patches]
    del loader
    while True:
        for idx in np.array_split(rng.permutation(len(cache)), len(cache) // cfg.batch_size):
            yield cache[idx], qs[idx]


def train(cfg: EstimatorConfig) -> Path:
    torch.manual_seed(cfg.data.seed)
    torch.set_num_threads(cfg.threads)
    run = Path(cfg.run_dir)
    dump_config(cfg, run / "config.yaml")
    net = QualityNet(cfg.width)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    rng = np.random.default_rng(cfg.data.seed)
    log, window, t0 = [], [], time.perf_counter()
    batches = batch_source(cfg, rng)
    for step in range(1, cfg.steps + 1):
        degraded, q = next(batches)
        lr = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - 1) / cfg.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = jitter(degraded, rng).float().div_(255)
        pred = net(x)
        loss = (pred - q.float() / 100).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(float(loss.detach()) * 100)
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {"step": step, "mae_q": float(np.mean(window)), "lr": lr, "seconds": time.perf_counter() - t0}
            log.append(row)
            print(json.dumps(row), flush=True)
            window = []
    facts = {
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "cache_patches": cfg.cache_patches,
        "patch_size": cfg.data.patch_size - 8,
        "degradations": cfg.data.degradation_facts(),
        "train_splits": cfg.data.splits,
        "shards": cfg.data.shards,
        "final_train_mae_q": log[-1]["mae_q"],
        "wall_time_min": round((time.perf_counter() - t0) / 60, 1),
        "label": "effective quality (restorer.data.degrade.effective_quality)",
    }
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return save_estimator(net, run / "estimator.safetensors", facts)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(EstimatorConfig, argv, prog="launch/train_estimator.py", description=__doc__)
    path = train(cfg)
    print(f"estimator: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
