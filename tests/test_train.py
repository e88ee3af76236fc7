"""End-to-end training: real 2-process CPU DDP runs of launch/train.py (gloo), shared between tests.

One reference run (module fixture) overfits two 48 px tiles per rank -- every batch is the same,
so the loss must fall -- and logs to an offline W&B run. A second run is SIGKILLed while writing
a checkpoint and a third resumes it; its steps, LRs, losses and final weights equal the reference's
bit for bit.
"""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIT_ARGS, REPO, TRAIN, assert_same_weights, check, error_lines, launch, metrics, train_rows

REF_ARGS = FIT_ARGS + ["--max-steps", "30", "--save-every", "10", "--keep-checkpoints", "2", "--val-every", "15"]


@pytest.fixture(scope="module")
def reference(fit_shards, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ref")
    run = tmp / "run"
    check(launch(["--shards", str(fit_shards), "--run-dir", str(run), "--tracker", "wandb", *REF_ARGS], tmp))
    return run


@pytest.mark.slow
def test_two_processes_really_train_together(reference):
    info = json.loads((reference / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["distributed_type"].endswith("MULTI_CPU")
    assert info["omp_num_threads"] == "1" and info["torch_threads"] == 1  # 2 processes on 2 cores
    assert all(r["world_size"] == 2 for r in metrics(reference) if "world_size" in r)
    # DDP keeps the replicas bit-identical after 30 optimizer steps
    assert info["end_step"] == 30
    assert len(info["weight_fingerprint_by_rank"]) == 2 and info["weights_identical_across_ranks"]
    # what a model card needs about the run: its wall time, the machine, the code
    assert info["wall_seconds"] > 0 and "cores" in info["device_name"] and "code" in info


@pytest.mark.slow
def test_loss_falls_when_overfitting(reference):
    rows = train_rows(reference)
    assert sorted(rows) == list(range(1, 31))
    losses = [rows[s]["train/loss"] for s in range(1, 31)]
    assert losses[-1] < 0.95 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    assert rows[30]["train/psnr"] > rows[1]["train/psnr"]


@pytest.mark.slow
def test_checkpoints_config_and_validation(reference):
    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert ckpts == ["step-0000020", "step-0000030"]  # --keep-checkpoints 2
    for name in ckpts:
        files = {p.name for p in (reference / "checkpoints" / name).iterdir()}
        assert {
            "COMPLETE",
            "model.safetensors",
            "optimizer.bin",
            "ema.safetensors",
            "train_state.json",
            "random_states_0.pkl",
            "random_states_1.pkl",
        } <= files
    assert "max_steps: 30" in (reference / "config.yaml").read_text()
    final = [r for r in metrics(reference) if "val/ssim_q10" in r]
    assert len(final) == 1 and final[0]["step"] == 30
    for q in (10, 20):
        assert abs(final[0][f"val/gain_q{q}"] - (final[0][f"val/psnr_q{q}"] - final[0][f"val/jpeg_psnr_q{q}"])) < 1e-9
    assert final[0]["val/images"] == 4  # 2 val tiles x 2 qualities, counted once over both ranks
    assert (reference / "panels" / "step-0000030.png").is_file()


@pytest.mark.slow
def test_offline_wandb_run_holds_loss_and_psnr(reference):
    from restorer.train.tracking import wandb_history

    files = glob.glob(str(reference / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    history = wandb_history(files[0])
    logged = {row["_step"]: row for row in history}
    ours = train_rows(reference)
    assert logged[30]["train/loss"] == pytest.approx(ours[30]["train/loss"])
    assert logged[30]["train/psnr"] == pytest.approx(ours[30]["train/psnr"])
    assert "val/psnr_q10" in logged[30] and "val/gain_q20" in logged[30]
    assert "val/panel/path" in logged[30]
    assert {"lr", "perf/patches_per_s", "perf/data_wait_frac", "perf/peak_rss_gb"} <= set(logged[30])


@pytest.mark.slow
def test_exported_weights_reproduce_the_ema_model(reference):
    from safetensors.torch import load_file

    from restorer.model import ModelConfig, build_model
    from restorer.modelfile import load_weights

    model, meta = load_weights(reference / "model.safetensors")
    facts = meta["facts"]
    assert facts["steps"] == 30 and facts["quality_range"] == [10, 10] and facts["train_patch_size"] == 48
    assert set(facts["val_psnr"]) == {"10", "20"} and facts["condition_on_quality"] is False
    fresh = build_model(ModelConfig(preset="tiny"))
    ema = load_file(str(reference / "checkpoints" / "step-0000030" / "ema.safetensors"))
    fresh.load_state_dict({k[len("model.") :]: v for k, v in ema.items() if k.startswith("model.")})
    x = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(model(x), fresh.eval()(x))
        assert not torch.equal(model(x), x)  # trained: no longer the identity


@pytest.mark.slow
def test_kill_during_checkpoint_then_resume_matches_uninterrupted_run(reference, fit_shards, tmp_path):
    run = tmp_path / "run"
    args = ["--shards", str(fit_shards), "--run-dir", str(run), "--tracker", "none", *REF_ARGS]
    killed = launch(args, tmp_path, faults="kill_in_save@20")
    assert killed.returncode != 0
    ckpt = run / "checkpoints"
    assert (ckpt / "step-0000010" / "COMPLETE").is_file()
    assert (ckpt / ".tmp-step-0000020").is_dir() and not (ckpt / "step-0000020").exists()

    resumed = check(launch(args, tmp_path))  # --resume auto is the default
    assert "removed incomplete checkpoint" in resumed.stdout
    assert "at step 10" in resumed.stdout
    info = json.loads((run / "run_info.json").read_text())
    assert info["start_step"] == 10 and info["resumed_from"].endswith("step-0000010") and info["end_step"] == 30
    assert not (ckpt / ".tmp-step-0000020").exists()

    ref, ours = train_rows(reference), train_rows(run)
    # the resumed run dropped the rows the killed one logged after step 10: each step once
    assert [r["step"] for r in metrics(run) if "train/loss" in r] == list(range(1, 31))
    for s in range(11, 31):  # the resumed run is the run it would have been: bit for bit (fp32, CPU)
        assert ours[s]["lr"] == ref[s]["lr"] and ours[s]["train/loss"] == ref[s]["train/loss"], s
    assert_same_weights(run / "checkpoints" / "step-0000030", reference / "checkpoints" / "step-0000030")
    final = [r for r in metrics(run) if "val/ssim_q10" in r][-1]
    ref_final = [r for r in metrics(reference) if "val/ssim_q10" in r][-1]
    assert final["val/psnr_q10"] == ref_final["val/psnr_q10"]  # EMA restored too


@pytest.mark.slow
def test_running_a_finished_run_again_changes_nothing(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("wandb"))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    proc = check(
        launch(["--shards", "unused", "--run-dir", str(run), "--tracker", "none", *REF_ARGS], tmp_path, processes=1)
    )
    assert "nothing to do" in proc.stdout and "step-0000030 is at step 30" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # no re-validation, no re-save


@pytest.mark.slow
def test_val_split_checked_at_start_and_val_shards_taken_as_is(fit_shards, tmp_path):
    run = tmp_path / "run"
    args = ["--shards", str(fit_shards), "--run-dir", str(run), "--tracker", "none", *FIT_ARGS]
    proc = launch([*args, "--val-split", "nope"], tmp_path, processes=1)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "'nope'" in error_lines(proc)[0], proc.stderr
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()  # before any training

    check(
        launch(
            [
                *args,
                "--val-split",
                "nope",
                "--val-shards",
                str(fit_shards / "val" / "shard-000000.tar"),
                "--resampled",
                "--max-steps",
                "2",
                "--val-every",
                "100",
            ],
            tmp_path,
            processes=1,
        )
    )
    final = [r for r in metrics(run) if "val/images" in r]
    assert len(final) == 1 and final[0]["val/images"] == 4  # the tar's 2 tiles x 2 qualities
    assert "resampled: true" in (run / "config.yaml").read_text()


def test_help_lists_flags_and_examples():
    proc = subprocess.run([sys.executable, str(TRAIN), "--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0
    for flag in (
        "--shards",
        "--run-dir",
        "--max-steps",
        "--batch-size",
        "--patch-size",
        "--quality",
        "--lr",
        "--mixed-precision",
        "--tracker",
        "--resume",
        "--preset",
        "--channels",
        "--units",
        "--condition-on-quality",
        "--train-splits",
        "--val-split",
        "--val-every",
        "--save-every",
        "--keep-checkpoints",
        "--num-workers",
        "--grad-accum",
        "--clip-grad",
        "--warmup-steps",
        "--ema-decay",
        "--channels-last",
        "--compile",
        "--seed",
        "--max-nonfinite",
        "--config",
        "--val-shards",
        "--resampled",
        "--epoch-patches",
    ):
        assert flag in proc.stdout, flag
    assert "accelerate launch" in proc.stdout and "examples:" in proc.stdout
