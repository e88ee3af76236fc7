"""``train(cfg)``: the training run, read top to bottom, and the few steps it is made of.

Order of a run: speed choices and the Accelerator; where to start (resume, or nothing to do);
model, EMA, optimizer (prepared), the state to continue from; the loader (never prepared: each
process reads its own shards); compile (or eager); bookkeeping; the loop of optimizer steps with
logging, validation and checkpoints; at the end a weight check across processes, a final
validation with SSIM, a checkpoint and the exported weights.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from restorer.config import config_dict, dump_config
from restorer.data.workers import STOP_SIGNALS
from restorer.hardware import accelerate_precision
from restorer.train.checkpoint import find_resume, finished_at, remove_stale_temp, resume_state, save_and_export
from restorer.train.config import TrainConfig
from restorer.train.datapos import apply_global_batch, open_ledger, share_quarantine, start_data
from restorer.train.speed import SpeedChoices, choose_speed, compiled_forward, smoke_step, training_device_type
from restorer.train.state import TrainState, Window
from restorer.train.step import optimizer_step
from restorer.train.tracking import Tracker, code_version, peak_memory_gb, prepare_wandb, say, write_json
from restorer.train.validation import validate_and_log
from restorer.train.world import PROGRESS, process_group_kwargs, topology


def train(cfg: TrainConfig) -> int:
    from accelerate.utils import set_seed

    from accelerate import Accelerator
    from restorer.data import SharedEpoch
    from restorer.train.faults import Faults

    stop = StopRequest()  # from the start: a stop asked for during start-up is honoured at the first step
    run_dir, faults = Path(cfg.run_dir).resolve(), Faults.from_env()
    t_start = time.perf_counter()
    use_wandb = cfg.tracker == "wandb"
    note = prepare_wandb(run_dir) if use_wandb else None
    speed = choose_speed(cfg.mixed_precision, cfg.channels_last, cfg.compile, training_device_type())
    accelerator = Accelerator(
        cpu=training_device_type() == "cpu",
        mixed_precision=accelerate_precision(str(speed.precision.value)),
        log_with="wandb" if use_wandb else None,
        project_dir=str(run_dir),
        kwargs_handlers=[process_group_kwargs(cfg.dist_timeout)],
    )
    resume_from, finished = where_to_start(accelerator, cfg, run_dir)
    if finished:
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return 0

    set_seed(cfg.data.seed)
    apply_global_batch(cfg, accelerator.num_processes)
    channels_last = bool(speed.channels_last.value)
    model, ema, optimizer = prepare_training(cfg, accelerator, channels_last)
    state = resume_state(accelerator, resume_from, ema) if resume_from else TrainState()
    if use_wandb and state.wandb_id is None:
        import secrets

        state.wandb_id = secrets.token_hex(4)  # kept in every checkpoint: a resumed run continues this W&B run
    loader = make_loader(cfg, accelerator, SharedEpoch(0))
    for line in start_data(accelerator, cfg, loader, resume_from, state.saved):
        say(accelerator, line)
    if resume_from:
        pos = loader.position()
        say(accelerator, f"resumed from {resume_from} at step {state.step} (data epoch {pos.epoch}, batch {pos.done})")
    ledger = open_ledger(accelerator, cfg, loader, run_dir, state.step)
    bpe = int(loader.batches_per_epoch)
    forward, eager_why = compiled_forward(
        model,
        smoke_step(
            model,
            accelerator,
            batch_size=cfg.batch_size,
            in_channels=cfg.model.in_channels,
            patch_size=cfg.data.patch_size,
            channels_last=channels_last,
            condition_on_quality=cfg.model.condition_on_quality,
        ),
        bool(speed.compile.value),
    )
    info = run_info(
        accelerator,
        cfg,
        model,
        speed,
        compiled=forward is not model,
        batches_per_epoch=bpe,
        resumed_from=resume_from,
        start_step=state.step,
    )
    tracker = start_tracking(accelerator, cfg, run_dir, info, state)
    for line in (note, eager_why, f"speed: {speed.summary()}", start_line(accelerator, cfg, info)):
        if line:
            say(accelerator, line)

    window, saved_step = Window(), None
    batches = iter(loader)  # endless: epoch after epoch (restorer.data's loader contract)
    model.train()
    PROGRESS.state = state  # its step is what a lost-peer error line reports
    while state.step < cfg.max_steps:
        result = optimizer_step(
            model=model,
            forward=forward,
            optimizer=optimizer,
            accelerator=accelerator,
            ema=ema,
            batches=batches,
            state=state,
            cfg=cfg,
            batches_per_epoch=bpe,
            channels_last=channels_last,
            stop_requested=stop.requested,
            faults=faults,
            window=window,
            ckpt_root=run_dir / "checkpoints",
        )
        if ledger is not None:  # the batches of a skipped attempt belong to the step it tried
            ledger.record(state.step + (0 if result.taken else 1), loader.take_ledger())
        if result.taken and (state.step % cfg.log_every == 0 or state.step == cfg.max_steps):
            log_window(accelerator, tracker, loader, window, state, cfg, lr=result.lr)
            window = Window()
        t_pause = time.perf_counter()
        if result.taken and state.step % cfg.val_every == 0 and state.step < cfg.max_steps:
            state.last_val = validate_and_log(
                eval_net(model, ema),
                cfg,
                accelerator,
                faults,
                tracker,
                state.step,
                channels_last=channels_last,
                final=False,
            )
        if result.taken and state.step % cfg.save_every == 0 and state.step < cfg.max_steps:
            save_and_export(
                accelerator, cfg, state, model=model, ema=ema, run_dir=run_dir, loader=loader, faults=faults
            )
            saved_step = state.step
        window.pause += time.perf_counter() - t_pause  # perf figures count training time only
        if result.stop:
            break

    stopped = state.step < cfg.max_steps  # the loop ends early only on a stop every process agreed on
    if not stopped:
        info["wall_seconds"] = round(time.perf_counter() - t_start, 1)  # this segment (a resumed run: since resume)
        check_replicas(accelerator, model, info, run_dir, state.step)
        state.last_val = validate_and_log(
            eval_net(model, ema), cfg, accelerator, faults, tracker, state.step, channels_last=channels_last, final=True
        )
    if saved_step != state.step:  # a stop right after a periodic checkpoint does not write it twice
        save_and_export(accelerator, cfg, state, model=model, ema=ema, run_dir=run_dir, loader=loader, faults=faults)
    say(
        accelerator,
        f"stop requested: saved step {state.step}; continue with --resume auto"
        if stopped
        else f"done: {state.step} steps; weights in {run_dir / 'model.safetensors'}",
    )
    tracker.close()
    return 0


# --- the steps of a run ------------------------------------------------------------------------------


def where_to_start(accelerator, cfg: TrainConfig, run_dir: Path) -> tuple[Path | None, bool]:
    """Clean up after a run killed while saving, then: (the checkpoint to resume from or None for a
    fresh start, whether the run already finished -- nothing is written then). Checks that the
    validation split exists before any training."""
    from restorer.data import resolve_shards

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


def prepare_training(cfg: TrainConfig, accelerator, channels_last: bool):
    """(prepared model, EMA or None, prepared AdamW). The EMA copies the plain model before any
    wrapping; no LR scheduler object (the LR is a function of the step)."""
    from restorer.model import build_model
    from restorer.train.ema import EMA
    from restorer.train.init import init_from_weights

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(cfg.model_config())
    if cfg.init_weights:
        init_from_weights(model, cfg.model_config(), cfg.init_weights)
    model = model.to(memory_format=fmt)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        ema.model.to(accelerator.device, memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, ema, optimizer


def make_loader(cfg: TrainConfig, accelerator, shared_epoch):
    """This process's training loader: the one call of ``restorer.data.make_train_loader``."""
    from restorer.data import make_train_loader

    return make_train_loader(
        cfg.data,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        shared_epoch=shared_epoch,
        pin_memory=accelerator.device.type == "cuda",
        epoch_patches=cfg.epoch_patches,
    )


