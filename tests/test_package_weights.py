"""launch/package_weights.py: a finished run becomes restorer/weights/NAME.{safetensors,json} with a
complete card and per-image checks that re-measure; the run is only read. launch/model_card.py makes
the card it packages (the release path of `make release-weights`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, photos
from PIL import Image

sys.path.insert(0, str(REPO / "launch"))
import model_card  # noqa: E402
import package_weights  # noqa: E402


def fake_run(tmp: Path, weights: Path) -> Path:
    """A run dir as training leaves it: weights + model.json, config.yaml, run_info.json, card.json."""
    run = tmp / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(weights.read_bytes())
    (run / "model.json").write_text(weights.with_name("model.json").read_text())
    (tmp / "shards").mkdir()
    (tmp / "shards" / "manifest.json").write_text(json.dumps({"splits": {"train": {"samples": 7}}}))
    cfg = {
        "shards": str(tmp / "shards"),
        "train_splits": ["train"],
        "val_split": "test",
        "quality": "5-95",
        "double_jpeg_p": 0.25,
        "chroma_subsampling": "4:2:0,4:4:4",
        "condition_on_quality": True,
        "patch_size": 96,
        "patches_per_image": 8,
        "rescale_p": 0.5,
        "rescale_scales": [0.9, 0.8, 0.7, 0.6],
        "rotate_p": 0.5,
        "flip_p": 0.5,
        "batch_size": 8,
        "grad_accum": 1,
        "loss": "mse",
        "ema_decay": 0.999,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "run_info.json").write_text(
        json.dumps(
            {
                "world_size": 2,
                "device": "cpu:0",
                "device_name": "Some CPU (2 cores, native bf16)",
                "mixed_precision": "bf16",
                "channels_last": True,
                "mixed_precision_reason": "native",
                "parameters": 123,
                "wall_seconds": 90.0,
                "code": "abc1234",
            }
        )
    )
    (run / "card.json").write_text(json.dumps({"protocol": {}, "rows": [{"case": "single", "quality": 10}]}))
    return run


def fake_bsr(tmp: Path) -> Path:
    folder = tmp / "BSR" / "BSDS500" / "data" / "images" / "test"
    folder.mkdir(parents=True)
    for i, ref in enumerate(photos().values()):
        Image.fromarray(np.ascontiguousarray(ref[:96, :128])).save(folder / f"{i}.png")
    return tmp / "BSR"


def test_a_run_is_packaged_with_its_card_and_checks(tmp_path, small_q10_weights):
    run = fake_run(tmp_path, small_q10_weights)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    out = tmp_path / "weights"
    assert (
        package_weights.main(
            [
                "--run",
                str(run),
                "--name",
                "quality",
                "--recipe",
                "launch/configs/r.yaml",
                "--bsr",
                str(fake_bsr(tmp_path)),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "quality.safetensors").read_bytes() == small_q10_weights.read_bytes()
    doc = json.loads((out / "quality.json").read_text())
    assert doc["name"] == "quality" and doc["model"]["preset"] == "tiny" and doc["card"]["rows"][0]["quality"] == 10
    t = doc["training"]
    assert t["recipe"] == "launch/configs/r.yaml" and "--config launch/configs/r.yaml" in t["command"]
    assert "ACCELERATE_USE_CPU=true" in t["command"]  # a 2-process CPU run documents the CPU launch
    assert t["wall_time_min"] == 1.5 and t["patches"] == t["steps"] * 8 * 2 and t["code"].endswith("abc1234")
    assert "Some CPU" in t["hardware"] and "train (7)" in t["data"] and "5-95" in t["degradations"]
    assert "25% of patches compressed twice" in t["degradations"] and "96 px patches" in t["augmentation"]
    rows = doc["checks"]["rows"]
    assert len(rows) == 9 and {r["quality"] for r in rows} == {10, 50, 90}
    assert all(r["psnr"] > r["jpeg_psnr"] for r in rows if r["quality"] == 10)  # the model was trained at q10
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # the run is only read


def test_a_missing_bsr_is_one_line_and_writes_nothing(tmp_path, small_q10_weights):
    run = fake_run(tmp_path, small_q10_weights)
    with pytest.raises(SystemExit) as exc:
        package_weights.main(
            [
                "--run",
                str(run),
                "--name",
                "quality",
                "--recipe",
                "r.yaml",
                "--bsr",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "w"),
            ]
        )
    assert str(exc.value).startswith("error: ") and "nowhere" in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "w").exists()


def test_an_unfinished_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        package_weights.main(
            ["--run", str(tmp_path), "--name", "fast", "--recipe", "x.yaml", "--out", str(tmp_path / "w")]
        )
    assert str(exc.value).startswith(f"error: {tmp_path}: not a finished run") and "\n" not in str(exc.value)
    assert not (tmp_path / "w").exists()


def test_the_card_of_a_run_is_what_gets_packaged(tmp_path, small_q10_weights, capsys):
    run, bsr, card = fake_run(tmp_path, small_q10_weights), fake_bsr(tmp_path), tmp_path / "card.json"
    argv = ["--weights", str(run / "model.safetensors"), "--images", str(bsr), "--limit", "1", "--double-limit", "1"]
    assert model_card.main([*argv, "--threads", "1", "--device", "cpu", "--json", str(card)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    doc = json.loads(card.read_text())
    rows = {(r["case"], r["quality"]): r for r in doc["rows"]}
    assert set(rows) == {(kind, q) for kind, q, _ in model_card.jobs()} and all(r["images"] == 1 for r in rows.values())
    assert last == f"min_gain_db: {min(r['gain'] for r in doc['rows']):+.3f}"
    assert doc["protocol"]["images"].startswith("BSDS500 test (1 images")
    out = tmp_path / "weights"
    args = ["--run", str(run), "--name", "fast", "--recipe", "r.yaml", "--card", str(card), "--bsr", str(bsr)]
    assert package_weights.main([*args, "--out", str(out)]) == 0
    assert json.loads((out / "fast.json").read_text())["card"] == doc


def test_hardware_text_names_the_precision():
    from package_weights import describe_hardware

    cpu = {"world_size": 2, "device": "cpu:0", "device_name": "AMD EPYC", "mixed_precision": "no"}
    text = describe_hardware({**cpu, "mixed_precision_reason": "CPU lacks AVX512-BF16"})
    assert text == "2 CPU processes (gloo DDP), 1 thread each on AMD EPYC, fp32 (CPU lacks AVX512-BF16)"
    gpu = {"world_size": 1, "device": "cuda:0", "mixed_precision": "bf16", "channels_last": True}
    assert describe_hardware(gpu).startswith("1 GPU process, bf16 mixed precision + channels_last (")
