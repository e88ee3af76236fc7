"""`restorer restore` end to end: real photos, metadata kept, every bad input one line, hostile files."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EvilPickle, photos
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms
from skimage import data

from restorer.errors import UserError
from restorer.imageio import open_image
from restorer.infer.restore import main as restore_main
from restorer.model import ModelConfig, build_model
from restorer.modelfile import export_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def identity_weights(tmp_path_factory) -> Path:
    """An untrained residual net: exactly the identity, so pixel checks are exact."""
    cfg = ModelConfig(preset="tiny")
    return export_weights(build_model(cfg), cfg, tmp_path_factory.mktemp("ident"), facts={"quality": "10-90"})


def run(argv, capsys):
    code = restore_main([str(a) for a in argv] + ["--no-progress"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def jpeg_file(path: Path, arr: np.ndarray, quality: int = 10, **kw) -> Path:
    Image.fromarray(arr).save(path, format="JPEG", quality=quality, **kw)
    return path


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_round_trip_on_real_photos_improves_psnr(tmp_path, capsys, small_q10_weights):
    src = tmp_path / "in"
    src.mkdir()
    refs = {}
    for name, ref in photos().items():
        refs[name] = ref
        jpeg_file(src / f"{name}.jpg", ref, 10)
    code, out, err = run([src, "-o", tmp_path / "out", "--weights", small_q10_weights, "--tile", "160"], capsys)
    assert code == 0, err
    for name, ref in refs.items():
        restored = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        jpeg = np.asarray(Image.open(src / f"{name}.jpg"))
        assert restored.shape == ref.shape
        diff_jpeg, diff_restored = jpeg.astype(float) - ref, restored.astype(float) - ref
        assert 10 * np.log10(np.mean(diff_jpeg**2) / np.mean(diff_restored**2)) > 0.1, name
        assert f"{name}.jpg" in out and "quality 10 (quantisation tables" in out
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_orientation_icc_exif_kept(tmp_path, capsys, identity_weights):
    arr = data.astronaut()[:64, :96]  # wide
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    exif[0x010F] = "TestCam"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = jpeg_file(tmp_path / "rot.jpg", arr, 90, exif=exif.tobytes(), icc_profile=icc)
    # --no-projection: the pixels must be exactly the upright JPEG (the projection moves a few by a level)
    code, out, err = run([src, "-o", tmp_path / "rot.png", "--weights", identity_weights, "--no-projection"], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "rot.png") as res:
        assert res.size == (64, 96)  # upright: portrait
        assert res.info.get("icc_profile") == icc
        assert res.getexif().get(0x010F) == "TestCam"
        assert res.getexif().get(0x0112) == 1
        upright = np.asarray(Image.open(src).transpose(Image.Transpose.ROTATE_270))
        assert np.array_equal(np.asarray(res), upright)
    assert "orientation 6 applied" in out


def test_grayscale_stays_grayscale(tmp_path, capsys, identity_weights):
    src = jpeg_file(tmp_path / "g.jpg", data.camera()[:80, :72], 20)
    gray_model = export_weights(
        build_model(ModelConfig(preset="tiny", in_channels=1)),
        ModelConfig(preset="tiny", in_channels=1),
        tmp_path / "gray_w",
    )
    for i, w in enumerate((identity_weights, gray_model)):
        code, _, err = run([src, "-o", tmp_path / f"o{i}", "--weights", w], capsys)
        assert code == 0, err
        with Image.open(tmp_path / f"o{i}" / "g.png") as res:
            assert res.mode == "L"
            assert np.array_equal(np.asarray(res), np.asarray(Image.open(src)))


def test_alpha_kept_and_non_jpeg_told_its_quality(tmp_path, capsys, small_q10_weights):
    rgba = np.dstack([data.coffee()[:64, :64], np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    # a PNG carries no quantisation tables: its quality is estimated (test_non_jpeg_gets_the_estimate)
    # or given with --quality
    code, out, err = run(
        [tmp_path / "a.png", "-o", tmp_path / "out", "--weights", small_q10_weights, "--quality", "10"], capsys
    )
    assert code == 0, err
    assert "quality 10 (--quality)" in out
    with Image.open(tmp_path / "out" / "a.png") as res:
        assert res.mode == "RGBA"
        assert np.array_equal(np.asarray(res)[:, :, 3], rgba[:, :, 3])


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height (its data is tiny and wrong)."""

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )
    return path


