#!/usr/bin/env python
"""Train a JPEG-artifact removal network: DDP across GPUs/nodes (or CPU processes) via Accelerate.

Always start it with ``accelerate launch`` (one process per GPU, or 2 CPU processes)::

  # 2 CPU processes (gloo DDP), small recipe
  accelerate launch --config_file launch/accelerate/cpu2.yaml launch/train.py \\
      --config launch/configs/cpu.yaml --shards data/shards --run-dir runs/cpu
  # every GPU of one node, bf16
  accelerate launch --config_file launch/accelerate/1node.yaml --num_processes 8 launch/train.py \\
      --config launch/configs/gpu.yaml --run-dir runs/gpu
  # several nodes: see launch/slurm/train.sbatch (one `accelerate launch` per node)

Config: dataclass defaults < ``--config YAML`` < flags. The resolved config is written to
``RUN/config.yaml`` and sent to W&B. ``RUN`` receives::

  config.yaml  run_info.json  metrics.jsonl  panels/  wandb/
  checkpoints/step-XXXXXXX/   (Accelerate state + EMA + train_state.json + COMPLETE marker)
  model.safetensors + model.json   (EMA weights for `restorer restore`, exported with every checkpoint)

Resume: ``--resume auto`` (default) continues from the newest complete checkpoint in RUN (step, LR,
optimizer, EMA, RNG, data epoch); ``--resume PATH`` from that checkpoint; ``--resume none`` refuses
to start in a RUN that already has checkpoints. A resumed run starts a fresh pass over the data
with the next epoch number (the partly seen epoch is not replayed); rows of ``metrics.jsonl`` logged
after the checkpoint are dropped. Running a finished run again (its newest checkpoint at
``--max-steps`` and ``model.safetensors`` exported from it) does nothing.

Errors: one line ``error: ...`` each; an error met by one process only is printed by that process
as ``error: [rank R] ...``, and that process exits at once (the launcher then stops the others).

Optimizer steps: each step consumes ``batch_size x grad_accum`` patches on every process; the
LR schedule (linear warmup, cosine to ``min_lr_ratio``) is a function of this step, so it is not
affected by the number of processes. A step whose loss is not finite on any process is skipped on
all of them (the weights are untouched) and counted; ``--max-nonfinite`` in a row stop the run.
SIGTERM/SIGUSR1 (SLURM preemption) make every process save a checkpoint and exit at the next step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # `accelerate launch launch/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from restorer.config import config_dict, dump_config, parse_config
from restorer.data.degrade import parse_quality
from restorer.errors import UserError
from restorer.errors import AgreedError, PeerError

EXAMPLES = """examples:
  # 2 CPU processes on this machine (real gloo DDP), a few minutes:
  ACCELERATE_USE_CPU=true accelerate launch --config_file launch/accelerate/cpu2.yaml \\
      launch/train.py --config launch/configs/cpu.yaml --shards data/shards --run-dir runs/cpu
  # all GPUs of one node, bf16, full-size model:
  accelerate launch --config_file launch/accelerate/1node.yaml --num_processes 8 \\
      launch/train.py --config launch/configs/gpu.yaml --run-dir runs/gpu
  # override anything from the YAML on the command line:
  accelerate launch ... launch/train.py --config launch/configs/gpu.yaml --lr 5e-4 --units 12
  # continue an interrupted run (the default): same command again, or --resume auto
  # several nodes under SLURM: sbatch --nodes 4 launch/slurm/train.sbatch --config launch/configs/gpu.yaml
