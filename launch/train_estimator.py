#!/usr/bin/env python
"""Train the effective-quality estimator (restorer/estimator.py) on the training stream.

The patches come from the same stream as the restoration models' (``restorer.data``: shards ->
crops -> single saves and real-world chains, labelled with each chain's effective quality), so the
estimator learns the label the models are told. The stream options and their defaults are the
trainer's (``StreamConfig``); the release recipe sets the estimator's (chains on, 104 px patches).
``--patches`` patches are drawn once; each is cut at a random 0-7 px offset (so that the estimator
does not rely on the 8x8 grid starting at its crop's corner: a screenshot or a cropped re-save
moves it), turned into :func:`restorer.estimator.features`, and the last ``--holdout`` share of
them is kept aside to report the validation error. The MLP is then fitted with an L1 loss on
quality / 100 (AdamW, cosine LR). One process, minutes on a CPU core. Writes
``RUN/estimator.safetensors`` (weights + facts) and ``RUN/log.jsonl``.

  .venv/bin/python launch/train_estimator.py --config launch/configs/release_estimator.yaml
  .venv/bin/python launch/train_estimator.py --shards data/bsr --chain-p 0.5 --patches 2000 --run-dir runs/est_try

The packaged estimator (restorer/weights/estimator.safetensors) is this script's output with
``launch/configs/release_estimator.yaml`` (``make release-estimator``).
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
from restorer.data.config import StreamConfig
from restorer.data.loader import make_train_loader
from restorer.errors import UserError, cli_entry
from restorer.estimator import QualityNet, features, save_estimator


@dataclasses.dataclass
class EstimatorConfig:
    data: StreamConfig = dataclasses.field(
        default_factory=StreamConfig, metadata={"flatten": True, "rename": {"splits": "train_splits"}}
    )
    patches: int = dataclasses.field(default=12000, metadata={"help": "patches drawn from the stream (once)"})
    holdout: float = dataclasses.field(default=0.1, metadata={"help": "share of them kept aside for validation"})
    width: int = dataclasses.field(default=64, metadata={"help": "width of the MLP's two hidden layers"})
    steps: int = dataclasses.field(default=4000, metadata={"help": "optimizer steps"})
    batch_size: int = dataclasses.field(default=128, metadata={"help": "patches per step"})
    lr: float = dataclasses.field(default=1e-3, metadata={"help": "peak learning rate (cosine to 5%)"})
    num_workers: int = dataclasses.field(default=1, metadata={"help": "loader worker processes"})
    threads: int = dataclasses.field(default=1, metadata={"help": "torch CPU threads"})
    log_every: int = dataclasses.field(default=500, metadata={"help": "steps between log lines"})
    run_dir: str = dataclasses.field(default="runs/estimator", metadata={"help": "output folder"})

    def validate(self) -> None:
        self.data.validate()
        for name in ("patches", "width", "steps", "batch_size", "threads", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or not 0.0 < self.holdout < 0.9:
            raise UserError("--num-workers must be >= 0 and --holdout in (0, 0.9)")
        if self.data.patch_size < 24:
            raise UserError("--patch-size must be at least 24 (8 px of it go to the grid offset)")


def draw(cfg: EstimatorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, 258], labels [N]) of ``cfg.patches`` stream patches, each cut at a random
    0-7 px offset to ``patch_size - 8``."""
    loader = iter(make_train_loader(cfg.data, batch_size=16, num_workers=cfg.num_workers))
    rng = np.random.default_rng(cfg.data.seed)
    side = cfg.data.patch_size - 8
    feats: list[np.ndarray] = []
    labels: list[float] = []
    while len(feats) < cfg.patches:
        degraded, _, q = next(loader)
        for img, label in zip(degraded.permute(0, 2, 3, 1).numpy(), q.tolist(), strict=True):
            dy, dx = rng.integers(0, 8, size=2).tolist()
            feats.append(features(img[dy : dy + side, dx : dx + side]))
            labels.append(label)
    del loader
    n = cfg.patches
    return torch.from_numpy(np.stack(feats[:n])), torch.tensor(labels[:n], dtype=torch.float32)


def train(cfg: EstimatorConfig) -> Path:
    torch.manual_seed(cfg.data.seed)
    torch.set_num_threads(cfg.threads)
    run = Path(cfg.run_dir)
    dump_config(cfg, run / "config.yaml")
    t0 = time.perf_counter()
    x, y = draw(cfg)
    n_val = max(1, int(len(x) * cfg.holdout))
    xt, yt, xv, yv = x[:-n_val], y[:-n_val] / 100, x[-n_val:], y[-n_val:] / 100
    net = QualityNet(cfg.width)
    net.get_buffer("mean").copy_(xt.mean(dim=0))
    net.get_buffer("std").copy_(xt.std(dim=0) + 1e-6)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-2)
    log, window = [], []
    for step in range(1, cfg.steps + 1):
        lr = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - 1) / cfg.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(xt), (cfg.batch_size,))
        loss = (net(xt[idx]) - yt[idx]).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(float(loss.detach()) * 100)
        if step % cfg.log_every == 0 or step == cfg.steps:
            with torch.no_grad():
                val = float((net(xv) - yv).abs().mean()) * 100
            row = {"step": step, "train_mae_q": float(np.mean(window)), "val_mae_q": val, "lr": lr}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            log.append(row)
            print(json.dumps(row), flush=True)
            window = []
    facts = {
        "steps": cfg.steps,
        "patches": cfg.patches,
        "holdout": n_val,
        "patch_size": cfg.data.patch_size - 8,
        "degradations": cfg.data.degradation_facts(),
        "train_splits": cfg.data.splits,
        "shards": cfg.data.shards,
        "val_mae_q": log[-1]["val_mae_q"],
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
