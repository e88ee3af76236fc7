"""`restorer compare`: a JPEG | restored | original panel with PSNR captions and a sensible crop."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from restorer.infer.compare import auto_crop
from restorer.infer.compare import main as compare_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_panel_from_a_real_photo(tmp_path, capsys, small_q10_weights):
    src = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()[:, 224:]).save(src)  # the right half, unseen in training
    out = tmp_path / "panel.png"
    code = compare_main(
        [
            str(src),
            "--weights",
            str(small_q10_weights),
            "--quality",
            "10",
            "-o",
            str(out),
            "--crop-size",
            "64",
            "--zoom",
            "3",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    with Image.open(out) as panel:
        w, h = panel.size
        assert w == 3 * 64 * 3 + 4 * 8 and h > 64 * 3 + 20  # three 192 px crops, gaps, captions
        arr = np.asarray(panel)
    # captions drawn below the crops: dark text pixels in the caption band of every column
    band = arr[8 + 192 + 2 :, :, :].min(axis=2)
    for col in range(3):
        x0 = 8 + col * (192 + 8)
        assert (band[:, x0 : x0 + 192] < 100).any()
    jpeg_db, restored_db = (float(t.split(" dB")[0].split()[-1]) for t in text.split(",")[:2])
    assert restored_db > jpeg_db
    # the crop shown equals the original, enlarged with nearest neighbour
    x, y, cw, ch = (int(v) for v in text.strip().split("crop ")[-1].split(","))
    orig = data.chelsea()[:, 224:][y : y + ch, x : x + cw]
    shown = arr[8 : 8 + 192, 8 + 2 * 200 : 8 + 2 * 200 + 192]
    assert np.array_equal(shown[::3, ::3], orig)


def test_explicit_crop_and_overwrite(tmp_path, capsys):
    src = tmp_path / "a.png"
    Image.fromarray(data.astronaut()[:128, :128]).save(src)
    out = tmp_path / "p.png"
    assert compare_main([str(src), "--weights", "none", "--crop", "16,24,40,32", "-o", str(out)]) == 0
    assert Image.open(out).size == (3 * 120 + 32, Image.open(out).size[1])
    assert compare_main([str(src), "--weights", "none", "-o", str(out)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert (
        compare_main([str(src), "--weights", "none", "--crop", "100,100,64,64", "-o", str(out), "--overwrite"]) == 2
    )  # does not fit


def test_auto_crop_finds_the_largest_error():
    err = np.zeros((200, 300))
    err[120:150, 210:250] = 1.0
    x, y, w, h = auto_crop(err, 48)
    assert (w, h) == (48, 48) and x % 8 == 0 and y % 8 == 0
    assert x <= 210 and x + w >= 250 - 8 and y <= 120 and y + h >= 150


def test_runtime_error_while_restoring_is_one_line(tmp_path, capsys, monkeypatch):
    from restorer.infer.engine import IdentityRestorer

    def boom(self, pixels, quality=None, tile=None, progress=None):
        raise RuntimeError("Given groups=1, weight of size [32, 3, 3, 3], expected input ...\ntrace")

    monkeypatch.setattr(IdentityRestorer, "restore", boom)
    src = tmp_path / "a.png"
    Image.fromarray(data.astronaut()[:64, :64]).save(src)
    code = compare_main([str(src), "--weights", "none", "-o", str(tmp_path / "p.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {src}: failed (RuntimeError: Given groups=1")
    assert not (tmp_path / "p.png").exists()


def test_psnr_is_the_metrics_one():
    from restorer.infer.compare import _psnr

    ref = data.astronaut()[:64, :64]
    noisy = np.clip(ref.astype(int) + np.random.default_rng(0).integers(-9, 10, ref.shape), 0, 255).astype(np.uint8)
    mse = np.mean((ref.astype(np.float64) - noisy) ** 2)
    assert _psnr(noisy, ref) == pytest.approx(10 * np.log10(255.0**2 / mse), abs=1e-9)
    assert _psnr(ref, ref) == float("inf")


def test_jpeg_of_another_image_is_refused(tmp_path, capsys):
    src, other = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(data.astronaut()[:128, :128]).save(src)
    Image.fromarray(data.coffee()[:128, :128]).save(other, quality=90)  # same size, another photo
    out = tmp_path / "p.png"
    code = compare_main([str(src), "--jpeg", str(other), "--weights", "none", "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(other) in err[0] and "not a JPEG of that image" in err[0]
    assert not out.exists()
    # a real JPEG of it at a low quality is accepted
    Image.fromarray(data.astronaut()[:128, :128]).save(tmp_path / "a5.jpg", quality=5)
    assert (
        compare_main(
            [str(src), "--jpeg", str(tmp_path / "a5.jpg"), "--weights", "none", "-o", str(out), "--no-progress"]
        )
        == 0
    )


def test_panel_never_replaces_an_input(tmp_path, capsys):
    src = tmp_path / "a.png"
    Image.fromarray(data.astronaut()[:64, :64]).save(src)
    before = src.read_bytes()
    code = compare_main([str(src), "--weights", "none", "-o", str(src), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to write over an input" in err
    assert src.read_bytes() == before


def test_versus_tables_shows_both_rules_on_a_resaved_jpeg(tmp_path, capsys):
    """--versus-tables: a fourth pane, the model told the tables' quality and projected, beside
    the default rule, which finds the earlier q30 save of a q30 -> q80 chain."""
    from restorer.data.degrade import apply_chain, parse_chain

    src, jpeg, out = tmp_path / "a.png", tmp_path / "a_30_80.jpg", tmp_path / "panel.png"
    img = data.astronaut()
    Image.fromarray(img).save(src)
    jpeg.write_bytes(apply_chain(img, parse_chain("30>80"))[2])
    argv = [str(src), "--jpeg", str(jpeg), "--weights", "none", "--crop-size", "32", "--zoom", "2", "-o", str(out)]
    assert compare_main([*argv, "--versus-tables", "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert "tables rule" in line and "told q80" in line and "told q30" in line
    with Image.open(out) as panel:
        assert panel.size[0] == 4 * 64 + 5 * 8  # JPEG, tables rule, default rule, original
    assert compare_main([*argv, "--versus-tables", "--quality", "30", "--overwrite"]) == 2
    assert "drop --quality" in capsys.readouterr().err