"""


@dataclasses.dataclass
class TrainConfig:
    # data
    shards: str = dataclasses.field(default="data/shards", metadata={"help": "shard directory (with manifest.json)"})
    train_splits: list[str] = dataclasses.field(default_factory=lambda: ["train"],
                                                metadata={"help": "splits to train on"})
    val_split: str = dataclasses.field(default="val", metadata={"help": "split of --shards to validate on"})
    val_shards: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "validation shards as they are (a shards dir with one split, a folder of "
                                        "tars, a URL pattern); default: the --val-split split of --shards"})
    quality: str = dataclasses.field(default="10-90", metadata={"help": "JPEG quality: one number or a range LO-HI"})
    patch_size: int = dataclasses.field(default=128, metadata={"help": "training patch size (px)"})
    patches_per_image: int = 4
    rescale_p: float = 0.5
    rotate_p: float = 0.5
    flip_p: float = 0.0
    chroma_subsampling: str = dataclasses.field(default="4:2:0", metadata={"choices": ["4:4:4", "4:2:2", "4:2:0"]})
    grayscale: bool = False
    shuffle_buffer: int = 1000
    epoch_samples: Optional[int] = dataclasses.field(
        default=None, metadata={"help": "PATCHES per epoch, summed over all processes (default: every tile of "
                                        "the train splits x --patches-per-image)"})
    resampled: bool = dataclasses.field(
        default=False, metadata={"help": "draw shards with replacement instead of splitting them between "
                                         "processes and workers (samples may repeat within an epoch)"})
    num_workers: int = dataclasses.field(default=4, metadata={"help": "data loader workers per process"})
    # model
    preset: str = dataclasses.field(default="default", metadata={"help": "seed, tiny, small, default, large"})
    channels: Optional[int] = dataclasses.field(default=None, metadata={"help": "override the preset's width C"})
    units: Optional[int] = dataclasses.field(default=None, metadata={"help": "override the preset's unit count N"})
    condition_on_quality: bool = dataclasses.field(
        default=False, metadata={"help": "add an input plane of quality/100 (one blind model for all qualities)"})
    # optimisation
    max_steps: int = dataclasses.field(default=20000, metadata={"help": "optimizer steps"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "patches per process per micro-batch"})
    grad_accum: int = dataclasses.field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = 5e-4
    min_lr_ratio: float = dataclasses.field(default=0.1, metadata={"help": "final LR / peak LR of the cosine"})
    warmup_steps: int = 500
    weight_decay: float = 0.0
    clip_grad: float = dataclasses.field(default=1.0, metadata={"help": "max gradient norm (0 = no clipping)"})
    ema_decay: float = dataclasses.field(default=0.999, metadata={"help": "EMA decay (0 = no EMA)"})
    mixed_precision: str = dataclasses.field(default="no", metadata={"choices": ["no", "bf16", "fp16"]})
    channels_last: bool = False
    compile: bool = dataclasses.field(default=False, metadata={"help": "torch.compile the model"})
    seed: int = 0
    max_nonfinite: int = dataclasses.field(
        default=20, metadata={"help": "stop after this many non-finite losses in a row"})
    # validation, logging, checkpoints
    val_every: int = 1000
    val_qualities: list[int] = dataclasses.field(default_factory=lambda: [10, 20, 30, 40])
    val_crop: int = dataclasses.field(default=256, metadata={"help": "centre crop of each val image (px)"})
    val_batch_size: int = 8
    panel_images: int = dataclasses.field(default=4, metadata={"help": "images in the JPEG|restored|clean panel"})
    log_every: int = 50
    save_every: int = 1000
    keep_checkpoints: int = 3
    run_dir: str = "runs/train"
    resume: str = dataclasses.field(default="auto", metadata={"help": "auto, none, or a checkpoint directory"})
    tracker: str = dataclasses.field(default="wandb", metadata={"choices": ["wandb", "none"]})
    wandb_project: str = "restorer"
    run_name: Optional[str] = None

    def validate(self) -> None:
        try:
            parse_quality(self.quality)
            for q in self.val_qualities:
                parse_quality(q)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        positive = ("patch_size", "batch_size", "grad_accum", "max_steps", "val_every", "save_every",
                    "log_every", "keep_checkpoints", "max_nonfinite", "val_batch_size", "val_crop")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.train_splits:
            raise UserError("--train-splits needs at least one split")
        if not (0.0 <= self.ema_decay < 1.0):
            raise UserError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise UserError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.tracker not in ("wandb", "none"):
            raise UserError(f"--tracker must be wandb or none, got {self.tracker!r}")


def _model_config(cfg: TrainConfig):
    from restorer.model import ModelConfig

    return ModelConfig(preset=cfg.preset, channels=cfg.channels, units=cfg.units,
                       in_channels=1 if cfg.grayscale else 3,
                       condition_on_quality=cfg.condition_on_quality).resolved()


def _peak_memory_gb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"perf/peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30}
    import resource

    return {"perf/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def _panel(deg: torch.Tensor, out: torch.Tensor, clean: torch.Tensor, n: int) -> np.ndarray:
    """Rows of JPEG | restored | clean, uint8 HxWx3."""
    rows = []
    for i in range(min(n, deg.shape[0])):
        row = torch.cat([deg[i], out[i], clean[i]], dim=-1)  # C,H,3W
        rows.append(row)
    grid = torch.cat(rows, dim=-2).float().clamp(0, 1).mul(255).round().byte().cpu()
    if grid.shape[0] == 1:
        grid = grid.expand(3, -1, -1)
    return grid.permute(1, 2, 0).contiguous().numpy()


def _val_source(cfg: TrainConfig) -> tuple[str, Optional[str]]:
    """(shard spec, split) to validate on: ``--val-shards`` as is, else ``--val-split`` of ``--shards``."""
    return (cfg.val_shards, None) if cfg.val_shards else (cfg.shards, cfg.val_split)


@torch.no_grad()
def validate(net, cfg: TrainConfig, accelerator, faults, *, with_ssim: bool) -> tuple[dict[str, float], Optional[np.ndarray]]:
    """PSNR (and SSIM) of restored and JPEG vs clean per quality, summed over images on every
    process and all-reduced, so the figures are exact over the whole split."""
    from restorer.data import make_val_loader, to_device_float
    from restorer.metrics import psnr, ssim

    device = accelerator.device
    qualities = [int(q) for q in cfg.val_qualities]
    spec, split = _val_source(cfg)
    loader = make_val_loader(spec, split=split, qualities=tuple(qualities), crop=cfg.val_crop,
                             rank=accelerator.process_index, world_size=accelerator.num_processes,
                             batch_size=cfg.val_batch_size, num_workers=0, grayscale=cfg.grayscale,
                             chroma_subsampling=cfg.chroma_subsampling)
    slot = {q: i for i, q in enumerate(qualities)}
    # rows: restored psnr, jpeg psnr, count, restored ssim, jpeg ssim
    sums = torch.zeros(5, len(qualities), dtype=torch.float64)
    panel = None
    was_training = net.training
    net.eval()
    faults.maybe_sleep(accelerator.process_index)
    for deg, clean, q in loader:
        x = to_device_float(deg, device, cfg.channels_last)
        y = to_device_float(clean, device, cfg.channels_last)
        out = net(x, q.to(device) if cfg.condition_on_quality else None)
        out = out.float().clamp(0, 1).mul(255).round().div(255)  # what a saved 8-bit image holds
        idx = torch.tensor([slot[int(v)] for v in q])
        sums[0].index_add_(0, idx, psnr(out, y).clamp(max=100.0).cpu())
        sums[1].index_add_(0, idx, psnr(x, y).clamp(max=100.0).cpu())
        sums[2].index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))
        if with_ssim:
            sums[3].index_add_(0, idx, ssim(out, y).cpu())
            sums[4].index_add_(0, idx, ssim(x, y).cpu())
        if panel is None and accelerator.is_main_process and cfg.panel_images > 0:
            panel = _panel(x, out, y, cfg.panel_images)
    net.train(was_training)
    total = accelerator.reduce(sums.to(device), reduction="sum").cpu()
    results: dict[str, float] = {}
    for q, i in slot.items():
        n = float(total[2, i])
        if n == 0:
            continue
        results[f"val/psnr_q{q}"] = float(total[0, i]) / n
        results[f"val/jpeg_psnr_q{q}"] = float(total[1, i]) / n
        results[f"val/gain_q{q}"] = results[f"val/psnr_q{q}"] - results[f"val/jpeg_psnr_q{q}"]
        if with_ssim:
            results[f"val/ssim_q{q}"] = float(total[3, i]) / n
            results[f"val/jpeg_ssim_q{q}"] = float(total[4, i]) / n
    n_all = float(total[2].sum())
    if n_all == 0:  # decided from the reduced count: every process raises it together
        raise AgreedError(f"{spec}: no readable validation samples" + (f" in split {split!r}" if split else "")
                          + f" (on any of {accelerator.num_processes} process(es))")
    results["val/psnr"] = float(total[0].sum()) / n_all
    results["val/gain"] = float((total[0] - total[1]).sum()) / n_all
    results["val/images"] = n_all
    return results, panel


def _write_json(path: Path, obj: Any) -> None:
    """Write ``path`` atomically (a temporary file, then os.replace)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _finished_at(ckpt: Path, run_dir: Path, max_steps: int) -> Optional[int]:
    """The step of ``ckpt`` when it is a complete checkpoint at or past ``max_steps`` and
    ``run_dir/model.safetensors`` holds the weights exported with it; else None."""
    from restorer.modelfile import read_meta
    from restorer.train_checkpoint import MARKER, STATE_NAME

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


