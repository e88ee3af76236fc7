"""DataLoader plumbing shared by the train and val loaders (they run in worker processes)."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401 (its exit handler must be registered before ours, below)
import signal
import threading

import torch

STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


def init_worker(worker_id: int) -> None:
    """In each DataLoader worker: one torch thread, and SIGTERM/SIGUSR1 ignored.

    Those signals ask the trainer to save a checkpoint at the next step and exit; SLURM and torchrun
    send them to every process of the job (torchrun: to each trainer's process group, which holds its
    workers). A worker killed by one would crash the trainer before it saves; a worker running the
    trainer's handler (a fork inherits it) would set a flag nobody reads. So workers ignore them, and
    are stopped by their parent: the trainer shuts them down when it exits, and PyTorch's worker
    watchdog ends a worker whose parent died."""
    torch.set_num_threads(1)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """At interpreter exit multiprocessing terminates (SIGTERM) its daemonic children, then joins them.
    A DataLoader worker ignores SIGTERM (:func:`init_worker`), so the workers of an iterator nobody
    closed (a script or test that stops early) made that join wait forever (tests/test_worker_exit.py).
    Exit handlers run last-registered first: this one SIGKILLs them before, with PyTorch's SIGCHLD
    handler (which would report each as a failed worker) switched off."""
    children = [proc for proc in multiprocessing.active_children() if proc.daemon]
    if not children:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for proc in children:
        proc.kill()


atexit.register(_kill_leftover_workers)


def unwrap_worker_error(exc: Exception) -> Exception:
    """DataLoader re-raises a worker's UserError with the worker traceback as its message: keep the
    one line the worker meant."""
    text = str(exc)
    marker = "UserError: "
    idx = text.rfind(marker)
    line = text[idx + len(marker) :].strip() if "Traceback" in text and idx >= 0 else text
    return type(exc)(line.splitlines()[0] if line else text)