def test_bad_inputs_one_line_each_others_processed(tmp_path, capsys, identity_weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = jpeg_file(tmp_path / "good.jpg", data.chelsea()[:48, :48], 30)
    full = tmp_path / "full.jpg"
    jpeg_file(full, data.coffee(), 50)
    (tmp_path / "trunc.jpg").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(3000))
    _bomb_png(tmp_path / "bomb.png", 60000, 60000)
    (tmp_path / "empty.jpg").write_bytes(b"")
    bad = ["trunc.jpg", "text.jpg", "random.png", "bomb.png", "empty.jpg", "missing.jpg"]
    # weights: one good, one missing, one garbage, two pickles (as .safetensors and .pt)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps({"w": EvilPickle(tmp_path / "PWNED_BY_PICKLE")}))
    torch.save({"w": EvilPickle(tmp_path / "PWNED_BY_PICKLE")}, tmp_path / "evil.pt")
    bad_w = ["missing.safetensors", "garbage.safetensors", "evil.safetensors", "evil.pt"]
    code, out, err = run([good, *bad, "-o", tmp_path / "out", "--weights", identity_weights, *bad_w], capsys)
    assert code == 1
    lines = error_lines(err)
    for name in bad + bad_w:
        assert sum(name in line for line in lines) == 1, (name, lines)
    assert len(lines) == len(bad) + len(bad_w)
    assert "megapixels" in next(line for line in lines if "bomb.png" in line)
    assert (tmp_path / "out" / "good.png").is_file() and "good.jpg" in out
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    # only bad weights: refused, nothing run, one line per file plus the summary
    code = restore_main([str(good), "-o", str(tmp_path / "o2"), "--weights", "evil.pt", "evil.safetensors"])
    assert code == 2 and not (tmp_path / "o2").exists()
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_max_pixels_is_configurable(tmp_path, capsys, identity_weights):
    src = jpeg_file(tmp_path / "p.jpg", data.coffee()[:100, :100], 30)
    code, _, err = run([src, "-o", tmp_path / "o", "--weights", identity_weights, "--max-pixels", "5000"], capsys)
    assert code == 1 and "p.jpg" in err and "--max-pixels" in err


def test_overwrite(tmp_path, capsys, identity_weights):
    src = jpeg_file(tmp_path / "x.jpg", data.coffee()[:40, :40], 30)
    target = tmp_path / "out" / "x.png"
    target.parent.mkdir()
    target.write_bytes(b"precious")
    code, _, err = run([src, "-o", tmp_path / "out", "--weights", identity_weights], capsys)
    assert code == 1 and "x.png" in err and "--overwrite" in err
    assert target.read_bytes() == b"precious"
    code, _, err = run([src, "-o", tmp_path / "out", "--weights", identity_weights, "--overwrite"], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(target)), np.asarray(Image.open(src)))


def test_globs_and_nearest_weights_printed(tmp_path, capsys):
    for q in (10, 40):
        jpeg_file(tmp_path / f"img_q{q}.jpg", data.chelsea()[:40, :56], q)
    cfg = ModelConfig(preset="tiny")
    for q in ("10", "30-50"):
        export_weights(build_model(cfg), cfg, tmp_path / "weights" / f"w{q}", facts={"quality": q})
    code, out, err = run(
        [str(tmp_path / "img_*.jpg"), "-o", tmp_path / "out", "--weights", tmp_path / "weights"], capsys
    )
    assert code == 0, err
    line10 = next(line for line in out.splitlines() if "img_q10.jpg" in line)
    line40 = next(line for line in out.splitlines() if "img_q40.jpg" in line)
    assert "w10" in line10 and "quality 10" in line10
    assert "w30-50" in line40 and "trained on quality 30-50" in line40
    code, out, _ = run(
        [str(tmp_path / "img_*.jpg"), "-o", tmp_path / "out2", "--weights", tmp_path / "weights", "--quality", "45"],
        capsys,
    )
    assert code == 0 and out.count("w30-50") == 2 and "quality 45 (--quality)" in out


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        restore_main(["--help"])
    assert exc.value.code == 0
    assert "examples:" in capsys.readouterr().out