def _rank_fingerprints(accelerator, model) -> list[str]:
    """First 8 bytes of the SHA-256 of each process's weights, gathered from all processes."""
    import hashlib

    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    local = torch.tensor(list(digest.digest()[:8]), dtype=torch.int64, device=accelerator.device)
    every = accelerator.gather(local).cpu().view(-1, 8)
    return [bytes(int(b) for b in row).hex() for row in every]


class _StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption) set a flag; processes agree on it at the next step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


def train(cfg: TrainConfig) -> int:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from restorer.modelfile import export_weights
    from restorer.data import SharedEpoch, StreamConfig, make_train_loader, to_device_float
    from restorer.ema import EMA, unwrap
    from restorer.faults import Faults
    from restorer.model import build_model, count_parameters, flops_per_pixel
    from restorer.schedule import lr_at
    from restorer.tracking import Tracker, prepare_wandb
    from restorer.train_checkpoint import (complete_checkpoints, latest_checkpoint, load_checkpoint,
                                           remove_stale_temp, save_checkpoint)

    faults = Faults.from_env()
    run_dir = Path(cfg.run_dir).resolve()
    ckpt_root = run_dir / "checkpoints"
    use_wandb = cfg.tracker == "wandb"
    note = prepare_wandb(run_dir) if use_wandb else None
    cpu = not torch.cuda.is_available()  # makes `--multi_gpu` launches real gloo DDP on CPU machines
    if cfg.mixed_precision == "fp16" and cpu:
        raise UserError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, log_with="wandb" if use_wandb else None,
                              project_dir=str(run_dir))
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device

    def say(msg: str) -> None:
        if main:
            print(msg, flush=True)

    # --- where to start --------------------------------------------------------------------
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temp(ckpt_root):
            say(f"removed incomplete checkpoint {stale} (the run was stopped while saving it)")
    accelerator.wait_for_everyone()
    resume_from: Optional[Path] = None
    if cfg.resume == "auto":
        resume_from = latest_checkpoint(ckpt_root)
    elif cfg.resume == "none":
        if complete_checkpoints(ckpt_root):
            raise UserError(f"{ckpt_root}: holds checkpoints of an earlier run; use --resume auto to continue "
                            f"it or another --run-dir")
    else:
        resume_from = Path(cfg.resume).resolve()
    if resume_from is not None:
        done = _finished_at(resume_from, run_dir, cfg.max_steps)
        if done is not None:
            say(f"nothing to do: {resume_from} is at step {done} (--max-steps {cfg.max_steps}) and "
                f"{run_dir / 'model.safetensors'} holds its weights; raise --max-steps to train on")
            accelerator.wait_for_everyone()
            accelerator.end_training()
            return 0
    # a missing val split would otherwise surface only at the first validation
    from restorer.data import resolve_shards

    val_spec, val_split = _val_source(cfg)
    resolve_shards(val_spec, None if val_split is None else [val_split])

    # --- model, optimizer ---------------------------------------------------------------------
    set_seed(cfg.seed)
    model_cfg = _model_config(cfg)
    model = build_model(model_cfg)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        ema.model.to(device)
        if cfg.channels_last:
            ema.model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    if cfg.compile:
        model = torch.compile(model)
    # The loaders are NOT prepared: each process reads its own shards (see restorer.data).
    # No LR scheduler object either: the LR is set from the optimizer step below.
    model, optimizer = accelerator.prepare(model, optimizer)

    step, epoch, nonfinite_total = 0, 0, 0
    wandb_id = None
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, ema)
        step = int(state["step"])
        epoch = int(state.get("epoch", 0)) + (1 if state.get("batch_in_epoch", 0) else 0)
        nonfinite_total = int(state.get("nonfinite_total", 0))
        wandb_id = state.get("wandb_id")
        say(f"resumed from {resume_from} at step {step} (data epoch {epoch})")
    if use_wandb and wandb_id is None:
        import secrets

        wandb_id = secrets.token_hex(4)  # kept in every checkpoint, so a resumed run continues this W&B run

    # --- data -------------------------------------------------------------------------------------
    stream = StreamConfig(shards=cfg.shards, splits=list(cfg.train_splits), patch_size=cfg.patch_size,
                          patches_per_image=cfg.patches_per_image, quality=cfg.quality, rescale_p=cfg.rescale_p,
                          rotate_p=cfg.rotate_p, flip_p=cfg.flip_p, chroma_subsampling=cfg.chroma_subsampling,
                          grayscale=cfg.grayscale, shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled,
                          seed=cfg.seed)
    shared_epoch = SharedEpoch()
    loader = make_train_loader(stream, batch_size=cfg.batch_size, num_workers=cfg.num_workers, rank=rank,
                               world_size=world, shared_epoch=shared_epoch, pin_memory=device.type == "cuda",
                               epoch_patches=cfg.epoch_samples)
    batches_per_epoch = int(loader.batches_per_epoch)  # >= 1: the loader refuses to plan fewer

    # --- bookkeeping ------------------------------------------------------------------------------
    info = {"world_size": world, "distributed_type": str(accelerator.distributed_type),
            "mixed_precision": accelerator.mixed_precision, "device": str(device),
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "parameters": count_parameters(unwrap(model)), "gflops_per_megapixel": flops_per_pixel(unwrap(model)) / 1e3,
            "model": dataclasses.asdict(model_cfg), "batches_per_epoch": batches_per_epoch,
            "resumed_from": str(resume_from) if resume_from else None, "start_step": step}
    if main:
        dump_config(cfg, run_dir / "config.yaml")
        _write_json(run_dir / "run_info.json", info)
    if use_wandb:
        accelerator.init_trackers(cfg.wandb_project, config={**config_dict(cfg), **{f"run/{k}": v for k, v in info.items()
                                                                                      if not isinstance(v, dict)}},
                                  init_kwargs={"wandb": {"dir": str(run_dir), "name": cfg.run_name or run_dir.name,
                                                         "id": wandb_id, "resume": "allow"}})
    tracker = Tracker(accelerator, run_dir, use_wandb, start_step=step)  # drops rows logged after the checkpoint
    if note:
        say(note)
    say(f"training {model_cfg.preset} (C={model_cfg.channels}, N={model_cfg.units}, {info['parameters']:,} params) "
        f"on {world} process(es), {device}, {accelerator.mixed_precision}, {torch.get_num_threads()} thread(s) each; "
        f"{cfg.batch_size * cfg.grad_accum * world} patches/step; run dir {run_dir}")

    last_val: dict[str, float] = {}
    q_lo, q_hi = parse_quality(cfg.quality)

    def eval_net():
        return ema.model if ema is not None else unwrap(model)

    def export() -> None:
        if main:
            facts = {"quality": cfg.quality, "quality_range": [q_lo, q_hi], "steps": step,
                     "condition_on_quality": cfg.condition_on_quality, "train_patch_size": cfg.patch_size,
                     "ema_decay": cfg.ema_decay, "val_split": None if cfg.val_shards else cfg.val_split,
                     "val_shards": cfg.val_shards,
                     "val_psnr": {k[len("val/psnr_q"):]: v for k, v in last_val.items() if k.startswith("val/psnr_q")},
                     "val_gain": {k[len("val/gain_q"):]: v for k, v in last_val.items() if k.startswith("val/gain_q")}}
            export_weights(eval_net(), model_cfg, run_dir, facts)

    def checkpoint(batch_in_epoch: int) -> Path:
        state = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "nonfinite_total": nonfinite_total,
                 "world_size": world, "seed": cfg.seed, "wandb_id": wandb_id, "val": last_val}
        path = save_checkpoint(accelerator, ckpt_root, step, state, ema, cfg.keep_checkpoints, faults)
        export()
        say(f"step {step}: saved {path}")
        return path

    def run_validation(final: bool) -> None:
        nonlocal last_val
        t0 = time.perf_counter()
        results, panel = validate(eval_net(), cfg, accelerator, faults, with_ssim=final)
        last_val = results
        tracker.log({**results, "val/seconds": time.perf_counter() - t0}, step)
        if panel is not None:
            tracker.log_panel(panel, step, "JPEG | restored | clean")
        qs = " ".join(f"q{q}: {results[f'val/psnr_q{q}']:.2f} dB ({results[f'val/gain_q{q}']:+.2f})"
                      for q in cfg.val_qualities if f"val/psnr_q{q}" in results)
        say(f"step {step}: val {qs}" + (" [final, with SSIM]" if final else ""))

    # --- loop -------------------------------------------------------------------------------------
    stop = _StopRequest()
    shared_epoch.set_value(epoch)
    batches = iter(loader)
    batch_in_epoch = 0

    def next_batch():
        nonlocal epoch, batch_in_epoch
        if batch_in_epoch >= batches_per_epoch:
            epoch += 1
            shared_epoch.set_value(epoch)
            batch_in_epoch = 0  # the loader runs on into the next epoch (one iterator for the run)
        batch_in_epoch += 1
        try:
            return next(batches)
        except StopIteration:
            raise UserError(f"data loader ended after {batch_in_epoch - 1} of {batches_per_epoch} batches "
                            f"in epoch {epoch}") from None  # this rank only: _entry names the rank

    model.train()
    fp16 = accelerator.mixed_precision == "fp16"
    patches_per_step = cfg.batch_size * cfg.grad_accum * world
    consecutive_bad = 0
    stop_now = False
    window = {"loss": 0.0, "steps": 0, "wait": 0.0, "t0": time.perf_counter(), "grad_norm": 0.0, "pause": 0.0}
    while step < cfg.max_steps:
        lr = lr_at(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps,
                   min_ratio=cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            t_wait = time.perf_counter()
            deg, clean, q = next_batch()
            faults.maybe_sleep(rank)
            window["wait"] += time.perf_counter() - t_wait
            x = to_device_float(deg, device, cfg.channels_last)
            y = to_device_float(clean, device, cfg.channels_last)
            if faults.poison_batch(step, rank):
                x = x * float("nan")
            sync = nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    out = model(x, q.to(device) if cfg.condition_on_quality else None)
                loss = F.mse_loss(out.float(), y)
                accelerator.backward(loss / cfg.grad_accum)
            loss_sum += loss.detach()
        # one small all-reduce per step: every process learns whether any loss was non-finite,
        # the summed loss, and whether a stop was requested -- so all take the same branch
        flags = torch.stack([(~torch.isfinite(loss_sum)).float(), torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0),
                             torch.tensor(float(stop.requested), device=device)])
        flags = accelerator.reduce(flags, reduction="sum")
        bad, global_loss, stop_now = float(flags[0]) > 0, float(flags[1]) / (world * cfg.grad_accum), float(flags[2]) > 0
        grad_norm = float("nan")
        if not bad:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(),
                                                          cfg.clip_grad if cfg.clip_grad > 0 else float("inf")))
            bad = not fp16 and not math.isfinite(grad_norm)  # fp16: the loss scaler skips such steps itself
        if bad:
            optimizer.zero_grad(set_to_none=True)
            nonfinite_total += 1
            consecutive_bad += 1
            say(f"step {step}: non-finite loss or gradient, step skipped ({consecutive_bad} in a row, "
                f"{nonfinite_total} in total)")
            if consecutive_bad >= cfg.max_nonfinite:
                last = latest_checkpoint(ckpt_root)
                raise AgreedError(f"{consecutive_bad} non-finite losses in a row at step {step}: stopped; last good "
                                  f"checkpoint: {last or 'none'} (lower --lr, or check the data)")
            if stop_now:
                break
            continue
        consecutive_bad = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        step += 1
        faults.after_step(step, main, rank)
        window["loss"] += global_loss
        window["grad_norm"] += grad_norm
        window["steps"] += 1

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - window["t0"] - window["pause"]
            mean_loss = window["loss"] / window["steps"]
            values = {"train/loss": mean_loss, "train/psnr": 10 * math.log10(1.0 / max(mean_loss, 1e-12)),
                      "train/grad_norm": window["grad_norm"] / window["steps"], "lr": lr, "epoch": epoch,
                      "perf/patches_per_s": patches_per_step * window["steps"] / elapsed,
                      "perf/data_wait_frac": window["wait"] / elapsed, "train/nonfinite_skipped": nonfinite_total,
                      "world_size": world, **_peak_memory_gb(device)}
            if fp16:
                values["train/loss_scale"] = float(accelerator.scaler.get_scale())
            # skipped input, summed over ranks (every rank reaches this line at the same step)
            counts = loader.stats()
            skipped = accelerator.reduce(torch.tensor([float(counts["corrupt_samples"]), float(counts["bad_shards"])],
                                                      device=device), reduction="sum")
            values.update({"data/corrupt_samples": int(skipped[0]), "data/bad_shards": int(skipped[1]),
                           "data/missing_shards": int(counts["missing_shards"])})
            tracker.log(values, step)
            say(f"step {step}/{cfg.max_steps} loss {mean_loss:.5f} ({values['train/psnr']:.2f} dB) lr {lr:.2e} "
                f"{values['perf/patches_per_s']:.1f} patches/s, data wait {100 * values['perf/data_wait_frac']:.0f}%")
            window = {"loss": 0.0, "steps": 0, "wait": 0.0, "t0": time.perf_counter(), "grad_norm": 0.0, "pause": 0.0}
        t_pause = time.perf_counter()
        if step % cfg.val_every == 0 and step < cfg.max_steps:
            run_validation(final=False)
        if step % cfg.save_every == 0 and step < cfg.max_steps:
            checkpoint(batch_in_epoch)
        window["pause"] += time.perf_counter() - t_pause  # perf figures count training time only
        if stop_now:
            break

    if stop_now:
        checkpoint(batch_in_epoch)
        say(f"stop requested: saved step {step}; continue with --resume auto")
        tracker.close()
        return 0
    # DDP keeps replicas identical; check it (cheap, once) and record it for the user and the tests
    fingerprints = _rank_fingerprints(accelerator, unwrap(model))
    if main:
        info.update(end_step=step, weight_fingerprint_by_rank=fingerprints,
                    weights_identical_across_ranks=len(set(fingerprints)) == 1)
        _write_json(run_dir / "run_info.json", info)
    if len(set(fingerprints)) != 1:
        say(f"warning: model weights differ between processes: {fingerprints}")
    run_validation(final=True)
    checkpoint(batch_in_epoch)
    say(f"done: {step} steps; weights in {run_dir / 'model.safetensors'}")
    tracker.close()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    import logging

    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = parse_config(TrainConfig, argv, prog="accelerate launch launch/train.py",
                           description=__doc__.split("\n\n")[0], epilog=EXAMPLES)
    except UserError as exc:  # from the command line alone: the same on every process
        raise AgreedError(str(exc)) from None
    return train(cfg)


def _entry() -> int:
    """One line per error: an error every process raises together (:class:`AgreedError`) is printed
    once, by rank 0; any other one by each process that met it, as ``error: [rank R] ...`` when
    there are several processes (a :class:`PeerError` -- another process failed and says why --
    prints nothing). With several processes the failing one then exits at once: its peers may be
    blocked in a collective that will never complete, and the launcher tears them down when it
    sees a process exit."""
    try:
        return main()
    except UserError as exc:
        if os.environ.get("RESTORER_DEBUG"):
            raise
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if isinstance(exc, AgreedError):
            line = f"error: {exc}" if rank == 0 else None
        elif isinstance(exc, PeerError):
            line = None
        else:
            line = f"error: [rank {rank}] {exc}" if world > 1 else f"error: {exc}"
        if line:
            print(line, file=sys.stderr, flush=True)
        if world > 1:  # no atexit work (W&B, loader workers, the process group) that could wait on peers
            sys.stdout.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(_entry())
