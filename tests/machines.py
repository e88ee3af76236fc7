"""Multi-process test plumbing: start `accelerate launch` "machines" on 127.0.0.1, signal their
process trees, wait with bounded time, read their output; every process a test started is ended at
the end, even on failure (stopped ones are continued first).

A machine's output goes to a file (``Machine.log``), not a pipe: its training processes may outlive
the launcher (that is what some tests check), and a pipe would keep the reader waiting for them.
The processes of a machine are remembered as they are seen (``Machine.tree``), so that those orphaned
by a dead launcher (torchrun starts each in its own session) are still found, signalled and ended.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
ACCEL = REPO / "launch" / "accelerate"


def accelerate_cmd(
    script_args: list[str], *, processes: int, port: int, machines: int = 1, machine_rank: int = 0
) -> list[str]:
    """``accelerate launch`` of launch/train.py: cpu2.yaml on one machine, else the README's
    multi-node command (multinode.yaml, machine ``machine_rank`` of ``machines``, main on 127.0.0.1);
    ``processes`` is the total over all machines."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if machines == 1:
        cmd += ["--config_file", str(ACCEL / "cpu2.yaml"), "--num_processes", str(processes)]
    else:
        cmd += ["--config_file", str(ACCEL / "multinode.yaml"), "--num_machines", str(machines)]
        cmd += ["--num_processes", str(processes), "--machine_rank", str(machine_rank)]
        cmd += ["--main_process_ip", "127.0.0.1"]
    return [*cmd, "--main_process_port", str(port), str(TRAIN), *script_args]


class Machine:
    """One launcher process (in a new session) and every process seen under it."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path):
        self.name, self.log = name, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started = time.monotonic()
        self.seen: dict[int, psutil.Process] = {}
        self.tree()

    def tree(self) -> list[psutil.Process]:
        """The launcher's descendants now, plus those seen before that still run (orphans)."""
        try:
            launcher = psutil.Process(self.proc.pid)
            for p in [launcher, *launcher.children(recursive=True)]:
                self.seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        for p in list(self.seen.values()):  # orphans' children too
            try:
                for c in p.children(recursive=True):
                    self.seen.setdefault(c.pid, c)
            except psutil.NoSuchProcess:
                pass
        return [p for p in self.seen.values() if _alive(p)]

    def ranks(self) -> list[psutil.Process]:
        """The training processes (direct children of the launcher)."""
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int, who: str = "launcher") -> None:
        """Send ``sig`` to the launcher, to the ranks, or to the whole tree (as SLURM does)."""
        targets = {"launcher": lambda: [psutil.Process(self.proc.pid)], "ranks": self.ranks, "tree": self.tree}[who]()
        for p in targets:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str | Callable[[], bool], timeout: float) -> float:
        """Wait until the output contains ``what`` (or ``what()`` is true); seconds waited. Fails
        the test with the output tail on timeout or if the launcher exits first."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            self.tree()
            if what() if callable(what) else what in self.output():
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before {what!r}\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no {what!r} within {timeout:.0f} s\n{self.tail()}")

    def wait(self, timeout: float) -> int:
        """The launcher's exit status (negative: killed by that signal); fails after ``timeout`` s."""
        t0 = time.monotonic()
        while self.proc.poll() is None and time.monotonic() - t0 < timeout:
            self.tree()
            time.sleep(0.2)
        if self.proc.poll() is None:
            raise AssertionError(f"{self.name}: still running after {timeout:.0f} s\n{self.tail()}")
        return self.proc.returncode

    def wait_gone(self, timeout: float) -> float:
        """Wait until every process of the machine (orphans included) has exited; seconds waited."""
        t0 = time.monotonic()
        while self.tree() and time.monotonic() - t0 < timeout:
            time.sleep(0.2)
        left = self.tree()
        if left:
            raise AssertionError(f"{self.name}: still running after {timeout:.0f} s: {_names(left)}\n{self.tail()}")
        return time.monotonic() - t0

    def kill(self) -> None:
        """End every process of the machine: SIGCONT (a stopped one), then SIGKILL."""
        for sig in (signal.SIGCONT, signal.SIGKILL):
            for p in self.tree():
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        psutil.wait_procs(list(self.seen.values()), timeout=10)

    def tail(self, chars: int = 4000) -> str:
        return f"--- {self.name} ({self.log}) ---\n{self.output()[-chars:]}"


@contextmanager
def machines() -> Iterator[Callable[..., Machine]]:
    """``with machines() as start: m = start(name, cmd, env, log)``: every machine is killed at the end."""
    started: list[Machine] = []

    def start(name: str, cmd: list[str], env: dict[str, str], log: Path) -> Machine:
        started.append(Machine(name, cmd, env, log))
        return started[-1]

    try:
        yield start
    finally:
        for m in started:
            m.kill()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _names(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
        except psutil.Error:
            out.append(str(p.pid))
    return "; ".join(out)
