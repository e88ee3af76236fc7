"""``train(cfg)``: the training run, read top to bottom, and the few steps it is made of.

Order of a run: speed choices and the Accelerator; where to start (resume, or nothing to do);
model, EMA, optimizer (prepared), the state to continue from; the loader (never prepared: each
process reads its own shards); compile (or eager); bookkeeping; the loop of optimizer steps with
logging, validation and checkpoints; at the end a weight check across processes, a final
validation with SSIM, a checkpoint and the exported weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from restorer.config import config_dict, dump_config
from restorer.data.loader import LoaderOptions, SharedEpoch, TrainLoader, make_train_loader
from restorer.data.shards import resolve_shards
from restorer.hardware import accelerate_precision, device_name
from restorer.model import build_model, count_parameters, flops_per_pixel
from restorer.train.checkpoint import find_resume, finished_at, remove_stale_temp, resume_state, save_and_export
from restorer.train.config import TrainConfig
from restorer.train.context import TrainContext, with_faults
from restorer.train.datapos import apply_global_batch, open_ledger, share_quarantine, start_data
from restorer.train.ema import EMA, unwrap
from restorer.train.faults import Faults
from restorer.train.init import init_from_weights
from restorer.train.speed import SpeedChoices, choose_speed, compiled_forward, smoke_step, training_device_type
from restorer.train.state import TrainState, Window
from restorer.train.step import optimizer_step
from restorer.train.tracking import Tracker, code_version, peak_memory_gb, prepare_wandb, say, write_json
from restorer.train.validation import validate_and_log
from restorer.train.world import PROGRESS, StopRequest, process_group_kwargs, topology


def train(cfg: TrainConfig) -> int:
    stop = StopRequest().listen()  # from the start: a stop asked for during start-up is honoured at the first step
    faults, t_start = Faults.from_env(), time.perf_counter()
    run_dir = Path(cfg.run_dir).resolve()
    note = prepare_wandb(run_dir) if cfg.tracker == "wandb" else None
    speed = choose_speed(cfg.mixed_precision, cfg.channels_last, cfg.compile, training_device_type())
    accelerator = make_accelerator(cfg, speed, run_dir)
    resume_from, finished = where_to_start(accelerator, cfg, run_dir)
    if finished:
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return 0

    ctx = start_run(cfg, accelerator, run_dir, bool(speed.channels_last.value), resume_from)
    ctx.stop = stop
    ctx.forward, eager_why = compiled_forward(ctx.model, smoke_step(ctx), bool(speed.compile.value))
    info = run_info(ctx, speed, compiled=ctx.forward is not ctx.model, resumed_from=resume_from)
    ctx.tracker = start_tracking(ctx, info)
    for line in (note, eager_why, f"speed: {speed.summary()}", start_line(ctx, info)):
        if line:
            say(accelerator, line)
    ctx = with_faults(ctx, faults)
    saved_step = run_steps(ctx)
    finish(ctx, info, time.perf_counter() - t_start, saved_step)
    return 0


# --- the steps of a run ------------------------------------------------------------------------------


def make_accelerator(cfg: TrainConfig, speed: SpeedChoices, run_dir: Path) -> Accelerator:
    """The Accelerator of the speed choices (CPU DDP over gloo when there is no GPU)."""
    return Accelerator(
        cpu=training_device_type() == "cpu",
        mixed_precision=accelerate_precision(str(speed.precision.value)),
        log_with="wandb" if cfg.tracker == "wandb" else None,
        project_dir=str(run_dir),
        kwargs_handlers=[process_group_kwargs(cfg.dist_timeout)],
    )


def where_to_start(accelerator, cfg: TrainConfig, run_dir: Path) -> tuple[Path | None, bool]:
    """Clean up after a run killed while saving, then: (the checkpoint to resume from or None for a
    fresh start, whether the run already finished -- nothing is written then). Checks that the
    validation split exists before any training."""
    ckpt_root = run_dir / "checkpoints"
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temp(ckpt_root):
            say(accelerator, f"removed incomplete checkpoint {stale} (the run was stopped while saving it)")
    accelerator.wait_for_everyone()
    resume_from = find_resume(cfg.resume, ckpt_root)
    done = finished_at(resume_from, run_dir, cfg.max_steps) if resume_from is not None else None
    if done is not None:
        say(
            accelerator,
            f"nothing to do: {resume_from} is at step {done} (--max-steps {cfg.max_steps}) and "
            f"{run_dir / 'model.safetensors'} holds its weights; raise --max-steps to train on",
        )
        return resume_from, True
    val_spec, val_split = cfg.val_source()  # a missing val split would otherwise surface at the first validation
    resolve_shards(val_spec, None if val_split is None else [val_split])
    return resume_from, False


def start_run(
    cfg: TrainConfig, accelerator: Accelerator, run_dir: Path, channels_last: bool, resume_from: Path | None
) -> TrainContext:
    """Seed, model, EMA, optimizer, the state to continue from, the loader at its data position and
    the ledger: the run's context (no forward, tracker or stop request yet)."""
    set_seed(cfg.data.seed)
    apply_global_batch(cfg, accelerator.num_processes)
    model, ema, optimizer = prepare_training(cfg, accelerator, channels_last)
    state = resume_state(accelerator, resume_from, ema) if resume_from else TrainState()
    if cfg.tracker == "wandb" and state.wandb_id is None:
        state.wandb_id = secrets.token_hex(4)  # kept in every checkpoint: a resumed run continues this W&B run
    loader = make_loader(cfg, accelerator, SharedEpoch(0))
    for line in start_data(accelerator, cfg, loader, resume_from, state.saved):
        say(accelerator, line)
    if resume_from:
        pos = loader.position()
        say(accelerator, f"resumed from {resume_from} at step {state.step} (data epoch {pos.epoch}, batch {pos.done})")
    ledger = open_ledger(accelerator, cfg, loader, run_dir, state.step)
    return TrainContext(
        accelerator, cfg, run_dir, model, ema, optimizer, loader, channels_last, state=state, ledger=ledger
    )


