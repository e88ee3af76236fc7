"""Stopping a real 2-process run (accelerate launch, cpu2.yaml, gloo, one DataLoader worker per
process) with a signal, every way it arrives: to the launcher alone, to the training processes
alone, or to every process of the job as SLURM does. Each time every rank must save ONE checkpoint
at the next step boundary and exit, printing "stop requested", with no process left behind; the
run then resumes from it to --max-steps.

What the launcher (torchrun's agent inside ``accelerate launch``) does itself, measured and pinned
here: it forwards SIGTERM to each training process's group, then re-raises it (exit status 1 and a
``SignalException`` traceback); SIGUSR1 kills it (it does not handle it); a SIGKILL kills it alone.
In the last two cases the training processes learn it from the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import FIT_ARGS, clean_env, free_port
from machines import accelerate_cmd, machines

from restorer.train.checkpoint import verify_checkpoint

pytestmark = pytest.mark.slow

RUN_ARGS = [*FIT_ARGS, "--num-workers", "1", "--save-every", "1000", "--val-every", "1000"]
STOP_BOUND_S = 120  # signal -> every process gone; measured 1-9 s on a loaded 2-core machine

# (signal, who gets it, the launcher's exit status: torchrun's own behaviour)
CASES = [
    ("SIGTERM", "launcher", 1),  # forwarded to the process groups (DataLoader workers included)
    ("SIGUSR1", "launcher", -signal.SIGUSR1),  # the launcher dies; its children get SIGTERM
    ("SIGKILL", "launcher", -signal.SIGKILL),  # the same: its children never outlive it
    ("SIGTERM", "tree", 1),  # SLURM: every process, W&B's service too (--tracker wandb)
    ("SIGUSR1", "tree", -signal.SIGUSR1),
    ("SIGTERM", "ranks", 0),  # the training processes only: they exit 0, so does the launcher
]


def start_run(start, tmp: Path, shards: Path, *extra: str, max_steps: int = 10000, name: str = "run"):
    args = ["--shards", str(shards), "--run-dir", str(tmp / "run"), *RUN_ARGS, "--max-steps", str(max_steps), *extra]
    return start(name, accelerate_cmd(args, processes=2, port=free_port()), clean_env(tmp), tmp / f"{name}.log")


@pytest.mark.parametrize("sig_name, who, launcher_status", CASES, ids=[f"{s}-{w}" for s, w, _ in CASES])
def test_signal_saves_one_checkpoint_and_the_run_resumes(fit_shards, tmp_path, sig_name, who, launcher_status):
    tracker = "wandb" if (sig_name, who) == ("SIGTERM", "tree") else "none"
    resume = who == "tree" or sig_name == "SIGTERM" and who == "launcher"  # the others save the same way
    with machines() as start:
        m = start_run(start, tmp_path, fit_shards, "--tracker", tracker)
        m.wait_for("step 2/", timeout=300)
        t0 = time.monotonic()
        m.signal(getattr(signal, sig_name), who)
        assert m.wait(STOP_BOUND_S) == launcher_status, m.tail()
        m.wait_gone(STOP_BOUND_S)  # no training process or loader worker outlives the launcher
        elapsed = time.monotonic() - t0
        step = check_stopped(m, tmp_path / "run", wandb=tracker == "wandb")
        print(f"{sig_name} to {who}: saved step {step}, every process gone {elapsed:.1f} s after the signal")
        if resume:
            again = start_run(start, tmp_path, fit_shards, "--tracker", tracker, max_steps=step + 2, name="resume")
            assert again.wait(600) == 0, again.tail()
    if resume:
        out = again.output()
        assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step-{step:07d}'} at step {step}" in out
        assert f"done: {step + 2} steps" in out
        info = json.loads((tmp_path / "run" / "run_info.json").read_text())
        assert (info["machines"], info["processes_per_machine"], info["world_size"]) == (1, 2, 2)
        assert info["launcher"] == "torchrun" and info["end_step"] == step + 2


def check_stopped(m, run: Path, *, wandb: bool) -> int:
    """The stopped run's output and checkpoints are as promised; returns the saved step."""
    out = m.output()
    saved = re.findall(r"stop requested: saved step (\d+); continue with --resume auto", out)
    assert len(saved) == 1, m.tail()
    step = int(saved[0])
    assert step >= 2 and "DataLoader worker" not in out, m.tail()
    assert not re.search(r"^\[rank\d+\]:", out, re.MULTILINE), m.tail()  # no traceback from a training process
    assert "forcefully exiting" not in out  # the launcher did not have to SIGKILL anyone
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == [f"step-{step:07d}"]  # one new, complete checkpoint
    assert verify_checkpoint(checkpoints[0])["step"] == step
    if wandb:  # W&B's service was killed too: one warning, training went on
        assert "warning: W&B stopped working" in out
    return step
