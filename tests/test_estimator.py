"""The effective-quality estimator (restorer/estimator.py) and its trainer (launch/train_estimator.py):
crops, the safetensors file with its facts, refusal of other files, a real (tiny) training run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, write_shards
from safetensors.torch import save_file

from restorer.data.degrade import jpeg_roundtrip
from restorer.errors import UserError
from restorer.estimator import (
    CROP,
    MAX_CROPS,
    N_FEATURES,
    QualityNet,
    crop_boxes,
    crop_features,
    features,
    load_estimator,
    save_estimator,
)


def test_crop_boxes_spread_over_the_image_on_the_8px_grid():
    boxes = crop_boxes(1000, 1500)
    assert len(boxes) == MAX_CROPS and all(s == CROP for _, _, s in boxes)
    assert all(y % 8 == 0 and x % 8 == 0 and y + CROP <= 1000 and x + CROP <= 1500 for y, x, _ in boxes)
    assert min(y for y, _, _ in boxes) == 0 and max(y for y, _, _ in boxes) >= 1000 - CROP - 8
    assert crop_boxes(60, 300) == [(0, x, 60) for x in sorted({int(v) // 8 * 8 for v in np.linspace(0, 240, 4)})]
    assert crop_boxes(40, 40) == [(0, 0, 40)]
    gray = np.zeros((64, 80), dtype=np.uint8)
    assert crop_features(gray, crop_boxes(64, 80)).shape == (3, N_FEATURES)  # x at 0, 8, 16


def test_features_find_the_grid_and_see_the_quantisation():
    """The block borders are found at any phase; harder compression leaves fewer surviving
    high frequencies (more near-zero luma coefficients) whatever the crop's offset."""
    from skimage import data

    photo = data.astronaut()[:200, :200]
    low, high = jpeg_roundtrip(photo, 10), jpeg_roundtrip(photo, 90)
    for dy, dx in ((0, 0), (3, 5), (7, 1)):
        f_low, f_high = features(low[dy : dy + 128, dx : dx + 128]), features(high[dy : dy + 128, dx : dx + 128])
        zeros_low, zeros_high = f_low[64:128], f_high[64:128]  # share of luma coefficients below 1
        assert zeros_low[1:].mean() > zeros_high[1:].mean() + 0.1
        assert min(f_low[-2:]) > 1.5 > max(f_high[-2:])  # q10's grid stands out across and down
        moved = features(low[dy + 8 : dy + 136, dx + 8 : dx + 136])  # the same grid, 8 px on
        assert np.abs(moved[64:128] - zeros_low).mean() < 0.03


def test_saved_estimator_loads_and_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    net = QualityNet(8)
    net.mean.fill_(0.5)
    path = save_estimator(net, tmp_path / "e.safetensors", {"steps": 7})
    est = load_estimator(path)
    assert est.meta["facts"] == {"steps": 7} and est.meta["model"] == {"width": 8} and "7 steps" in est.describe()
    assert torch.equal(est.net.mean, net.mean)  # the standardisation travels with the weights
    img = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = float(net(crop_features(img, crop_boxes(200, 300))).mean()) * 100
    assert est.estimate(img) == pytest.approx(min(100.0, max(1.0, expected)), abs=1e-4)
    assert 1.0 <= est.estimate(img[:, :, 0]) <= 100.0


def test_other_files_are_refused_with_one_line(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_estimator(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="not a quality estimator"):
        load_estimator(tmp_path / "plain.safetensors")
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UserError, match="unusable quality estimator"):
        load_estimator(tmp_path / "pickle.safetensors")
    save_file(
        {"w": torch.zeros(2)},
        str(tmp_path / "wrong.safetensors"),
        metadata={"restorer_estimator": '{"model": {"width": 8}}'},
    )
    with pytest.raises(UserError, match="unusable quality estimator"):
        load_estimator(tmp_path / "wrong.safetensors")


def test_training_script_writes_a_loadable_estimator_with_its_facts(tmp_path):
    shards = write_shards(tmp_path / "s", splits={"train": 8}, samples_per_shard=4, tile=128)
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch/train_estimator.py"), "--shards", str(shards), "--train-splits", "train",
           "--steps", "4", "--batch-size", "4", "--patch-size", "32", "--width", "4", "--num-workers", "0",
           "--log-every", "2", "--patches", "40", "--chain-p", "0.5", "--run-dir", str(run)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    est = load_estimator(run / "estimator.safetensors")
    facts = est.meta["facts"]
    assert facts["steps"] == 4 and facts["patch_size"] == 24 and facts["degradations"]["chain_p"] == 0.5
    assert facts["patches"] == 40 and facts["holdout"] == 4 and facts["val_mae_q"] > 0
    assert (run / "config.yaml").is_file() and len((run / "log.jsonl").read_text().splitlines()) == 2
    bad = subprocess.run(cmd[:2] + ["--shards", str(shards), "--patch-size", "16"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error:")