# --- hostile files: a clear UserError or a valid image, never a crash, hang or huge allocation --------
_REAL_JPEG = io.BytesIO()
Image.fromarray(data.astronaut()[:128, :128]).save(_REAL_JPEG, format="JPEG", quality=50)
_REAL_JPEG = _REAL_JPEG.getvalue()


def _check_hostile(path: Path) -> None:
    try:
        img = open_image(path, max_pixels=4_000_000)
    except UserError as exc:
        text = str(exc)
        assert "\n" not in text and str(path) in text
        return
    assert img.pixels.dtype == np.uint8 and img.pixels.size <= 3 * 4_000_000


@settings(max_examples=50, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["random", "prefix", "flip", "wrong_ext", "huge"]),
    blob=st.binary(max_size=2048),
    cut=st.integers(0, len(_REAL_JPEG)),
    w=st.integers(1, 2**31 - 1),
    h=st.integers(1, 2**31 - 1),
)
def test_hostile_images_never_crash(tmp_path, kind, blob, cut, w, h):
    path = (
        tmp_path / {"random": "r.jpg", "prefix": "p.jpg", "flip": "f.jpg", "wrong_ext": "w.png", "huge": "h.png"}[kind]
    )
    if kind == "random":
        path.write_bytes(blob)
    elif kind == "prefix":
        path.write_bytes(_REAL_JPEG[:cut])
    elif kind == "flip":  # corrupt a few bytes inside a real JPEG
        raw = bytearray(_REAL_JPEG)
        for i, b in enumerate(blob[:16]):
            raw[(cut + 97 * i) % len(raw)] = b
        path.write_bytes(bytes(raw))
    elif kind == "wrong_ext":
        path.write_bytes(_REAL_JPEG)
    else:
        _bomb_png(path, w, h)
    _check_hostile(path)


def test_huge_declared_jpeg_refused_before_decoding(tmp_path):
    # patch the SOF0 frame size of a real JPEG to 65500 x 65500
    raw = bytearray(_REAL_JPEG)
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = struct.pack(">HH", 65500, 65500)
    (tmp_path / "big.jpg").write_bytes(bytes(raw))
    with pytest.raises(UserError, match="megapixels"):
        open_image(tmp_path / "big.jpg")


# --- issue 13: outputs never destroy inputs; where outputs go; quality range; packaged names ----------
def _digest(path: Path) -> bytes:
    import hashlib

    return hashlib.sha256(path.read_bytes()).digest()


