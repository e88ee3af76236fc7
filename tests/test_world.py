"""restorer.train.world: launch facts from the launcher's environment, the refusal of accelerate's
one-process launcher with several machines, the tie of a process to its launcher (real processes,
real SIGKILL), the process-group timeout option, and the one line a lost peer produces (real gloo
errors from a 2-process group whose peer dies or freezes)."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import free_port

from restorer.config import parse_config
from restorer.errors import UserError
from restorer.train.config import TrainConfig
from restorer.train.world import PROGRESS, lone_cpu_launch, lost_peer, process_group_kwargs, topology

# what accelerate 1.15 + torch 2.13 set, measured (2 machines x 2 processes; --cpu on 2 machines)
TORCHRUN = {
    "ACCELERATE_USE_CPU": "true",
    "MASTER_ADDR": "127.0.0.1",
    "WORLD_SIZE": "4",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "TORCHELASTIC_RUN_ID": "none",
    "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
}
SIMPLE_LAUNCHER = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_topology_from_the_launchers_environment():
    assert topology(4, TORCHRUN) == {
        "machines": 2,
        "processes_per_machine": 2,
        "launcher": "torchrun",
        "launcher_forwards_signals": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
    }
    alone = topology(1, {})
    assert (alone["machines"], alone["processes_per_machine"], alone["launcher"]) == (1, 1, "none")


def test_only_the_lone_cpu_launch_is_refused():
    line = lone_cpu_launch(SIMPLE_LAUNCHER)
    assert line and "--cpu" in line and "multinode.yaml" in line and "\n" not in line
    assert lone_cpu_launch(TORCHRUN) is None
    assert lone_cpu_launch({"ACCELERATE_USE_CPU": "True"}) is None  # --cpu, one process: fine
    assert lone_cpu_launch({**SIMPLE_LAUNCHER, "OMPI_COMM_WORLD_SIZE": "4"}) is None  # mpirun sets the world
    assert lone_cpu_launch({}) is None  # python launch/train.py


def test_dist_timeout_option():
    cfg = parse_config(TrainConfig, ["--dist-timeout", "30"])
    assert cfg.dist_timeout == 30.0 and TrainConfig().dist_timeout == 600.0
    assert process_group_kwargs(30).timeout == datetime.timedelta(seconds=30) and PROGRESS.timeout_s == 30
    with pytest.raises(UserError, match="--dist-timeout must be > 0"):
        parse_config(TrainConfig, ["--dist-timeout", "0"])


CHILD = """
import os, signal, sys, time
from restorer.train.world import tie_to_launcher, _watch_parent
mark = sys.argv[1]
signal.signal(signal.SIGTERM, lambda *_: (open(mark, "w").write("stop"), sys.exit(0)))
if sys.argv[2] == "prctl":
    assert tie_to_launcher() == "prctl"
else:
    import threading
    threading.Thread(target=_watch_parent, args=(os.getppid(), signal.SIGTERM, 0.1), daemon=True).start()
open(mark + ".ready", "w").close()
time.sleep(120)
"""


@pytest.mark.parametrize("how", ["prctl", "watchdog"])
def test_a_dead_launcher_sends_its_child_sigterm(tmp_path, how):
    """A 'launcher' process starts a child in a new session (as torchrun does) and is SIGKILLed:
    the child must get SIGTERM (the trainer's stop request) at once, not run on as an orphan."""
    mark = tmp_path / "stopped"
    launcher = textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {CHILD!r}, {str(mark)!r}, {how!r}], start_new_session=True)
        time.sleep(120)
    """)
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
    parent = subprocess.Popen([sys.executable, "-c", launcher], env=env)
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{mark}.ready").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert Path(f"{mark}.ready").exists()
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        # the handler creates the file, then writes: wait for the word, not for the file
        while not (mark.exists() and mark.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mark.read_text() == "stop"
    finally:
        parent.kill()
        parent.wait()


def test_without_torchrun_nothing_is_tied(monkeypatch):
    from restorer.train.world import tie_to_launcher

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert tie_to_launcher() == "none"  # a trainer started from a shell (nohup ...) outlives the shell


PEER = """
import datetime, os, signal, sys, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method=sys.argv[1], rank=1, world_size=2, timeout=datetime.timedelta(seconds=120))
group = dist.new_group(timeout=datetime.timedelta(seconds=3))
dist.all_reduce(torch.ones(1), group=group)
os.kill(os.getpid(), signal.SIGSTOP if sys.argv[2] == "stop" else signal.SIGKILL)
"""


def all_reduce_in_step(tensor, group):
    import torch.distributed as dist

    dist.all_reduce(tensor, group=group)


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_lost_peer_line_names_the_collective(fault):
    """A real gloo group (3 s timeout) of this process and a peer that dies or freezes."""
    import torch
    import torch.distributed as dist

    url = f"tcp://127.0.0.1:{free_port()}"
    peer = subprocess.Popen([sys.executable, "-c", PEER, url, fault])
    try:
        dist.init_process_group("gloo", init_method=url, rank=0, world_size=2, timeout=datetime.timedelta(seconds=120))
        group = dist.new_group(timeout=datetime.timedelta(seconds=3))
        dist.all_reduce(torch.ones(1), group=group)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _stopped_or_gone(peer):
            time.sleep(0.05)
        PROGRESS.timeout_s, PROGRESS.state = 3, type("State", (), {"step": 7})()
        with pytest.raises(RuntimeError) as info:
            all_reduce_in_step(torch.ones(1), group)
        line = lost_peer(info.value)
    finally:
        PROGRESS.state = None
        peer.send_signal(signal.SIGCONT)
        peer.kill()
        peer.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
    assert line is not None and "\n" not in line, str(info.value)
    assert line.startswith("lost another process after step 7: ") and "during all_reduce" in line
    assert ("no answer within 3 s" if fault == "stop" else "closed its connection") in line
    assert lost_peer(RuntimeError("CUDA out of memory")) is None  # not a lost peer: the traceback stays
    assert lost_peer(RuntimeError("[third_party/gloo/gloo/x.cc:9] unsupported device")) is None


def _stopped_or_gone(proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        return True
    with open(f"/proc/{proc.pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "T"
