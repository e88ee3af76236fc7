"""Two `accelerate launch` "machines" on 127.0.0.1: the README's multi-node command
(multinode.yaml, --num_machines 2, machine ranks 0 and 1, one CPU process each, gloo). One machine is
lost -- every process SIGKILLed, or every process SIGSTOPped (a hung host: its sockets stay open) --
and the other must exit within --dist-timeout plus a margin with one error line naming what it
waited for; then both machines run again and resume from the last checkpoint to --max-steps.
``accelerate launch --cpu`` with two machines (each would train alone) is refused with one line.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIT_ARGS, clean_env, error_lines, free_port
from machines import REPO, TRAIN, accelerate_cmd, machines

pytestmark = pytest.mark.slow

DIST_TIMEOUT = 20  # seconds (the default is 600)
MARGIN = 60  # a loaded 2-core machine; measured: the survivor's launcher exits 5-8 s after its timeout
RUN_ARGS = [*FIT_ARGS, "--num-workers", "1", "--save-every", "2", "--val-every", "1000", "--tracker", "none"]


def start_pair(start, tmp: Path, shards: Path, max_steps: int, tag: str):
    """Machines 0 and 1 of one run (one process each)."""
    args = ["--shards", str(shards), "--run-dir", str(tmp / "run"), *RUN_ARGS, "--max-steps", str(max_steps)]
    args += ["--dist-timeout", str(DIST_TIMEOUT)]
    port, env = free_port(), clean_env(tmp)
    return [
        start(
            f"machine {r}",
            accelerate_cmd(args, processes=2, port=port, machines=2, machine_rank=r),
            env,
            tmp / f"{tag}-machine{r}.log",
        )
        for r in (0, 1)
    ]


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_lost_machine_stops_the_other_in_bounded_time_then_both_resume(fit_shards, tmp_path, fault):
    run = tmp_path / "run"
    with machines() as start:
        first = start_pair(start, tmp_path, fit_shards, max_steps=10000, tag="first")
        first[0].wait_for(lambda: (run / "checkpoints" / "step-0000002").is_dir(), timeout=300)
        first[0].wait_for("step 3/", timeout=120)
        t0 = time.monotonic()
        first[1].signal(getattr(signal, fault), "tree")
        status = first[0].wait(DIST_TIMEOUT + MARGIN if fault == "SIGSTOP" else MARGIN)
        first[0].wait_gone(MARGIN)
        took = time.monotonic() - t0
        first[1].kill()  # SIGCONT + SIGKILL a frozen machine
        errors = error_lines_of(first[0].output())
        assert status != 0 and len(errors) == 1, first[0].tail()
        kind = "no answer within 20 s (--dist-timeout" if fault == "SIGSTOP" else "closed its connection"
        assert errors[0].startswith("error: [rank 0] lost another process after step ") and kind in errors[0]
        assert "during " in errors[0] and "restorer/train/" in errors[0]  # the collective and who called it
        print(f"{fault} of machine 1: machine 0 exited {took:.1f} s later: {errors[0]}")
        last = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))

        again = start_pair(start, tmp_path, fit_shards, max_steps=last + 2, tag="again")
        assert [m.wait(600) for m in again] == [0, 0], again[0].tail() + again[1].tail()
    out = again[0].output()
    assert f"resumed from {run / 'checkpoints' / f'step-{last:07d}'} at step {last}" in out
    assert f"done: {last + 2} steps" in out
    info = json.loads((run / "run_info.json").read_text())
    assert (info["machines"], info["processes_per_machine"], info["world_size"]) == (2, 1, 2)
    assert info["dist_timeout_s"] == DIST_TIMEOUT and info["weights_identical_across_ranks"]


def error_lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_cpu_flag_with_two_machines_is_refused(fit_shards, tmp_path):
    """`accelerate launch --cpu` starts each machine's process alone (no rank, no world size): refused."""
    env = {k: v for k, v in clean_env(tmp_path).items() if k != "ACCELERATE_USE_CPU"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_machines", "2", "--num_processes", "2"]
    cmd += ["--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    cmd += [str(TRAIN), "--shards", str(fit_shards), "--run-dir", str(tmp_path / "run"), *RUN_ARGS]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout + proc.stderr
    assert re.match(r"error: accelerate launch --cpu .*starts ONE process per machine", errors[0])
    assert not (tmp_path / "run").exists()  # nothing written
