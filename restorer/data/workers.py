"""DataLoader plumbing shared by the train and val loaders (they run in worker processes)."""
from __future__ import annotations

import signal

import torch


def init_worker(worker_id: int) -> None:
    """In each DataLoader worker: one torch thread, and the default SIGTERM/SIGUSR1 actions (a fork
    inherits the trainer's handlers, which must run in the trainer only)."""
    torch.set_num_threads(1)
    for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_DFL)


def unwrap_worker_error(exc: Exception) -> Exception:
    """DataLoader re-raises a worker's UserError with the worker traceback as its message: keep the
    one line the worker meant."""
    text = str(exc)
    marker = "UserError: "
    idx = text.rfind(marker)
    line = text[idx + len(marker):].strip() if "Traceback" in text and idx >= 0 else text
    return type(exc)(line.splitlines()[0] if line else text)
