"""Training checkpoints: ``RUN/checkpoints/step-XXXXXXX/``, atomic, verified before loading.

Layout of one checkpoint (Accelerate's ``save_state`` plus our own files)::

    model.safetensors          Accelerate: model weights (safetensors)
    optimizer.bin              Accelerate: AdamW state (torch.save of tensors and numbers)
    scaler.pt                  Accelerate: fp16 loss-scaler state (fp16 runs only)
    random_states_<rank>.pkl   Accelerate: python/numpy/torch RNG of each process
    ema.safetensors            ours: EMA weights
    train_state.json           ours: global step, data position, quarantine, counters
    data_excluded.npy          ours: data position, addresses consumed before the epoch's segment
    data_consumed_<rank>.npy   ours: data position, addresses each rank consumed in the segment
    COMPLETE                   ours: written last; a directory without it is never loaded

Atomicity: everything is written into ``.tmp-step-XXXXXXX``; once every rank has finished, the
main process fsyncs every rank's files, writes ``COMPLETE`` and renames the directory into place,
then deletes all but the newest ``keep`` checkpoints. Re-saving a step that already has a
checkpoint first renames the old one aside (``.tmp-old-step-XXXXXXX``), then renames the new one
into place, then deletes the old one. A run killed at any moment leaves the previous checkpoints
intact; when training starts again a complete ``.tmp-step-*`` whose step has no checkpoint (killed
between those two renames) is moved into place, and every other ``.tmp-*`` directory is removed.

Safety: no file of a checkpoint is unpickled with ``weights_only=False``. Accelerate 1.15 loads
models from safetensors and optimizer/scaler/RNG files through ``accelerate.utils.other.load``,
which defaults to ``weights_only=True`` (tensors, numbers, containers and numpy arrays only) -- but
it would load ``custom_checkpoint_*.pkl`` files (objects registered with
``register_for_checkpointing``) with ``weights_only=False``, and it silently ignores an RNG file it
cannot read. So we register nothing (the EMA is saved with safetensors), and before handing a
directory to ``load_state`` we load every file ourselves the same restricted way, refusing the
directory with one line if any file is not plain data (``.npy`` files with ``allow_pickle=False``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils.other import load as accelerate_load  # weights_only=True + numpy RNG types
from safetensors import safe_open

from restorer.data.degrade import parse_quality
from restorer.errors import PeerError, UserError, first_line
from restorer.modelfile import export_weights, read_meta
from restorer.train.context import TrainContext
from restorer.train.datapos import checkpoint_data, global_batch, share_quarantine
from restorer.train.state import TrainState
from restorer.train.tracking import say

MARKER = "COMPLETE"
STATE_NAME = "train_state.json"
EMA_NAME = "ema.safetensors"
_STEP_RE = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
OLD_PREFIX = TMP_PREFIX + "old-"
PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_RE.match(entry.name)
        if m and entry.is_dir() and (entry / MARKER).is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def remove_stale_temp(root: str | os.PathLike) -> list[Path]:
    """Delete ``.tmp-*`` directories left by a run killed while saving (main process only); a
    complete ``.tmp-step-*`` (it has ``COMPLETE``) whose ``step-*`` is missing -- the run was killed
    while re-saving a step, between renaming the old copy aside and the new one into place -- is
    renamed into place instead. Returns the removed directories."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for entry in root.iterdir():
            final = root / entry.name[len(TMP_PREFIX) :]
            if (
                entry.name.startswith(TMP_PREFIX)
                and _STEP_RE.match(final.name)
                and (entry / MARKER).is_file()
                and not final.exists()
            ):
                os.rename(entry, final)
        for entry in root.iterdir():
            if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` is a complete checkpoint made of plain data; return its train state.

    Raises a one-line :class:`UserError` for a missing/incomplete directory or for any file that
    would need arbitrary unpickling (nothing in it is executed)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint directory not found")
    if not (path / MARKER).is_file():
        raise UserError(
            f"{path}: incomplete checkpoint (no {MARKER} marker); it was being written when the run stopped"
        )
    for file in sorted(path.iterdir()):
        if file.name.startswith("custom_checkpoint_"):
            raise UserError(
                f"{file}: refused to load (restorer never writes custom_checkpoint files, "
                f"and Accelerate would unpickle it without restrictions)"
            )
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as fh:
                    list(fh.keys())
            except Exception as exc:
                raise UserError(f"{file}: refused to load (not a safetensors file: {first_line(exc)})") from None
        elif file.suffix == ".npy":
            try:
                np.load(file, allow_pickle=False)
            except (OSError, ValueError) as exc:  # an object array (pickled) raises ValueError
                raise UserError(f"{file}: refused to load (not a plain array: {first_line(exc)})") from None
        elif file.suffix in PICKLE_SUFFIXES:
            try:
                accelerate_load(str(file), map_location="cpu", weights_only=True)
            except Exception as exc:  # UnpicklingError for code, RuntimeError for garbage
                raise UserError(
                    f"{file}: refused to load (not a plain-tensor checkpoint file: {first_line(exc)})"
                ) from None
    try:
        state = json.loads((path / STATE_NAME).read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path / STATE_NAME}: missing or malformed ({first_line(exc)})") from None
    return state


@dataclasses.dataclass
class Content:
    """What a checkpoint holds beside Accelerate's files: ``state`` (train_state.json) and the EMA
    (main process), and each process's own plain arrays (``name.npy`` -> array)."""

    state: dict[str, Any]
    ema: Any = None
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def save_checkpoint(
    accelerator, root: str | os.PathLike, step: int, content: Content, keep: int = 3, faults=None
) -> Path:
    """Save the full training state of ``step`` atomically (call on every process).

    A write error (a full disk, say) on any process removes the temporary directory and raises on
    every process: a one-line :class:`UserError` naming the file where it happened, a
    :class:`PeerError` elsewhere; earlier checkpoints stay valid."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()

    error: str | None = None
    try:
        if faults is not None:
            with faults.during_save(step, tmp, main):
                accelerator.save_state(str(tmp))
            faults.after_accelerate_save(step, tmp, main)
        else:
            accelerator.save_state(str(tmp))
        for name, array in content.arrays.items():
            with open(tmp / name, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
        if main:
            if content.ema is not None:
                content.ema.save(tmp / EMA_NAME)
            (tmp / STATE_NAME).write_text(json.dumps({**content.state, "step": step}, indent=2) + "\n")
    except OSError as exc:
        error = _write_error(exc, tmp, step)
    _agree(accelerator, error, root, tmp, step)  # every rank has written its files

    if main:
        aside = root / f"{OLD_PREFIX}{final.name}"
        try:
            for file in tmp.iterdir():  # every rank's files, now that all are written
                _fsync_path(file)
            marker = tmp / MARKER
            marker.write_text(json.dumps({"step": step, "time": time.time()}) + "\n")
            _fsync_path(marker)
            _fsync_path(tmp)
            if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(final, aside)
            os.rename(tmp, final)
            _fsync_path(root)
            shutil.rmtree(aside, ignore_errors=True)
            for _, old in complete_checkpoints(root)[: -max(1, keep)]:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            error = _write_error(exc, tmp, step)
            if aside.is_dir() and not final.exists():
                os.rename(aside, final)  # put the earlier checkpoint of this step back
    _agree(accelerator, error, root, tmp, step)
    return final


def _write_error(exc: OSError, tmp: Path, step: int) -> str:
    return f"{exc.filename or tmp}: cannot write checkpoint of step {step}: {exc.strerror or first_line(exc)}"


def _agree(accelerator, error: str | None, root: Path, tmp: Path, step: int) -> None:
    """All-reduce whether any process failed (a barrier too); if one did, remove the temporary
    directory and raise on every process: the failing ones a UserError naming the file, the
    others a :class:`PeerError` (the failing process reports)."""
    failed = torch.tensor([1.0 if error else 0.0], device=accelerator.device)
    failed = accelerator.reduce(failed, reduction="sum")
    if float(failed.item()) > 0:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise PeerError(f"checkpoint of step {step} failed on another process")
        previous = latest_checkpoint(root)
        tail = f" (the last complete checkpoint, {previous}, is intact)" if previous else ""
        raise UserError(error + tail)


def load_checkpoint(accelerator, path: str | os.PathLike, ema=None) -> dict[str, Any]:
    """Verify ``path`` (see :func:`verify_checkpoint`), then restore model, optimizer, scaler, RNG
    and EMA; return the train state (step, epoch, ...)."""
    path = Path(path)
    state = verify_checkpoint(path)
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise UserError(f"{path}: does not match this model/optimizer ({first_line(exc)})") from None
    if ema is not None:
        if not (path / EMA_NAME).is_file():
            raise UserError(f"{path / EMA_NAME}: missing (the run was saved without EMA; pass --ema-decay 0)")
        try:
            ema.load(path / EMA_NAME)
        except (RuntimeError, KeyError) as exc:
            raise UserError(f"{path / EMA_NAME}: does not match this model ({first_line(exc)})") from None
    return state


# --- the trainer's use of checkpoints: where to start, save + export, resume ----------------------


def finished_at(ckpt: Path, run_dir: Path, max_steps: int) -> int | None:
    """The step of ``ckpt`` when it is a complete checkpoint at or past ``max_steps`` and
    ``run_dir/model.safetensors`` holds the weights exported with it (the run is done); else None."""
    try:
        if not (ckpt / MARKER).is_file():
            return None
        step = int(json.loads((ckpt / STATE_NAME).read_text())["step"])
        weights = run_dir / "model.safetensors"
        if step < max_steps or not weights.is_file() or int(read_meta(weights)["facts"]["steps"]) != step:
            return None
        return step
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return None


def find_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` the newest complete one under ``root`` (None when
    there is none), ``none`` nothing (refused with one line when ``root`` holds checkpoints), else
    the given directory."""
    if resume == "auto":
        return latest_checkpoint(root)
    if resume == "none":
        if complete_checkpoints(root):
            raise UserError(
                f"{root}: holds checkpoints of an earlier run; use --resume auto to continue it or another --run-dir"
            )
        return None
    return Path(resume).resolve()


def resume_state(accelerator, path: Path, ema=None) -> TrainState:
    """Load ``path`` into the prepared model/optimizer (and ``ema``); the :class:`TrainState` to go on
    from (its data position is restored by ``restorer.train.datapos.start_data``)."""
    return TrainState.from_checkpoint(load_checkpoint(accelerator, path, ema))


def export_facts(cfg, state) -> dict[str, Any]:
    """The training facts ``model.json`` records beside the weights."""
    last = state.last_val
    return {
        "quality": cfg.data.quality,
        "quality_range": list(parse_quality(cfg.data.quality)),
        "steps": state.step,
        "condition_on_quality": cfg.model.condition_on_quality,
        "train_patch_size": cfg.data.patch_size,
        "ema_decay": cfg.ema_decay,
        "loss": cfg.loss,
        "double_jpeg_p": cfg.data.double_jpeg_p,
        "chroma_subsampling": cfg.data.chroma_subsampling,
        "degradations": cfg.data.degradation_facts(),
        "init_weights": cfg.init_weights,
        "val_split": None if cfg.val_shards else cfg.val_split,
        "val_shards": cfg.val_shards,
        "val_psnr": {k[len("val/psnr_q") :]: v for k, v in last.items() if k.startswith("val/psnr_q")},
        "val_gain": {k[len("val/gain_q") :]: v for k, v in last.items() if k.startswith("val/gain_q")},
    }


def save_and_export(ctx: TrainContext) -> Path:
    """Checkpoint ``ctx.state`` and the loader's data position (every process; the quarantines are
    shared first, so every rank saves the same), then export the weights validation uses (the EMA,
    else the model itself, never a compiled wrapper) to ``run_dir/model.safetensors`` (main process)."""
    accelerator, cfg, state, loader = ctx.accelerator, ctx.cfg, ctx.state, ctx.loader
    world = accelerator.num_processes
    share_quarantine(accelerator, loader)
    data, arrays = checkpoint_data(loader, accelerator.process_index, accelerator.is_main_process)
    saved = state.to_checkpoint(data, world_size=world, global_batch=global_batch(cfg, world), seed=cfg.data.seed)
    content = Content(saved, ctx.ema, arrays)
    path = save_checkpoint(accelerator, ctx.ckpt_root, state.step, content, cfg.keep_checkpoints, ctx.faults)
    if accelerator.is_main_process:
        export_weights(ctx.eval_net(), cfg.model_config(), ctx.run_dir, export_facts(cfg, state))
    say(accelerator, f"step {state.step}: saved {path}")
    return path
