"""Exact and elastic resume in real training runs (launch/train.py, 2-process gloo DDP on CPU, fp32,
tiny model): a run SIGKILLed mid-epoch and resumed ends with the uninterrupted run's weights bit
for bit and takes the same patches at every step (the data ledger); a run resumed on 1 process
after 2, or on 2 after 1, with --global-batch-size keeps the global batch, the step and the LR,
and over each epoch takes no patch twice and leaves unread only what the plan states; without
--global-batch-size a changed world size prints one warning line."""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import assert_same_weights, check, error_lines, launch, train_rows, write_shards

from restorer.train.schedule import lr_at

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ARGS = [
    "--preset", "tiny", "--patch-size", "32", "--batch-size", "2", "--patches-per-image", "2",
    "--quality", "10-50", "--val-qualities", "10", "--val-crop", "32", "--shuffle-buffer", "6",
    "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1", "--seed", "0", "--tracker", "none",
    "--val-every", "1000", "--save-every", "3", "--mixed-precision", "no", "--data-ledger",
]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """16 train tiles in 4 shards of 4 (48 px), 2 val tiles: 32 patches per epoch."""
    return write_shards(tmp_path_factory.mktemp("resume") / "s", splits={"train": 16, "val": 2}, samples_per_shard=4,
                        tile=48)  # fmt: skip


def ledger(run: Path) -> list[dict]:
    rows = []
    for path in sorted((run / "ledger").glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        rows += [{**json.loads(line), "rank": rank} for line in path.read_text().splitlines()]
    return rows


def patches_by_epoch(rows: list[dict]) -> dict[int, list[tuple[int, int, int]]]:
    out = defaultdict(list)
    for row in rows:
        out[row["epoch"]] += [tuple(p) for p in row["patches"]]
    return out


def run_args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["--shards", str(shards), "--run-dir", str(run), *ARGS, *extra]


def test_killed_mid_epoch_and_resumed_run_is_bit_identical(shards, tmp_path):
    """2 processes x 2 loader workers (4 slots, 8 batches per rank per epoch): SIGKILLed while
    saving step 9, resumed from step 6 (epoch 0, batch 6 of 8, shuffle buffers part full)."""
    extra = ["--num-workers", "2", "--max-steps", "12"]
    ref = tmp_path / "ref"
    check(launch(run_args(shards, ref, *extra), tmp_path, timeout=600))
    run = tmp_path / "run"
    assert launch(run_args(shards, run, *extra), tmp_path, faults="kill_in_save@9", timeout=600).returncode != 0
    resumed = check(launch(run_args(shards, run, *extra), tmp_path, timeout=600))
    assert "at step 6 (data epoch 0, batch 6)" in resumed.stdout, resumed.stdout
    assert not [line for line in resumed.stdout.splitlines() if line.startswith(("warning", "data:"))]
    assert_same_weights(run / "checkpoints" / "step-0000012", ref / "checkpoints" / "step-0000012")
    a, b = train_rows(ref), train_rows(run)
    assert all(a[s]["train/loss"] == b[s]["train/loss"] and a[s]["lr"] == b[s]["lr"] for s in range(1, 13))
    key = lambda r: (r["step"], r["rank"])  # noqa: E731
    assert sorted(ledger(run), key=key) == sorted(ledger(ref), key=key)  # the same patches at every step
    epochs = patches_by_epoch(ledger(ref))
    assert len(epochs[0]) == len(set(epochs[0])) == 32  # every patch of the epoch once


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_keeps_global_batch_and_epoch(shards, tmp_path, first, then):
    """--global-batch-size 8 on `first` processes, SIGKILLed while saving step 6, resumed from step 3
    (mid-epoch) on `then`: --grad-accum follows, the LR continues, and over the ledger no patch is
    taken twice in an epoch; epoch 0 misses only the patches the re-plan says it leaves unread."""
    extra = ["--num-workers", "1", "--max-steps", "10", "--global-batch-size", "8"]
    run = tmp_path / "run"
    killed = launch(run_args(shards, run, *extra), tmp_path, processes=first, faults="kill_in_save@6", timeout=600)
    assert killed.returncode != 0
    gone = tmp_path / "plain"
    shutil.copytree(run, gone)  # the same checkpoint, resumed without --global-batch-size below
    resumed = check(launch(run_args(shards, run, *extra), tmp_path, processes=then, timeout=600))
    out = resumed.stdout
    assert f"resuming on {then} process(es) (the checkpoint ran on {first}): global batch 8 kept" in out, out
    assert "at step 3 (data epoch 0" in out
    replan = re.search(r"data: epoch 0 continues on .* (\d+) patches left unread", out)
    assert replan, out
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == then and info["end_step"] == 10
    assert "8 patches/step" in out
    rows = train_rows(run)
    assert sorted(rows) == list(range(1, 11))
    assert all(rows[s]["lr"] == lr_at(s - 1, base_lr=3e-3, warmup_steps=2, total_steps=10) for s in rows)
    epochs = patches_by_epoch(ledger(run))
    for epoch, patches in epochs.items():
        assert len(patches) == len(set(patches)), f"epoch {epoch}: a patch taken twice"
    assert len(epochs[0]) == 32 - int(replan.group(1))  # what the epoch owed, but for what the re-plan states
    assert len(epochs[1]) == 32 and sum(map(len, epochs.values())) == 80  # 10 steps x 8 patches
    # the same checkpoint resumed without --global-batch-size: one warning line, the global batch changes
    plain = launch([*run_args(shards, gone, "--num-workers", "1", "--max-steps", "4")], tmp_path, processes=then)
    warnings = [line for line in check(plain).stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: resuming on {then} process(es) (the checkpoint ran on {first}): the global batch changes "
        f"from 8 to {2 * then} patches per step (set --global-batch-size to keep it)"
    ]


def test_global_batch_size_must_divide(shards, tmp_path):
    args = run_args(shards, tmp_path / "run", "--global-batch-size", "5", "--max-steps", "1")
    proc = launch(args, tmp_path, processes=1)
    assert proc.returncode == 2 and not (tmp_path / "run" / "checkpoints").exists()
    assert error_lines(proc) == ["error: --global-batch-size 5 is not a multiple of --batch-size 2 x 1 process(es) = 2"]


def _train_in_process(argv: list[str]) -> None:
    """``train()`` in this process, with a fresh Accelerate state and the signal handlers put back."""
    import signal

    from accelerate.state import AcceleratorState, GradientState

    from restorer.config import parse_config
    from restorer.train.config import TrainConfig
    from restorer.train.loop import train

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        assert train(parse_config(TrainConfig, argv)) == 0
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_resume_is_bit_identical_in_fp32_and_cpu_bf16(shards, tmp_path, precision):
    """One process (16 batches per epoch): a run resumed from its step-2 checkpoint (the step-4 one
    removed) ends with the uninterrupted run's step-4 weights, in fp32 and under bf16 autocast on
    this CPU (deterministic CPU kernels)."""
    run = tmp_path / "run"
    extra = ["--num-workers", "0", "--max-steps", "4", "--save-every", "2", "--mixed-precision", precision]
    _train_in_process(run_args(shards, run, *extra))
    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "checkpoints" / "step-0000004")
    _train_in_process(run_args(shards, again, *extra))
    assert_same_weights(again / "checkpoints" / "step-0000004", run / "checkpoints" / "step-0000004")
    info = json.loads((again / "run_info.json").read_text())
    assert info["start_step"] == 2 and info["mixed_precision"] == precision