def prepare_training(cfg: TrainConfig, accelerator: Accelerator, channels_last: bool):
    """(prepared model, EMA or None, prepared AdamW). The EMA copies the plain model before any
    wrapping; no LR scheduler object (the LR is a function of the step)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(cfg.model_config())
    if cfg.init_weights:
        init_from_weights(model, cfg.model_config(), cfg.init_weights)
    model = model.to(memory_format=fmt)  # type: ignore[call-overload]  # torch's stubs omit memory_format
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        ema.model.to(accelerator.device, memory_format=fmt)  # type: ignore[call-overload]  # as above
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, ema, optimizer


def make_loader(cfg: TrainConfig, accelerator: Accelerator, shared_epoch: SharedEpoch) -> TrainLoader:
    """This process's training loader: the one call of ``restorer.data.make_train_loader``."""
    options = LoaderOptions(
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        shared_epoch=shared_epoch,
        pin_memory=accelerator.device.type == "cuda",
        epoch_patches=cfg.epoch_patches,
    )
    return make_train_loader(cfg.data, options)


SPEED_NAMES = (("mixed_precision", "precision"), ("channels_last", "channels_last"), ("compile", "compile"))


def run_info(ctx: TrainContext, speed: SpeedChoices, *, compiled: bool, resumed_from: Path | None) -> dict[str, Any]:
    """What ``run_info.json`` records about this run (and W&B's config): world, speed choices and
    their reasons, model size."""
    accelerator, cfg = ctx.accelerator, ctx.cfg
    net = unwrap(ctx.model)
    choices = {name: getattr(speed, attr) for name, attr in SPEED_NAMES}
    return {
        "world_size": accelerator.num_processes,
        **topology(accelerator.num_processes),
        "dist_timeout_s": cfg.dist_timeout,
        "distributed_type": str(accelerator.distributed_type),
        **{name: choice.value for name, choice in choices.items()},
        "mixed_precision": accelerator.mixed_precision,
        "compiled": compiled,
        **{f"{name}_reason": choice.reason for name, choice in choices.items()},
        "device": str(accelerator.device),
        "device_name": device_name(accelerator.device),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "parameters": count_parameters(net),
        "gflops_per_megapixel": flops_per_pixel(net) / 1e3,
        "model": dataclasses.asdict(cfg.model_config()),
        "batches_per_epoch": ctx.batches_per_epoch,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "start_step": ctx.state.step,
        "code": code_version(),
    }