def eval_net(model, ema):
    """What validation and the exported weights use: the EMA model, else the plain model."""
    from restorer.train.ema import unwrap

    return ema.model if ema is not None else unwrap(model)


def run_info(
    accelerator,
    cfg: TrainConfig,
    model,
    speed: SpeedChoices,
    *,
    compiled: bool,
    batches_per_epoch: int,
    resumed_from: Path | None,
    start_step: int,
) -> dict[str, Any]:
    """What ``run_info.json`` records about this run (and W&B's config): world, speed choices and
    their reasons, model size."""
    import dataclasses

    from restorer.hardware import device_name
    from restorer.model import count_parameters, flops_per_pixel
    from restorer.train.ema import unwrap

    net = unwrap(model)
    choices = {
        name: choice.value
        for name, choice in (
            ("mixed_precision", speed.precision),
            ("channels_last", speed.channels_last),
            ("compile", speed.compile),
        )
    }
    return {
        "world_size": accelerator.num_processes,
        **topology(accelerator.num_processes),
        "dist_timeout_s": cfg.dist_timeout,
        "distributed_type": str(accelerator.distributed_type),
        **choices,
        "mixed_precision": accelerator.mixed_precision,
        "compiled": compiled,
        **{
            f"{name}_reason": choice.reason
            for name, choice in (
                ("mixed_precision", speed.precision),
                ("channels_last", speed.channels_last),
                ("compile", speed.compile),
            )
        },
        "device": str(accelerator.device),
        "device_name": device_name(accelerator.device),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "parameters": count_parameters(net),
        "gflops_per_megapixel": flops_per_pixel(net) / 1e3,
        "model": dataclasses.asdict(cfg.model_config()),
        "batches_per_epoch": batches_per_epoch,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "start_step": start_step,
        "code": code_version(),
    }


