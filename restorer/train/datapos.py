"""The trainer's side of the data position (restorer.data.position): what a checkpoint stores
about the data, where a resumed run starts reading, the global batch across world sizes, the
quarantine shared between ranks, and the data ledger.

Checkpoint files (beside Accelerate's, see restorer.train.checkpoint)::

    train_state.json            "data": the position's fields (epoch, segment, topology, batches,
                                done, target, fingerprints); "quarantine": [[shard, until], ...]
    data_excluded.npy           int64 addresses consumed before the segment began (main process)
    data_consumed_<rank>.npy    int64 addresses each rank consumed in the segment

(plain arrays, ``np.save(allow_pickle=False)``, loaded with ``allow_pickle=False``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from restorer.data.position import DataPosition, resume_position, start_position, unpack
from restorer.errors import AgreedError, UserError, first_line
from restorer.fsutil import atomic_write_text

EXCLUDED_NAME = "data_excluded.npy"
QUARANTINE_BATCH = 64  # failures shared per rank per exchange (the rest wait for the next one)


def consumed_name(rank: int) -> str:
    return f"data_consumed_{rank}.npy"


def apply_global_batch(cfg, world_size: int) -> None:
    """With ``--global-batch-size``: set ``cfg.grad_accum`` to global / (batch size x processes),
    whatever it was (a saved config.yaml holds the value of the world size it ran on); one line (on
    every process) when it does not divide."""
    g = cfg.global_batch_size
    if g is None:
        return
    per_step = cfg.batch_size * world_size
    if g < 1 or g % per_step:
        raise AgreedError(
            f"--global-batch-size {g} is not a multiple of --batch-size {cfg.batch_size} x "
            f"{world_size} process(es) = {per_step}"
        )
    cfg.grad_accum = g // per_step


def global_batch(cfg, world_size: int) -> int:
    return cfg.batch_size * cfg.grad_accum * world_size


def checkpoint_data(loader, rank: int, main: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(train_state.json entries, this process's arrays) of the loader's position and quarantine."""
    pos = loader.position()
    arrays = {consumed_name(rank): np.asarray(pos.consumed, np.int64)}
    if main:
        arrays[EXCLUDED_NAME] = np.asarray(pos.excluded, np.int64)
    entries = {
        "epoch": pos.epoch,
        "batch_in_epoch": pos.done,
        "data": pos.meta(),
        "quarantine": loader.quarantine.snapshot().tolist(),
    }
    return entries, arrays


def load_array(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a plain int64 array ({first_line(exc)})") from None
    if arr.dtype != np.int64 or arr.ndim != 1:
        raise UserError(f"{path}: expected a 1-D int64 array, got {arr.dtype} {arr.shape}")
    return arr


def start_data(accelerator, cfg, loader, ckpt: Path | None, saved: dict[str, Any]) -> list[str]:
    """Point ``loader`` at where the run continues (nothing to do for a fresh run); restore the
    quarantine. Returns the lines to print (the same on every process)."""
    if ckpt is None:
        return []
    lines = _world_change(cfg, saved, accelerator.num_processes)
    meta = saved.get("data")
    if not meta or not (ckpt / EXCLUDED_NAME).is_file():
        epoch = int(saved.get("epoch", 0)) + (1 if saved.get("batch_in_epoch", 0) else 0)
        loader.start_at(start_position(loader.plan, epoch, *loader.fingerprints))
        return [*lines, f"data: {ckpt} holds no data position (an older checkpoint): starting epoch {epoch}"]
    rank = accelerator.process_index
    try:
        old_world = int(meta["world_size"])
        own = load_array(ckpt / consumed_name(rank)) if rank < old_world else np.zeros(0, np.int64)
        saved_pos = DataPosition.from_meta(meta, load_array(ckpt / EXCLUDED_NAME), own)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{ckpt / 'train_state.json'}: malformed data position ({first_line(exc)})") from None
    pos, line = resume_position(
        loader.plan,
        saved_pos,
        lambda: [load_array(ckpt / consumed_name(r)) for r in range(old_world)],
        *loader.fingerprints,
    )
    loader.start_at(pos)
    if saved_pos.listing == loader.fingerprints[1]:
        loader.add_quarantine(saved.get("quarantine") or [])
    return [*lines, line] if line else lines


def _world_change(cfg, saved: dict[str, Any], world: int) -> list[str]:
    old_world = int(saved.get("world_size", world))
    if old_world == world:
        return []
    old = int(saved.get("global_batch", 0)) or None
    new = global_batch(cfg, world)
    if cfg.global_batch_size is not None:
        return [
            f"resuming on {world} process(es) (the checkpoint ran on {old_world}): global batch {new} kept "
            f"(--grad-accum {cfg.grad_accum})"
        ]
    return [
        f"warning: resuming on {world} process(es) (the checkpoint ran on {old_world}): the global batch changes "
        f"from {old or 'unknown'} to {new} patches per step (set --global-batch-size to keep it)"
    ]


def share_quarantine(accelerator, loader) -> None:
    """Every process learns the shards the others quarantined since the last call (call on every
    process together: one all-gather of a fixed size)."""
    send = loader.take_failures(QUARANTINE_BATCH)
    buf = torch.full((QUARANTINE_BATCH, 2), -1, dtype=torch.int64)
    if send:
        buf[: len(send)] = torch.tensor(send, dtype=torch.int64)
    every = accelerator.gather(buf.to(accelerator.device)).cpu().view(-1, 2)
    loader.add_quarantine([(s, u) for s, u in every.tolist() if s >= 0])


class Ledger:
    """``RUN/ledger/rank-<R>.jsonl`` (``--data-ledger``): one row per batch taken, ``{"step": the
    optimizer step it was taken for, "epoch": data epoch, "patches": [[shard, sample, patch], ...]}``.
    A resumed run first drops every rank's rows after its checkpoint's step."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / "ledger" / f"rank-{rank}.jsonl"

    @staticmethod
    def truncate(run_dir: Path, last_step: int) -> None:
        """Keep only rows up to ``last_step`` in every rank's file (main process, before any writes)."""
        for path in sorted((run_dir / "ledger").glob("rank-*.jsonl")):
            rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= last_step]
            atomic_write_text(path, "".join(r + "\n" for r in rows))

    def record(self, step: int, entries: list[tuple[int, np.ndarray]]) -> None:
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            for epoch, addresses in entries:
                fh.write(json.dumps({"step": step, "epoch": int(epoch), "patches": unpack(addresses).tolist()}) + "\n")


def open_ledger(accelerator, cfg, loader, run_dir: Path, start_step: int) -> Ledger | None:
    """The ledger of this process when ``--data-ledger`` (the main process trims the rows an earlier
    attempt wrote after ``start_step`` first)."""
    if not cfg.data_ledger:
        return None
    if accelerator.is_main_process:
        (run_dir / "ledger").mkdir(parents=True, exist_ok=True)
        Ledger.truncate(run_dir, start_step)
    accelerator.wait_for_everyone()
    loader.keep_ledger = True
    return Ledger(run_dir, accelerator.process_index)
