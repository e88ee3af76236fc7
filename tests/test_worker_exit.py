"""A process that leaves a DataLoader iterator open (its workers ignore SIGTERM) still exits: the
interpreter's exit must not wait on workers that ignore multiprocessing's terminate()."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch
    from torch.utils.data import DataLoader, IterableDataset
    from restorer.data.workers import init_worker

    class Endless(IterableDataset):
        def __iter__(self):
            while True:
                yield torch.zeros(1)

    it = iter(DataLoader(Endless(), batch_size=1, num_workers=2, worker_init_fn=init_worker))
    next(it)
    LEAK = [it]  # never closed: as a test or a script that stops early leaves it
    print("exiting", flush=True)
""")


@pytest.mark.parametrize("persistent", [False, True])
def test_open_loader_with_signal_ignoring_workers_does_not_block_exit(tmp_path, persistent):
    script = tmp_path / "leak.py"
    script.write_text(SCRIPT.replace("num_workers=2", f"num_workers=2, persistent_workers={persistent}"))
    try:  # 120 s: over 10x what this takes on a loaded 2-core machine (about 6 s, torch import included)
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit: its exit waited on DataLoader workers that ignore SIGTERM")
    assert proc.returncode == 0, proc.stderr
    assert "exiting" in proc.stdout and "Traceback" not in proc.stderr, proc.stderr
