"""The packaged models (restorer/weights/): they load pickle-free, restore with no flags at all, and
still measure what their model card says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHARED_BSR
from PIL import Image
from skimage import data

from restorer import weights as packaged


def card(name: str = "fast") -> dict:
    return json.loads((packaged.FOLDER / f"{name}.json").read_text())


SHIPPED = [name for name in packaged.NAMES if packaged.installed(name)]


def test_the_fast_model_ships():
    assert "fast" in SHIPPED  # the CPU default; `quality` ships once a release run has made it


@pytest.mark.parametrize("name", SHIPPED)
def test_packaged_model_is_small_and_its_card_is_complete(name):
    assert (packaged.FOLDER / f"{name}.safetensors").stat().st_size <= 5 * 2**20
    meta = card(name)
    assert meta["name"] == name
    assert meta["facts"]["quality_range"] == [5, 95] and meta["model"]["condition_on_quality"] is True
    for key in ("recipe", "command", "data", "degradations", "hardware", "wall_time_min", "steps"):
        assert meta["training"][key], key
    single = {r["quality"]: r for r in meta["card"]["rows"] if r["case"] == "single"}
    double = {r["quality"]: r for r in meta["card"]["rows"] if r["case"] == "double"}
    assert sorted(single) == [10, 20, 30, 40, 50, 60, 70, 80, 90] and sorted(double) == [30, 50, 70, 90]
    assert all(r["gain"] >= 0 for r in meta["card"]["rows"])  # never worse than the JPEG on average
    assert single[10]["images"] == 200 and abs(single[10]["jpeg_psnr"] - 25.84) < 0.01  # the published JPEG row
    if name == "quality":
        assert single[10]["gain"] >= 1.2  # the bar for the quality model
    assert (REPO / meta["training"]["recipe"]).is_file()


def test_default_name_is_fast_on_cpu_and_quality_on_gpus_where_installed():
    assert packaged.default_name("cpu") == "fast"
    assert packaged.default_name("cuda") == ("quality" if packaged.installed("quality") else "fast")


def test_restore_photo_with_no_flags_writes_it_beside_the_input(tmp_path):
    """`restorer restore photo.jpg` after `make setup`: the packaged fast model on a CPU, output
    photo.restored.png beside the input, closer to the original than the JPEG."""
    ref = data.astronaut()[96:288, 128:384]
    Image.fromarray(ref).save(tmp_path / "photo.jpg", quality=20)
    original_bytes = (tmp_path / "photo.jpg").read_bytes()
    script = Path(sys.executable).with_name("restorer")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "restorer.cli"]
    proc = subprocess.run(
        [*cmd, "restore", "photo.jpg", "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "photo.restored.png"
    assert out.is_file() and "fast.safetensors" in proc.stderr + proc.stdout
    restored, jpeg = np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "photo.jpg"))

    def mse(a):
        return float(np.mean((a.astype(np.float64) - ref) ** 2))

    assert restored.shape == ref.shape and mse(restored) < mse(jpeg)
    assert (tmp_path / "photo.jpg").read_bytes() == original_bytes  # the input is never touched


@pytest.mark.skipif(not packaged.installed("quality"), reason="the quality model is not packaged")
def test_quality_model_by_name_beats_fast_on_a_photo(tmp_path):
    """`restorer restore photo.jpg --weights quality`: the bigger model, closer to the original than
    `fast` on a photo neither trained on."""
    from restorer.cli import main

    ref = data.astronaut()[96:288, 128:384]
    Image.fromarray(ref).save(tmp_path / "photo.jpg", quality=20)
    errors = {}
    for name in ("fast", "quality"):
        out = tmp_path / f"{name}.png"
        assert (
            main(
                [
                    "restore",
                    str(tmp_path / "photo.jpg"),
                    "-o",
                    str(out),
                    "--weights",
                    name,
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
            )
            == 0
        )
        errors[name] = float(np.mean((np.asarray(Image.open(out)).astype(np.float64) - ref) ** 2))
    assert errors["quality"] < errors["fast"], errors


@pytest.mark.skipif(not (SHARED_BSR / "BSDS500").is_dir(), reason="BSDS500 (../shared/datasets/BSR) is not here")
@pytest.mark.parametrize("name", SHIPPED)
def test_packaged_model_still_measures_what_its_card_says(name):
    """The card's per-image checks, re-measured the way `restore` works (fp32 + projection)."""
    import torch

    from restorer.data.degrade import decoded_jpeg
    from restorer.imageio import open_image
    from restorer.infer.engine import load_restorers
    from restorer.infer.evaluate import image_metrics
    from restorer.infer.projection import project

    restorers, errors = load_restorers([name], torch.device("cpu"), precision="fp32")
    assert not errors
    folder = SHARED_BSR / "BSDS500" / "data" / "images" / "test"
    for row in card(name)["checks"]["rows"]:
        ref = open_image(folder / row["image"]).pixels
        jpeg, jpeg_file = decoded_jpeg(ref, row["quality"])
        out = project(restorers[0].restore(jpeg, row["quality"]), jpeg_file)
        assert image_metrics(jpeg, ref, which=("psnr",))["psnr_rgb"] == pytest.approx(row["jpeg_psnr"], abs=1e-3)
        assert image_metrics(out, ref, which=("psnr",))["psnr_rgb"] == pytest.approx(row["psnr"], abs=0.05), row