def start_tracking(accelerator, cfg: TrainConfig, run_dir: Path, info: dict[str, Any], state: TrainState) -> Tracker:
    """Write config.yaml and run_info.json, start W&B (config + run facts), open metrics.jsonl
    (dropping rows an earlier attempt logged after the checkpoint)."""
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
                    "id": state.wandb_id,
                    "resume": "allow",
                }
            },
        )
    return Tracker(accelerator, run_dir, use_wandb, start_step=state.step)


def start_line(accelerator, cfg: TrainConfig, info: dict[str, Any]) -> str:
    m = cfg.model_config()
    return (
        f"training {m.preset} (C={m.channels}, N={m.units}, {info['parameters']:,} params) on "
        f"{accelerator.num_processes} process(es), {accelerator.device}, {accelerator.mixed_precision}, "
        f"{torch.get_num_threads()} thread(s) each; {cfg.batch_size * cfg.grad_accum * accelerator.num_processes} "
        f"patches/step; run dir {Path(cfg.run_dir).resolve()}"
    )


def log_window(
    accelerator,
    tracker: Tracker,
    loader,
    window: Window,
    state: TrainState,
    cfg: TrainConfig,
    *,
    lr: float,
) -> dict[str, Any]:
    """Log the figures of ``window`` at ``state.step`` (every process calls it: the skipped-input
    counts are summed over processes, and the shards quarantined since the last call are shared)
    and print one line; returns what was logged."""
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
    tracker.log(values, state.step)
    say(
        accelerator,
        f"step {state.step}/{cfg.max_steps} loss {values['train/loss']:.5f} ({values['train/psnr']:.2f} dB) "
        f"lr {lr:.2e} {values['perf/patches_per_s']:.1f} patches/s, "
        f"data wait {100 * values['perf/data_wait_frac']:.0f}%",
    )
    return values


def check_replicas(accelerator, model, info: dict[str, Any], run_dir: Path, step: int) -> list[str]:
    """DDP keeps replicas identical: check it (once, at the end) and record it in run_info.json."""
    import hashlib

    from restorer.train.ema import unwrap

    digest = hashlib.sha256()
    for p in unwrap(model).parameters():
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    local = torch.tensor(list(digest.digest()[:8]), dtype=torch.int64, device=accelerator.device)
    every = accelerator.gather(local).cpu().view(-1, 8)
    fingerprints = [bytes(int(b) for b in row).hex() for row in every]
    if accelerator.is_main_process:
        info.update(
            end_step=step,
            weight_fingerprint_by_rank=fingerprints,
            weights_identical_across_ranks=len(set(fingerprints)) == 1,
        )
        write_json(run_dir / "run_info.json", info)
    if len(set(fingerprints)) != 1:
        say(accelerator, f"warning: model weights differ between processes: {fingerprints}")
    return fingerprints


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption, torchrun forwarding a signal, the launcher's death: see
    restorer.train.world) set a flag; processes agree on it at the next step (the step's all-reduce),
    save one checkpoint and exit 0."""

    def __init__(self):
        self.requested = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True