@pytest.fixture(scope="module")
def q10_40_weights(tmp_path_factory) -> Path:
    """A model that really changes pixels (fixed random weights), trained range 10-40."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny")
    model = build_model(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return export_weights(
        model, cfg, tmp_path_factory.mktemp("q10_40"), facts={"quality": "10-40", "quality_range": [10, 40]}
    )


def test_default_output_is_beside_the_input(tmp_path, capsys, identity_weights):
    src = jpeg_file(tmp_path / "photo.jpg", data.chelsea()[:48, :64], 30)
    before = _digest(src)
    code, out, err = run([src, "--weights", identity_weights], capsys)
    assert code == 0, err
    target = tmp_path / "photo.restored.png"
    assert f"-> {target}" in out
    with Image.open(target) as res:
        assert res.format == "PNG" and np.array_equal(np.asarray(res), np.asarray(Image.open(src)))
    # a second run over the folder: the earlier output is not restored again, the input untouched
    code, out, err = run([tmp_path, "--weights", identity_weights, "--overwrite"], capsys)
    assert code == 0, err
    assert "skipped 1 earlier output" in err and "photo.restored.restored" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg", "photo.restored.png"]
    assert _digest(src) == before
    code, _, err = run([src, "--weights", identity_weights, "--format", "tiff"], capsys)
    assert code == 0 and (tmp_path / "photo.restored.tif").is_file()


def test_never_writes_over_an_input_even_with_overwrite(tmp_path, capsys, identity_weights):
    folder = tmp_path / "photos"
    folder.mkdir()
    jpg = jpeg_file(folder / "photo.jpg", data.chelsea()[:48, :64], 30)
    png = folder / "scan.png"
    Image.fromarray(data.coffee()[:40, :40]).save(png)
    digests = {p: _digest(p) for p in (jpg, png)}
    # the case: a folder restored into itself as JPEG replaced photo.jpg
    code, out, err = run(
        [folder, "-o", folder, "--format", "jpeg", "--overwrite", "--quality", "30", "--weights", identity_weights],
        capsys,
    )
    assert code == 1
    line = next(line for line in error_lines(err) if "photo.jpg" in line)
    assert "input" in line and "--overwrite" in line
    # a PNG restored into its own folder as PNG
    code, _, err = run([png, "-o", folder, "--quality", "30", "--overwrite", "--weights", identity_weights], capsys)
    assert code == 1 and "refusing to write over an input" in err
    # the same file through a hard link and a symbolic link
    os.link(png, tmp_path / "hard.png")
    (tmp_path / "soft.png").symlink_to(png)
    for alias in ("hard.png", "soft.png"):
        code, _, err = run(
            [png, "-o", tmp_path / alias, "--quality", "30", "--overwrite", "--weights", identity_weights], capsys
        )
        assert code == 1 and "refusing to write over an input" in err, alias
    assert all(_digest(p) == d for p, d in digests.items())
    # only the output that was not an input was written (scan.png -> scan.jpg in the first run)
    assert sorted(p.name for p in folder.iterdir()) == ["photo.jpg", "scan.jpg", "scan.png"]


def test_output_name_decides_file_and_format(tmp_path, capsys, identity_weights):
    a = jpeg_file(tmp_path / "a.jpg", data.chelsea()[:48, :64], 30)
    b = jpeg_file(tmp_path / "b.jpg", data.coffee()[:48, :64], 30)
    code, _, err = run([a, "-o", tmp_path / "named.webp", "--weights", identity_weights], capsys)
    assert code == 0, err
    assert (tmp_path / "named.webp").is_file()  # a file, not a folder
    with Image.open(tmp_path / "named.webp") as res:
        assert res.format == "WEBP" and np.array_equal(np.asarray(res.convert("RGB")), np.asarray(Image.open(a)))
    code, _, err = run([a, "-o", tmp_path / "x.jpg", "--weights", identity_weights], capsys)
    assert code == 0 and Image.open(tmp_path / "x.jpg").format == "JPEG"
    # contradictions are usage errors: one line naming the output, nothing written
    for argv, words in (
        ([a, b, "-o", tmp_path / "single.png"], ("single.png", "2 input images")),
        ([a, "-o", tmp_path / "out.png", "--format", "jpeg"], ("out.png", "--format jpeg")),
        ([a, "-o", tmp_path / "out.bmp"], ("out.bmp", "cannot write .bmp")),
    ):
        code, _, err = run([*argv, "--weights", identity_weights], capsys)
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "b.jpg", "named.webp", "x.jpg"]


def test_error_names_the_output_that_failed(tmp_path, capsys, identity_weights):
    src = jpeg_file(tmp_path / "in.jpg", data.chelsea()[:48, :64], 30)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    outs = [blocker / "restored"] + ([Path("/proc/restored")] if Path("/proc/self").exists() else [])
    for bad in outs:
        code, _, err = run([src, "-o", str(bad) + "/", "--weights", identity_weights], capsys)
        lines = error_lines(err)
        assert code == 1 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: {bad}: cannot create the output folder"), lines


def test_outside_the_trained_quality_range_is_passed_through(tmp_path, capsys, q10_40_weights):
    src = jpeg_file(tmp_path / "hi.jpg", data.chelsea()[:64, :64], 90)
    decoded = np.asarray(Image.open(src))
    code, out, err = run([src, "-o", tmp_path / "pass.png", "--weights", q10_40_weights], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "hi.jpg" in notes[0] and "quality 90" in notes[0] and "10-40" in notes[0]
    assert "--force" in notes[0] and "written unchanged" in out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pass.png")), decoded)
    code, out, err = run([src, "-o", tmp_path / "forced.png", "--weights", q10_40_weights, "--force"], capsys)
    assert code == 0 and "note:" not in err
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "forced.png")), decoded)
    # inside the range the model is applied
    low = jpeg_file(tmp_path / "lo.jpg", data.chelsea()[:64, :64], 20)
    code, _, err = run([low, "-o", tmp_path / "lo.png", "--weights", q10_40_weights], capsys)
    assert code == 0 and "note:" not in err
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "lo.png")), np.asarray(Image.open(low)))


def test_packaged_weight_names(tmp_path, capsys, monkeypatch, identity_weights):
    import shutil

    from restorer import weights as packaged

    src = jpeg_file(tmp_path / "photo.jpg", data.chelsea()[:48, :64], 30)
    empty = tmp_path / "no_weights"
    empty.mkdir()
    monkeypatch.setattr(packaged, "FOLDER", empty)
    for argv in ([src, "--weights", "quality"], [src]):  # no --weights on a CPU: 'fast'
        code, _, err = run([*argv, "--device", "cpu"], capsys)
        lines = error_lines(err)
        name = "quality" if "quality" in argv else "fast"
        assert code == 2 and len(lines) == 1, lines  # one line, no "no usable weights" summary after it
        assert f"'{name}' model is not installed" in lines[0] and "--weights PATH" in lines[0]
    assert not (tmp_path / "photo.restored.png").exists()
    # with the packaged files present: `restorer restore photo.jpg`, no other argument
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copyfile(identity_weights, shipped / "fast.safetensors")
    shutil.copyfile(identity_weights.with_name("model.json"), shipped / "fast.json")
    monkeypatch.setattr(packaged, "FOLDER", shipped)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run([src], capsys)
    assert code == 0, err
    assert (tmp_path / "photo.restored.png").is_file()


def test_packaged_weights_ship_as_package_data():
    """The wheel must carry restorer/weights/*.safetensors + *.json (checked by building one by
    hand; here the declaration that makes setuptools include them)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from restorer import weights as packaged

    doc = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert set(doc["tool"]["setuptools"]["package-data"]["restorer.weights"]) >= {"*.safetensors", "*.json"}
    assert packaged.FOLDER == Path(packaged.__file__).resolve().parent


def test_output_is_the_projection_of_the_model_output_by_default(tmp_path, capsys, small_q10_weights):
    """restore = model, then the projection onto the file's quantisation set (of the upright,
    EXIF-rotated output); --no-projection writes the model's output itself."""
    from restorer.infer.projection import project_upright

    arr = data.astronaut()[100:196, 120:184]
    exif = Image.Exif()
    exif[0x0112] = 6
    src = jpeg_file(tmp_path / "p.jpg", arr, 10, exif=exif.tobytes())
    for extra, name in (([], "proj.png"), (["--no-projection"], "raw.png")):
        code, _, err = run([src, "-o", tmp_path / name, "--weights", small_q10_weights, *extra], capsys)
        assert code == 0, err
    raw = np.asarray(Image.open(tmp_path / "raw.png"))
    proj = np.asarray(Image.open(tmp_path / "proj.png"))
    assert np.array_equal(proj, project_upright(raw, src))
    assert not np.array_equal(proj, raw)


# --- issue 19: --quality auto on re-saved photos ------------------------------------------------------------

needs_estimator = pytest.mark.skipif(
    not (Path(__file__).parents[1] / "restorer/weights/estimator.safetensors").is_file(),
    reason="no packaged quality estimator (restorer/weights/estimator.safetensors)",
)


def _resaved(tmp_path: Path, spec: str) -> tuple[Path, np.ndarray]:
    """A photo through the chain ``spec`` as a JPEG file, and its clean reference."""
    from restorer.data.degrade import apply_chain, parse_chain

    ref = np.ascontiguousarray(data.astronaut()[64:320, 96:352])
    _, clean, jpeg = apply_chain(ref, parse_chain(spec))
    path = tmp_path / f"{spec.replace('>', '_')}.jpg"
    path.write_bytes(jpeg)
    return path, clean


def _psnr(path: Path, ref: np.ndarray) -> float:
    mse = np.mean((np.asarray(Image.open(path)).astype(np.float64) - ref) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@needs_estimator
def test_a_resaved_photo_restores_better_than_with_its_tables(tmp_path, capsys):
    """A photo saved at q30, cropped by 4 px and re-saved at q80 reads q80 from its tables: told q80 and
    projected onto the q80 set (the old default), the model leaves it almost untouched; --quality auto
    finds the earlier save's lattice in the pixels, tells the model its quality and skips the
    projection."""
    src, ref = _resaved(tmp_path, "30>s4>80")
    runs = {}
    for rule in ("tables", "auto"):
        out = tmp_path / f"{rule}.png"
        code, stdout, err = run(
            [src, "-o", out, "--weights", "fast", "--quality-rule", rule, "--device", "cpu"], capsys
        )
        assert code == 0, err
        runs[rule] = (_psnr(out, ref), stdout)
    jpeg_db = _psnr(src, ref)
    assert "quality 80 (quantisation tables)" in runs["tables"][1]
    assert "an earlier, stronger save found in the pixels; the tables say 80" in runs["auto"][1]
    assert "quality 30 " in runs["auto"][1] and "not projected" in runs["auto"][1]
    assert runs["auto"][0] > runs["tables"][0] + 0.3 and runs["auto"][0] > jpeg_db + 0.5, (jpeg_db, runs)


@needs_estimator
def test_projection_decision_is_printed_with_v_and_recorded_in_json(tmp_path, capsys):
    first, _ = _resaved(tmp_path, "50")
    resaved, _ = _resaved(tmp_path, "30>80")
    report = tmp_path / "report.json"
    args = [
        first,
        resaved,
        "-o",
        tmp_path / "out",
        "--weights",
        "fast",
        "-v",
        "--json",
        report,
        "--quality-rule",
        "auto",
    ]
    code, out, err = run(args, capsys)
    assert code == 0, err
    lines = {line.split(" -> ")[0]: line for line in out.splitlines() if " -> " in line}
    assert "projected onto the JPEG's quantisation set" in lines[str(first)]
    assert "not projected" in lines[str(resaved)]
    import json

    photos_ = {Path(r["input"]).name: r for r in json.loads(report.read_text())["photos"]}
    a, b = photos_[first.name], photos_[resaved.name]
    assert (a["source"], a["tables"], a["quality"], a["project"], a["lattice"]) == ("tables", 50, 50, True, None)
    assert (b["source"], b["tables"], b["project"], b["quality"]) == ("earlier save", 80, False, 30)
    assert b["lattice"]["offset"] == [0, 0] and b["lattice"]["score"] >= 0.75
    assert b["why"] and b["output"].endswith(".png")


@needs_estimator
@pytest.mark.parametrize("scale", [1.0, 0.75])
def test_non_jpeg_gets_its_lattice_or_the_estimate(tmp_path, capsys, scale):
    """A PNG screenshot of a q20 JPEG: restored with the quality read from its pixels, not refused:
    the JPEG's lattice when the screenshot kept its pixels, the estimate when it was resized."""
    jpeg, ref = _resaved(tmp_path, "20")
    shot = tmp_path / "shot.png"
    with Image.open(jpeg) as im:
        size = (round(im.width * scale), round(im.height * scale))
        im.resize(size, Image.Resampling.BICUBIC).save(shot)
    ref = np.asarray(Image.fromarray(ref.astype(np.uint8)).resize(size, Image.Resampling.BICUBIC))
    code, out, err = run([shot, "-o", tmp_path / "out.png", "--weights", "fast"], capsys)
    assert code == 0, err
    how = "a JPEG save found in the pixels" if scale == 1.0 else "estimated from the pixels"
    assert f"{how}: no JPEG tables" in out and "not projected" in out
    quality = int(out.split("quality ")[1].split(" ")[0])
    assert (18 <= quality <= 22) if scale == 1.0 else (10 <= quality <= 40), quality
    assert _psnr(tmp_path / "out.png", ref) > _psnr(shot, ref) + 0.5