def start_tracking(ctx: TrainContext, info: dict[str, Any]) -> Tracker:
    """Write config.yaml and run_info.json, start W&B (config + run facts), open metrics.jsonl
    (dropping rows an earlier attempt logged after the checkpoint)."""
    accelerator, cfg, run_dir = ctx.accelerator, ctx.cfg, ctx.run_dir
    use_wandb = cfg.tracker == "wandb"
    if accelerator.is_main_process:
        dump_config(cfg, run_dir / "config.yaml")
        write_json(run_dir / "run_info.json", info)
    if use_wandb:
        facts = {f"run/{k}": v for k, v in info.items() if not isinstance(v, dict)}
        accelerator.init_trackers(
            cfg.wandb_project,
            config={**config_dict(cfg), **facts},
            init_kwargs={
                "wandb": {
                    "dir": str(run_dir),
                    "name": cfg.run_name or run_dir.name,
                    "id": ctx.state.wandb_id,
                    "resume": "allow",
                }
            },
        )
    return Tracker(accelerator, run_dir, use_wandb, start_step=ctx.state.step)


def start_line(ctx: TrainContext, info: dict[str, Any]) -> str:
    accelerator, cfg = ctx.accelerator, ctx.cfg
    m = cfg.model_config()
    return (
        f"training {m.preset} (C={m.channels}, N={m.units}, {info['parameters']:,} params) on "
        f"{accelerator.num_processes} process(es), {accelerator.device}, {accelerator.mixed_precision}, "
        f"{torch.get_num_threads()} thread(s) each; {cfg.batch_size * cfg.grad_accum * accelerator.num_processes} "
        f"patches/step; run dir {ctx.run_dir}"
    )


def run_steps(ctx: TrainContext) -> int | None:
    """The loop of optimizer steps with logging, validation and periodic checkpoints, until
    ``--max-steps`` or a stop every process agreed on; returns the step of the last checkpoint written."""
    cfg, state, accelerator = ctx.cfg, ctx.state, ctx.accelerator
    window, saved_step = Window(), None
    ctx.model.train()
    PROGRESS.state = state  # its step is what a lost-peer error line reports
    while state.step < cfg.max_steps:
        result = optimizer_step(ctx)
        if result.stop:
            ctx.stop.hold()  # agreed: a further signal must not interrupt the checkpoint
        if result.taken and ctx.faults is not None:
            ctx.faults.after_step(state.step, accelerator.is_main_process, accelerator.process_index)
        window.add(result)
        if ctx.ledger is not None:  # the batches of a skipped attempt belong to the step it tried
            ctx.ledger.record(state.step + (0 if result.taken else 1), ctx.loader.take_ledger())
        if result.taken and (state.step % cfg.log_every == 0 or state.step == cfg.max_steps):
            log_window(ctx, window, lr=result.lr)
            window = Window()
        t_pause = time.perf_counter()
        if result.taken and state.step % cfg.val_every == 0 and state.step < cfg.max_steps:
            state.last_val = validate_and_log(ctx, final=False)
        if result.taken and state.step % cfg.save_every == 0 and state.step < cfg.max_steps:
            save_and_export(ctx)
            saved_step = state.step
        window.pause += time.perf_counter() - t_pause  # perf figures count training time only
        if result.stop:
            break
    return saved_step


