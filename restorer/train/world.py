"""The processes and machines of a training run: how they were launched, how long a collective may
wait for a peer, what ties each process to its launcher, and the one line a lost peer produces.

Launch facts come from the launcher's environment. torchrun (inside ``accelerate launch``) sets
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` (processes on this machine), ``GROUP_WORLD_SIZE`` (machines)
and ``TORCHELASTIC_RUN_ID``; accelerate's one-process launcher (``--cpu``, or ``use_cpu`` without
``--multi_gpu``) sets ``MASTER_ADDR`` but no ``WORLD_SIZE`` when asked for several processes or
machines, and starts each machine's process alone: :func:`lone_cpu_launch` refuses that.

Stopping (SIGTERM / SIGUSR1 = checkpoint at the next step boundary, then exit 0):

- torchrun's agent forwards SIGTERM (and SIGINT, SIGHUP, SIGQUIT) to each trainer's process group,
  waits ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (30) and then SIGKILLs it. It does not handle
  SIGUSR1 unless ``PET_SIGNALS_TO_HANDLE`` lists it: the default action kills the agent at once.
- torchrun starts each trainer in its own session, so a dead agent would leave it running.
  :func:`tie_to_launcher` asks the kernel for SIGTERM when the launcher dies
  (``PR_SET_PDEATHSIG``; a thread polling ``getppid`` where prctl is missing): the trainer then saves
  at the next step and exits, as if the launcher had forwarded the signal.
- DataLoader workers ignore both signals (``restorer.data.workers``).

A collective that cannot complete (a peer died: its connection closes; a peer froze: no answer) raises
in gloo after the process-group timeout (``--dist-timeout``); :func:`lost_peer` turns that into one
line naming the collective, its caller and the last step. NCCL's watchdog aborts the process itself
after the same timeout with its own message.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from accelerate.utils import InitProcessGroupKwargs

from restorer.data.workers import STOP_SIGNALS

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclasses.dataclass
class Progress:
    """What a lost-peer line reports: the run's state (its step: optimizer steps done) and the
    process-group timeout."""

    state: Any = None
    timeout_s: float | None = None


PROGRESS = Progress()


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption, torchrun forwarding a signal, the launcher's death: see
    :func:`tie_to_launcher`) set a flag once :meth:`listen` installed the handlers; processes agree on
    it at the next step (the step's all-reduce), save one checkpoint and exit 0.

    Once every process agreed to stop, :meth:`hold` ignores both signals (``SIG_IGN``) for the rest
    of the run: a second signal (SLURM and torchrun send one to every process, a user may send more)
    then cannot interrupt the checkpoint being written -- with a Python handler installed a signal
    still interrupts system calls in C code (gloo, file writes) that need not retry them."""

    def __init__(self) -> None:
        self.requested = False
        self.held = False

    def listen(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)
        return self

    def hold(self) -> None:
        """The stop is agreed: ignore further stop signals until the process exits."""
        self.held = True
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handler(self, signum, frame) -> None:
        self.requested = True


def lone_cpu_launch(environ: Mapping[str, str] | None = None) -> str | None:
    """The refusal line when accelerate's one-process launcher was asked for several processes or
    machines (it sets ``MASTER_ADDR`` for them but starts this process alone), else None."""
    env = os.environ if environ is None else environ
    if "ACCELERATE_USE_CPU" not in env or "MASTER_ADDR" not in env:
        return None
    if "WORLD_SIZE" in env or any(name in env for name in MPI_SIZE_VARS):
        return None
    return (
        "accelerate launch --cpu (or use_cpu without --multi_gpu) starts ONE process per machine, each training "
        "alone, but several processes or machines were asked for: drop --cpu and set ACCELERATE_USE_CPU=true with "
        "--config_file launch/accelerate/cpu2.yaml (one machine) or multinode.yaml (several)"
    )


def topology(world_size: int, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Machines and processes per machine of this run (run_info.json), from the launcher's variables."""
    env = os.environ if environ is None else environ
    local = int(env.get("LOCAL_WORLD_SIZE", world_size))
    machines = int(env.get("GROUP_WORLD_SIZE", max(1, world_size // max(1, local))))
    return {
        "machines": machines,
        "processes_per_machine": local,
        "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in env else ("none" if world_size == 1 else "other"),
        "launcher_forwards_signals": env.get("TORCHELASTIC_SIGNALS_TO_HANDLE"),
    }


def process_group_kwargs(timeout_s: float):
    """Accelerate's handler that sets the process-group timeout (every collective, and the rendezvous)."""
    PROGRESS.timeout_s = timeout_s
    return InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))


def tie_to_launcher(sig: int = signal.SIGTERM) -> str:
    """Under torchrun: receive ``sig`` when the launcher dies (its children must never outlive it).
    Returns how: ``prctl``, ``watchdog`` (a thread polling the parent), or ``none`` (no torchrun:
    a trainer started from a shell, e.g. under nohup, keeps running when the shell exits)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return "none"
    parent = os.getppid()
    how = "prctl"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        how = "watchdog"
        threading.Thread(target=_watch_parent, args=(parent, sig), name="launcher-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the kernel knew to tell us
        os.kill(os.getpid(), sig)
    return how


def _watch_parent(parent: int, sig: int, every_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(every_s)
    os.kill(os.getpid(), sig)


# --- a lost peer: one line ----------------------------------------------------------------------------

_TIMEOUT = re.compile(r"timed out|timeout|watchdog", re.IGNORECASE)
_CLOSED = re.compile(r"connection (closed|reset)|broken pipe|peer|socket", re.IGNORECASE)


def lost_peer(exc: BaseException) -> str | None:
    """One line for a collective that failed because a peer is gone or frozen, else None."""
    text = str(exc)
    if not (isinstance(exc, getattr(dist, "DistError", ())) or "gloo" in text or "NCCL" in text):
        return None
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", first)  # gloo's "[.../pair.cc:553] "
    first = first.split(". ")[0][:120]
    if _TIMEOUT.search(first):
        limit = f"{PROGRESS.timeout_s:g} s" if PROGRESS.timeout_s else "the process-group timeout"
        why = f"no answer within {limit} (--dist-timeout: it or its machine is frozen or unreachable)"
    elif _CLOSED.search(first):
        why = "it closed its connection (it exited or its machine died)"
    else:  # another failure of the process group: its traceback says more than a line could
        return None
    step = "before the first step" if PROGRESS.state is None else f"after step {PROGRESS.state.step}"
    return (
        f"lost another process {step}: {why}, during {waited_for(exc)} [{first}]; rerun the same command "
        "on every machine to resume from the last checkpoint"
    )


def waited_for(exc: BaseException) -> str:
    """``COLLECTIVE called from FUNCTION (FILE:LINE)``: the innermost torch.distributed call (or
    DDP's gradient all-reduce in backward) and the innermost caller in this project."""
    frames = traceback.extract_tb(exc.__traceback__)
    collective, caller = "a collective", None
    for frame in frames:
        path = frame.filename.replace(os.sep, "/")
        if "/torch/distributed/" in path and not frame.name.startswith("_") and frame.name != "wrapper":
            collective = frame.name
        elif path.endswith("torch/autograd/__init__.py") and frame.name == "backward":
            collective = "DDP's gradient all-reduce (backward)"
        elif "/restorer/" in path and not path.endswith("restorer/train/world.py"):
            short = path[path.rfind("/restorer/") + 1 :]
            caller = f"{frame.name} ({short}:{frame.lineno})"
    return f"{collective} in {caller}" if caller else collective
