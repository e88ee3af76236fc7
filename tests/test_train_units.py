"""Pieces of the trainer that need no launch: LR schedule, EMA, fault spec, W&B credential
detection, metrics log, and checkpoint verification (malicious and incomplete directories)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EvilPickle
from safetensors.torch import save_file

from restorer.errors import UserError


def test_warmup_then_cosine():
    from restorer.train.schedule import lr_at

    kw = dict(base_lr=1e-3, warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(1e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(0.55e-3)  # half way down the cosine
    assert lr_at(110, **kw) == pytest.approx(1e-4) == lr_at(500, **kw)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, base_lr=1.0, warmup_steps=0, total_steps=10) == 1.0


def test_ema_follows_weights_and_round_trips(tmp_path):
    from restorer.model import ModelConfig, build_model
    from restorer.train.ema import EMA

    model = build_model(ModelConfig(preset="tiny"))
    ema = EMA(model, decay=0.9)
    start = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    d = ema.current_decay()
    assert d == pytest.approx(0.1)  # (1 + 0) / (10 + 0): early updates follow the weights closely
    ema.update(model)
    for s, e in zip(start, ema.model.parameters()):
        assert torch.allclose(e, s + (1 - d) * 1.0)
    ema.save(tmp_path / "ema.safetensors")
    other = EMA(build_model(ModelConfig(preset="tiny")), decay=0.9)
    other.load(tmp_path / "ema.safetensors")
    assert other.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.model.parameters(), ema.model.parameters()))
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


def test_fault_spec_parsing():
    from restorer.train.faults import Faults

    f = Faults.from_env("nan@3, kill_in_save@20,slow_rank@1:0.5")
    assert (f.nan_step, f.nan_forever, f.kill_in_save, f.slow_rank, f.slow_seconds) == (3, False, 20, 1, 0.5)
    assert [f.poison_batch(s, 0) for s in (2, 3, 3, 4)] == [False, True, False, False]  # once
    assert not f.poison_batch(3, 1)
    g = Faults.from_env("nan@2+")
    assert [g.poison_batch(s, 0) for s in (1, 2, 2, 9)] == [False, True, True, True]
    assert Faults.from_env("") == Faults()
    h = Faults.from_env("fail@2:1")
    h.after_step(2, True, 0)
    with pytest.raises(UserError, match="injected failure after step 2"):
        h.after_step(2, False, 1)
    with pytest.raises(UserError, match="RESTORER_FAULTS"):
        Faults.from_env("explode@3")
    assert not Faults.from_env("").active() and f.active()


def test_fault_hooks_wrap_the_batches_and_the_forward():
    from restorer.train.faults import Faults

    idle = Faults()
    batches, forward = iter([1, 2]), lambda x, q: x
    assert idle.wrap_batches(batches, 0) is batches and idle.wrap_forward(forward, lambda: 0, 0) is forward
    slow = Faults(slow_rank=1, slow_seconds=1e-3)
    assert list(slow.wrap_batches(iter([1, 2]), 1)) == [1, 2] and slow.wrap_batches(batches, 0) is batches
    step = [0]
    poisoned = Faults(nan_step=1).wrap_forward(forward, lambda: step[0], 0)
    x = torch.ones(2)
    assert torch.equal(poisoned(x, None), x)  # step 0: clean
    step[0] = 1
    assert torch.isnan(poisoned(x, None)).all() and torch.equal(poisoned(x, None), x)  # once
    assert Faults(nan_step=1).wrap_forward(forward, lambda: 1, 1) is forward  # rank 0's batches only


def test_agreed_stop_ignores_further_stop_signals():
    import signal

    from restorer.data.workers import STOP_SIGNALS
    from restorer.train.world import StopRequest

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        stop = StopRequest().listen()
        os.kill(os.getpid(), signal.SIGUSR1)  # handled: a flag, the process goes on
        assert stop.requested and not stop.held
        stop.hold()
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in STOP_SIGNALS)
        for sig in STOP_SIGNALS:  # ignored by the kernel: nothing can interrupt the checkpoint being written
            os.kill(os.getpid(), sig)
        assert stop.held
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_wandb_goes_offline_without_credentials(tmp_path, monkeypatch):
    from restorer.train.tracking import prepare_wandb, wandb_credentials_present

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    assert not wandb_credentials_present()
    note = prepare_wandb(tmp_path / "run")
    assert os.environ["WANDB_MODE"] == "offline" and "wandb sync" in note
    assert os.environ["WANDB_DIR"] == str(tmp_path / "run")

    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    assert wandb_credentials_present()
    assert prepare_wandb(tmp_path / "run") is None and "WANDB_MODE" not in os.environ
    (tmp_path / "netrc").write_text("machine example.org login u password p\n")
    assert not wandb_credentials_present()
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    assert wandb_credentials_present()


def test_metrics_log_lines(tmp_path):
    from restorer.train.tracking import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"train/loss": torch.tensor(0.5), "val/psnr": float("inf")}, step=3)
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "train/loss": 0.5, "val/psnr": "inf"}


# --- checkpoint directories ---------------------------------------------------------------------


def _fake_checkpoint(path: Path, step: int = 4) -> Path:
    """The files Accelerate and train.py write, with the same kinds of content."""
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(3)}, str(path / "model.safetensors"))
    torch.save(
        {
            "state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(4.0)}},
            "param_groups": [{"lr": 1e-3, "params": [0]}],
        },
        path / "optimizer.bin",
    )
    torch.save(
        {
            "step": 0,
            "random_state": random.getstate(),
            "numpy_random_seed": np.random.get_state(),
            "torch_manual_seed": torch.get_rng_state(),
        },
        path / "random_states_0.pkl",
    )
    save_file({"model.w": torch.zeros(3), "updates": torch.tensor(4)}, str(path / "ema.safetensors"))
    (path / "train_state.json").write_text(json.dumps({"step": step, "epoch": 1}))
    (path / "COMPLETE").write_text("{}")
    return path


def test_verify_accepts_what_accelerate_writes(tmp_path):
    from restorer.train.checkpoint import verify_checkpoint

    assert verify_checkpoint(_fake_checkpoint(tmp_path / "step-0000004"))["step"] == 4


@pytest.mark.parametrize(
    "target", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "model.safetensors", "scaler.pt"]
)
def test_verify_refuses_code_in_any_file(tmp_path, target):
    from restorer.train.checkpoint import verify_checkpoint

    ckpt = _fake_checkpoint(tmp_path / "step-0000004")
    mark = tmp_path / "pwned"
    torch.save([EvilPickle(mark)], ckpt / target)
    with pytest.raises(UserError, match="refused to load") as err:
        verify_checkpoint(ckpt)
    assert target in str(err.value) and "\n" not in str(err.value)
    assert not mark.exists()


def test_incomplete_and_stale_directories(tmp_path):
    from restorer.train.checkpoint import complete_checkpoints, latest_checkpoint, remove_stale_temp, verify_checkpoint

    root = tmp_path / "checkpoints"
    _fake_checkpoint(root / "step-0000002", 2)
    _fake_checkpoint(root / "step-0000010", 10)
    (root / "step-0000012").mkdir()  # no marker: killed before completion on a non-atomic filesystem
    (root / ".tmp-step-0000014").mkdir()
    assert [s for s, _ in complete_checkpoints(root)] == [2, 10]
    assert latest_checkpoint(root).name == "step-0000010"
    with pytest.raises(UserError, match="incomplete checkpoint"):
        verify_checkpoint(root / "step-0000012")
    with pytest.raises(UserError, match="not found"):
        verify_checkpoint(root / "step-0000099")
    assert [p.name for p in remove_stale_temp(root)] == [".tmp-step-0000014"]
    assert complete_checkpoints(tmp_path / "nothing") == []


class _OneProcess:
    """The part of an Accelerator that save_checkpoint uses, for one process."""

    is_main_process, device = True, torch.device("cpu")

    def __init__(self, payload: bytes):
        self.payload = payload

    def wait_for_everyone(self):
        pass

    def reduce(self, t, reduction="sum"):
        return t

    def save_state(self, out: str):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "model.safetensors").write_bytes(self.payload)


def test_resaving_a_step_replaces_it_and_a_kill_between_renames_is_recovered(tmp_path, monkeypatch):
    from restorer.train import checkpoint as tc

    root = tmp_path / "checkpoints"
    tc.save_checkpoint(_OneProcess(b"first"), root, 5, tc.Content({"epoch": 0}))
    final = tc.save_checkpoint(_OneProcess(b"second"), root, 5, tc.Content({"epoch": 1}))
    assert (final / "model.safetensors").read_bytes() == b"second" and (final / "COMPLETE").is_file()
    assert json.loads((final / "train_state.json").read_text()) == {"epoch": 1, "step": 5}
    assert [p.name for p in root.iterdir()] == ["step-0000005"]  # the old copy is gone, no temp left

    # killed after moving the old copy aside, before moving the new one into place
    real_rename = os.rename

    def killed(src, dst):
        if Path(src).name.startswith(tc.TMP_PREFIX + "step-"):
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this runs
        return real_rename(src, dst)

    monkeypatch.setattr(tc.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        tc.save_checkpoint(_OneProcess(b"third"), root, 5, tc.Content({"epoch": 2}))
    monkeypatch.setattr(tc.os, "rename", real_rename)
    assert not final.exists()
    tc.remove_stale_temp(root)  # what the next start does: the complete new copy goes into place
    assert (final / "model.safetensors").read_bytes() == b"third" and tc.latest_checkpoint(root) == final
    assert [p.name for p in root.iterdir()] == ["step-0000005"]


def test_metrics_log_drops_rows_after_the_resumed_step(tmp_path):
    from restorer.train.tracking import MetricsLog

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "train/lo')  # killed mid-line
    log = MetricsLog(path, start_step=2)
    log.write({"train/loss": 0.25}, step=3)
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert not list(tmp_path.glob(".*.tmp"))
