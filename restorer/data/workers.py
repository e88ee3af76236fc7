"""DataLoader plumbing shared by the train and val loaders (they run in worker processes)."""

from __future__ import annotations

import signal

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


def unwrap_worker_error(exc: Exception) -> Exception:
    """DataLoader re-raises a worker's UserError with the worker traceback as its message: keep the
    one line the worker meant."""
    text = str(exc)
    marker = "UserError: "
    idx = text.rfind(marker)
    line = text[idx + len(marker) :].strip() if "Traceback" in text and idx >= 0 else text
    return type(exc)(line.splitlines()[0] if line else text)
