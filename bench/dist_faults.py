#!/usr/bin/env python
"""Stops and lost machines of a real multi-process CPU run, timed: what the README's "Multi-node"
section quotes.

1. A stop signal to a 2-process run (accelerate launch, cpu2.yaml, one loader worker each), each way
   it can arrive: seconds from the signal until the training processes have saved and exited, and
   until the launcher has exited (with its exit status).
2. Two machines on 127.0.0.1 (multinode.yaml, one process each, --dist-timeout T): machine 1's
   processes are SIGKILLed, or SIGSTOPped (a frozen host); seconds until machine 0 has exited.

A tiny model on tiny shards (tests/conftest.py), so the figures are the stop machinery's, not a big
checkpoint's. The process plumbing is tests/machines.py.

examples:
  python bench/dist_faults.py                 # ~3 min on 2 idle cores
  python bench/dist_faults.py --dist-timeout 30 --skip-signals

The last line is ``frozen_machine_exit_s: <s>`` (seconds from machine 1's SIGSTOP until machine 0 has exited).
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import FIT_ARGS, clean_env, free_port, write_shards  # noqa: E402
from machines import accelerate_cmd, machines  # noqa: E402

from benchcli import parser as bench_parser  # noqa: E402

ARGS = [*FIT_ARGS, "--num-workers", "1", "--val-every", "100000", "--tracker", "none", "--max-steps", "100000"]
WAYS = [("SIGTERM", "launcher"), ("SIGUSR1", "launcher"), ("SIGKILL", "launcher"), ("SIGTERM", "tree")]


def exit_times(m, t0: float, limit: float) -> tuple[float, float]:
    """(seconds until every process but the launcher is gone, seconds until the launcher is gone)."""
    ranks_done = launcher_done = None
    while time.monotonic() - t0 < limit and (ranks_done is None or launcher_done is None):
        alive = m.tree()
        if ranks_done is None and all(p.pid == m.proc.pid for p in alive):
            ranks_done = time.monotonic() - t0
        if launcher_done is None and m.proc.poll() is not None:
            launcher_done = time.monotonic() - t0
        time.sleep(0.05)
    return ranks_done or float("nan"), launcher_done or float("nan")


def time_signals(shards: Path, tmp: Path) -> None:
    for sig_name, who in WAYS:
        run = tmp / f"sig-{sig_name}-{who}"
        args = ["--shards", str(shards), "--run-dir", str(run), *ARGS, "--save-every", "100000"]
        with machines() as start:
            cmd = accelerate_cmd(args, processes=2, port=free_port())
            m = start("run", cmd, clean_env(tmp), tmp / f"{run.name}.log")
            m.wait_for("step 2/", 600)
            t0 = time.monotonic()
            m.signal(getattr(signal, sig_name), who)
            ranks, launcher = exit_times(m, t0, 300)
            saved = "stop requested" in m.output()
        print(
            f"{sig_name} to the {who}: training processes saved={saved} and exited {ranks:.1f} s after the signal, "
            f"launcher exited {launcher:.1f} s after it (status {m.proc.returncode})",
            flush=True,
        )


def time_lost_machine(shards: Path, tmp: Path, fault: str, timeout: float) -> float:
    run = tmp / f"lost-{fault}"
    args = ["--shards", str(shards), "--run-dir", str(run), *ARGS, "--save-every", "2", "--dist-timeout", str(timeout)]
    port, env = free_port(), clean_env(tmp)
    with machines() as start:
        pair = [
            start(
                f"m{r}",
                accelerate_cmd(args, processes=2, port=port, machines=2, machine_rank=r),
                env,
                tmp / f"{run.name}-{r}.log",
            )
            for r in (0, 1)
        ]
        pair[0].wait_for("step 3/", 600)
        pair[1].tree()
        t0 = time.monotonic()
        pair[1].signal(getattr(signal, fault), "tree")
        _, took = exit_times(pair[0], t0, timeout + 600)
        line = next((ln for ln in pair[0].output().splitlines() if ln.startswith("error:")), "(no error line)")
    print(f"{fault} of machine 1: machine 0 exited {took:.1f} s later (--dist-timeout {timeout:g}): {line}", flush=True)
    return took


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--dist-timeout", type=float, default=20, help="seconds (default 20)")
    parser.add_argument("--skip-signals", action="store_true", help="only the lost-machine timings")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dist_faults-") as td:
        tmp = Path(td)
        shards = write_shards(tmp / "shards", splits={"train": 4, "val": 2}, samples_per_shard=2, tile=48)
        if not args.skip_signals:
            time_signals(shards, tmp)
        time_lost_machine(shards, tmp, "SIGKILL", args.dist_timeout)
        frozen = time_lost_machine(shards, tmp, "SIGSTOP", args.dist_timeout)
    print(f"frozen_machine_exit_s: {frozen:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
