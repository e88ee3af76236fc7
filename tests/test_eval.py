"""`restorer eval`: metrics per image agree with scikit-image, tables/JSON/CSV, --jpeg-dir, BSR layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from restorer.data.degrade import jpeg_roundtrip
from restorer.infer.evaluate import main as eval_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    """Three reference PNGs (crops of real photos, one grayscale), right halves of the photos."""
    d = tmp_path_factory.mktemp("refs")
    Image.fromarray(data.astronaut()[:200, 256:456]).save(d / "astronaut.png")
    Image.fromarray(data.coffee()[:200, 304:504]).save(d / "coffee.png")
    Image.fromarray(data.camera()[:96, 256:400]).save(d / "camera.png")
    (d / "notes.txt").write_text("not an image; ignored by suffix")
    return d


def test_identity_metrics_match_skimage(refs, tmp_path, capsys):
    js, cs = tmp_path / "r.json", tmp_path / "r.csv"
    code = eval_main(
        [
            "--weights",
            "none",
            "--images",
            str(refs),
            "--quality",
            "10",
            "30",
            "--json",
            str(js),
            "--csv",
            str(cs),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| 10 | 3 | RGB |" in out and "| 30 | 3 | Y |" in out and "border crop 0 px" in out
    doc = json.loads(js.read_text())
    assert len(doc["images"]) == 6 and doc["protocol"]["crop_border"] == 0
    for row in doc["images"]:
        ref = np.asarray(Image.open(refs / row["image"]))
        jpeg = jpeg_roundtrip(ref, row["quality"])
        assert row["jpeg_psnr_rgb"] == pytest.approx(peak_signal_noise_ratio(ref, jpeg, data_range=255), abs=1e-9)
        expected_ssim = structural_similarity(
            ref / 255.0,
            jpeg / 255.0,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=-1 if ref.ndim == 3 else None,
        )
        assert row["jpeg_ssim_rgb"] == pytest.approx(expected_ssim, abs=1e-7)
        assert row["jpeg_psnrb_y"] <= row["jpeg_psnr_y"] + 1e-9  # BEF only ever adds error
        assert "restored_psnr_rgb" not in row
    means = {m["quality"]: m for m in doc["mean"]}
    q10 = [r["jpeg_psnr_rgb"] for r in doc["images"] if r["quality"] == 10]
    assert means[10]["jpeg_psnr_rgb"] == pytest.approx(np.mean(q10))
    assert means[10]["jpeg_psnr_rgb"] < means[30]["jpeg_psnr_rgb"]
    assert f"{means[10]['jpeg_psnr_rgb']:.2f}" in out
    rows = list(csv.DictReader(cs.open()))
    assert len(rows) == 6 and float(rows[0]["jpeg_psnr_rgb"]) == pytest.approx(
        doc["images"][0]["jpeg_psnr_rgb"], abs=1e-5
    )


def test_trained_weights_gain_and_crop_border(refs, tmp_path, capsys, small_q10_weights):
    js = tmp_path / "r.json"
    code = eval_main(
        [
            "--weights",
            str(small_q10_weights),
            "--images",
            str(refs),
            "--quality",
            "10",
            "--crop-border",
            "4",
            "--json",
            str(js),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "restored PSNR" in out and "border crop 4 px" in out
    doc = json.loads(js.read_text())
    for row in doc["images"]:
        assert row["gain_psnr_rgb"] == pytest.approx(row["restored_psnr_rgb"] - row["jpeg_psnr_rgb"])
        ref = np.asarray(Image.open(refs / row["image"]))[4:-4, 4:-4]
        jpeg = jpeg_roundtrip(np.asarray(Image.open(refs / row["image"])), 10)[4:-4, 4:-4]
        assert row["jpeg_psnr_rgb"] == pytest.approx(peak_signal_noise_ratio(ref, jpeg, data_range=255), abs=1e-9)
    assert doc["mean"][0]["gain_psnr_rgb"] > 0.1  # the in-test trained model really helps


def test_jpeg_dir_pairs_by_name_and_bsr_layout(refs, tmp_path, capsys):
    bsr = tmp_path / "BSR" / "BSDS500" / "data" / "images" / "test"
    bsr.mkdir(parents=True)
    jdir = tmp_path / "jpegs"
    jdir.mkdir()
    for p in sorted(refs.glob("*.png"))[:2]:
        (bsr / p.name).write_bytes(p.read_bytes())
        Image.open(p).save(jdir / f"{p.stem}.jpg", quality=30)
    js1, js2 = tmp_path / "a.json", tmp_path / "b.json"
    assert (
        eval_main(
            [
                "--identity",
                "--images",
                str(tmp_path / "BSR"),
                "--jpeg-dir",
                str(jdir),
                "--json",
                str(js1),
                "--no-progress",
            ]
        )
        == 0
    )
    assert eval_main(["--identity", "--images", str(bsr), "--quality", "30", "--json", str(js2), "--no-progress"]) == 0
    a, b = json.loads(js1.read_text()), json.loads(js2.read_text())
    assert [r["quality"] for r in a["images"]] == [30, 30]  # estimated from the quantisation tables
    for ra, rb in zip(a["images"], b["images"]):
        assert ra["image"] == rb["image"] and ra["jpeg_psnr_rgb"] == pytest.approx(rb["jpeg_psnr_rgb"])
    # a reference without its JPEG: one line naming it, the rest evaluated, exit 1
    (jdir / f"{sorted(refs.glob('*.png'))[0].stem}.jpg").unlink()
    capsys.readouterr()
    assert eval_main(["--identity", "--images", str(bsr), "--jpeg-dir", str(jdir), "--no-progress"]) == 1
    cap = capsys.readouterr()
    assert len([line for line in cap.err.splitlines() if line.startswith("error:")]) == 1
    assert "| 30 | 1 | RGB |" in cap.out


def test_bsds500_jpeg_row_reproduces_published_q10(bsr_root, capsys):
    """Pillow JPEG on the real BSDS500 test split: the published colour JPEG row, 25.84 dB at q10."""
    code = eval_main(["--identity", "--images", str(bsr_root), "--quality", "10", "--metrics", "psnr", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("| 10 | 200 | RGB |"))
    assert row.split("|")[4].strip() == "25.84"


def test_runtime_error_on_one_image_is_one_line_and_the_rest_go_on(refs, tmp_path, capsys, monkeypatch):
    """A RuntimeError while restoring (out of memory, shape mismatch) names the image on one
    line; the other images are evaluated and the exit code is 1. The JSON is written atomically."""
    import restorer.infer.options as options
    from restorer.infer.engine import IdentityRestorer

    class Failing(IdentityRestorer):
        def __init__(self):
            super().__init__()
            self.model = object()  # counts as real weights: restore() is called

        def restore(self, pixels, quality=None, tile=None, progress=None):
            if pixels.ndim == 2:  # camera.png, the gray one
                raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore detail")
            return pixels.copy()

    monkeypatch.setattr(options, "load_restorers", lambda *a, **k: ([Failing()], []))
    js = tmp_path / "out" / "r.json"
    code = eval_main(
        [
            "--weights",
            "fake",
            "--images",
            str(refs),
            "--quality",
            "10",
            "--metrics",
            "psnr",
            "--json",
            str(js),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [f"error: {refs / 'camera.png'}: failed (RuntimeError: CUDA out of memory. Tried to allocate 2 GiB)"]
    assert sorted(r["image"] for r in json.loads(js.read_text())["images"]) == ["astronaut.png", "coffee.png"]
    assert [p.name for p in js.parent.iterdir()] == ["r.json"]  # no temporary file left


def test_unwritable_json_is_one_line(refs, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = eval_main(
        [
            "--weights",
            "none",
            "--images",
            str(refs),
            "--quality",
            "10",
            "--metrics",
            "psnr",
            "--json",
            str(blocker / "r.json"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {blocker / 'r.json'}: cannot write (")


def test_eval_reads_reference_images_from_a_bucket(refs, tmp_path, s3_bucket, small_q10_weights, capsys):
    """`--images s3://bucket/BSR` (BSR layout in the bucket) gives the same rows as the local folder."""
    import boto3

    bucket = s3_bucket[len("s3://") :]
    client = boto3.client("s3")
    for f in refs.iterdir():
        client.put_object(Bucket=bucket, Key=f"BSR/BSDS500/data/images/test/{f.name}", Body=f.read_bytes())
    local, remote = tmp_path / "local.json", tmp_path / "remote.json"
    common = ["--weights", str(small_q10_weights), "--quality", "10", "--metrics", "psnr", "--no-progress"]
    assert eval_main([*common, "--images", str(refs), "--json", str(local)]) == 0
    assert eval_main([*common, "--images", f"{s3_bucket}/BSR", "--json", str(remote)]) == 0
    rows = json.loads(remote.read_text())["images"]
    assert len(rows) == 3 and rows == json.loads(local.read_text())["images"]
    capsys.readouterr()
    assert eval_main([*common, "--images", f"{s3_bucket}/nothing"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "/nothing: no images here" in err