def finish(ctx: TrainContext, info: dict[str, Any], seconds: float, saved_step: int | None) -> None:
    """After the loop: a finished run checks its replicas and validates with SSIM; any run saves
    its last step (unless the loop just did) and says where it stands."""
    cfg, state = ctx.cfg, ctx.state
    stopped = state.step < cfg.max_steps  # the loop ends early only on a stop every process agreed on
    if not stopped:
        info["wall_seconds"] = round(seconds, 1)  # this segment (a resumed run: since resume)
        check_replicas(ctx, info)
        state.last_val = validate_and_log(ctx, final=True)
    if saved_step != state.step:  # a stop right after a periodic checkpoint does not write it twice
        save_and_export(ctx)
    say(
        ctx.accelerator,
        f"stop requested: saved step {state.step}; continue with --resume auto"
        if stopped
        else f"done: {state.step} steps; weights in {ctx.run_dir / 'model.safetensors'}",
    )
    if ctx.tracker is not None:
        ctx.tracker.close()


def log_window(ctx: TrainContext, window: Window, *, lr: float) -> dict[str, Any]:
    """Log the figures of ``window`` at ``ctx.state.step`` (every process calls it: the skipped-input
    counts are summed over processes, and the shards quarantined since the last call are shared)
    and print one line; returns what was logged."""
    accelerator, cfg, loader, state = ctx.accelerator, ctx.cfg, ctx.loader, ctx.state
    world = accelerator.num_processes
    values: dict[str, Any] = {
        **window.figures(cfg.batch_size * cfg.grad_accum * world),
        "lr": lr,
        "epoch": loader.epoch,
        "train/nonfinite_skipped": state.nonfinite_total,
        "world_size": world,
        **peak_memory_gb(accelerator.device),
    }
    if accelerator.mixed_precision == "fp16":
        values["train/loss_scale"] = float(accelerator.scaler.get_scale())
    share_quarantine(accelerator, loader)
    counts = loader.stats()
    names = ("corrupt_samples", "bad_shards", "missing_shards", "quarantined_shards")
    skipped = accelerator.reduce(
        torch.tensor([float(counts[n]) for n in names], device=accelerator.device), reduction="sum"
    )
    values.update({f"data/{n}": int(v) for n, v in zip(names, skipped.tolist())})
    if ctx.tracker is not None:
        ctx.tracker.log(values, state.step)
    say(
        accelerator,
        f"step {state.step}/{cfg.max_steps} loss {values['train/loss']:.5f} ({values['train/psnr']:.2f} dB) "
        f"lr {lr:.2e} {values['perf/patches_per_s']:.1f} patches/s, "
        f"data wait {100 * values['perf/data_wait_frac']:.0f}%",
    )
    return values


def check_replicas(ctx: TrainContext, info: dict[str, Any]) -> list[str]:
    """DDP keeps replicas identical: check it (once, at the end) and record it in run_info.json."""
    accelerator = ctx.accelerator
    digest = hashlib.sha256()
    for p in unwrap(ctx.model).parameters():
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    local = torch.tensor(list(digest.digest()[:8]), dtype=torch.int64, device=accelerator.device)
    every = accelerator.gather(local).cpu().view(-1, 8)
    fingerprints = [bytes(int(b) for b in row).hex() for row in every]
    if accelerator.is_main_process:
        info.update(
            end_step=ctx.state.step,
            weight_fingerprint_by_rank=fingerprints,
            weights_identical_across_ranks=len(set(fingerprints)) == 1,
        )
        write_json(ctx.run_dir / "run_info.json", info)
    if len(set(fingerprints)) != 1:
        say(accelerator, f"warning: model weights differ between processes: {fingerprints}")
    return fingerprints
