"""restorer.infer.projection: reading a JPEG's coefficients exactly, and projecting restored images
onto the file's quantisation set (near no-op on the JPEG, never away from an original in the set,
closer to the original for bad restorations)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from restorer.errors import UserError
from restorer.infer.projection import (
    DCT,
    ORIENTATION_TAG,
    project,
    project_float,
    project_planes,
    project_upright,
    read_coefficients,
    to_stored,
    to_upright,
)

BSDS_TEST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "BSR" / "BSDS500" / "data" / "images" / "test"
SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def photo(h: int = 120, w: int = 160, y: int = 40, x: int = 150) -> np.ndarray:
    """A crop of a real photograph shipped with scikit-image (no download)."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[y : y + h, x : x + w])


def encode(img: np.ndarray, quality: int, subsampling: str = "4:2:0", **kwargs) -> bytes:
    buf = io.BytesIO()
    extra = {} if img.ndim == 2 else {"subsampling": SUBSAMPLING[subsampling]}
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, **extra, **kwargs)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Pixels in the file's stored orientation (Pillow does not apply EXIF on its own)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def blur(img: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    s = (sigma, sigma) + ((0,) if img.ndim == 3 else ())
    return np.clip(np.rint(gaussian_filter(img.astype(np.float64), s)), 0, 255).astype(np.uint8)


def block_dct(plane: np.ndarray) -> np.ndarray:
    """Reference 8x8 DCT, one block at a time: [r, c, 8, 8]."""
    r, c = plane.shape[0] // 8, plane.shape[1] // 8
    return np.array(
        [[DCT @ (plane[8 * i : 8 * i + 8, 8 * j : 8 * j + 8] - 128.0) @ DCT.T for j in range(c)] for i in range(r)]
    )


# -- reading ----------------------------------------------------------------------------------------
def test_coefficients_are_the_files_own():
    img = photo()
    data = encode(img, 50, "4:4:4")
    coefs = read_coefficients(data)
    assert (coefs.height, coefs.width, len(coefs.components)) == (120, 160, 3)
    with Image.open(io.BytesIO(data)) as im:
        tables = im.quantization
    assert np.array_equal(coefs.components[0].qtable.ravel(), np.asarray(tables[0]))
    assert np.array_equal(coefs.components[1].qtable.ravel(), np.asarray(tables[1]))
    # the decoder's luma is the inverse DCT of k*Q (up to libjpeg's integer IDCT and clamping):
    # the DCT of the decoded plane lies within a fraction of Q of k*Q, in natural (v, u) order
    y = decode(data).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    comp = coefs.components[0]
    err = np.abs(block_dct(y) - comp.coef * comp.qtable)
    assert np.mean(err) < 1.0 and np.mean(err <= comp.qtable / 2 + 1.5) > 0.99


@pytest.mark.parametrize("kind", ["progressive", "restart markers", "optimized huffman"])
def test_progressive_and_restart_markers_give_identical_coefficients(kind):
    img = photo(101, 133)  # odd size: partial blocks and MCUs
    kwargs = {
        "progressive": {"progressive": True},
        "restart markers": {"restart_marker_blocks": 3},
        "optimized huffman": {"optimize": True},
    }[kind]
    base, other = read_coefficients(encode(img, 40)), read_coefficients(encode(img, 40, **kwargs))
    if kind == "restart markers":
        assert encode(img, 40, **kwargs).count(b"\xff\xd0") > 0  # the markers are really there
    assert other.progressive == (kind == "progressive")
    for a, b in zip(base.components, other.components, strict=True):
        assert np.array_equal(a.coef, b.coef) and np.array_equal(a.qtable, b.qtable) and a.factor == b.factor


@pytest.mark.parametrize("sub,factor", [("4:4:4", (1, 1)), ("4:2:2", (1, 2)), ("4:2:0", (2, 2))])
def test_sampling_factors(sub, factor):
    coefs = read_coefficients(encode(photo(101, 133), 60, sub))
    assert coefs.components[0].factor == (1, 1)
    assert coefs.components[1].factor == coefs.components[2].factor == factor
    assert coefs.components[1].coef.shape[:2] == (-(-101 // (8 * factor[0])), -(-133 // (8 * factor[1])))


def test_path_and_bytes_agree(tmp_path):
    data = encode(photo(), 30)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    restored = blur(decode(data))
    assert np.array_equal(project(restored, path), project(restored, data))
    assert np.array_equal(project(restored, str(path)), project(restored, read_coefficients(data)))
    assert path.read_bytes() == data  # the input file is never modified


def test_bytes_already_decoded_by_open_image(tmp_path):
    """restore reads each JPEG once: open_image keeps the bytes it decoded, and the coefficients
    read from them (without a second decode) are those of the file, with its orientation."""
    from restorer.imageio import open_image

    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 8
    path = tmp_path / "p.jpg"
    path.write_bytes(encode(photo(), 30, exif=exif.tobytes()))
    img = open_image(path)
    assert img.data == path.read_bytes()
    fast = read_coefficients(img.data, decoded=(str(path), img.orientation))
    full = read_coefficients(path)
    assert (fast.name, fast.orientation, fast.height, fast.width) == (full.name, 8, full.height, full.width)
    for a, b in zip(fast.components, full.components, strict=True):
        assert np.array_equal(a.coef, b.coef) and np.array_equal(a.qtable, b.qtable) and a.factor == b.factor
    bad = blur(img.pixels)
    assert np.array_equal(project_upright(bad, fast), project_upright(bad, path))


@pytest.mark.parametrize(
    "content,expect",
    [
        (None, "no such file"),
        (b"", "not an image"),
        (b"not a jpeg at all", "not an image"),
        ("truncated", "unreadable JPEG"),
        ("png", "not a JPEG"),
        ("cmyk", "not supported"),
    ],
)
def test_bad_files_give_one_clear_user_error(tmp_path, content, expect):
    path = tmp_path / "photo.jpg"
    if content == "truncated":
        content = encode(photo(), 50)[:1500]
    elif content == "png":
        buf = io.BytesIO()
        Image.fromarray(photo()).save(buf, format="PNG")
        content = buf.getvalue()
    elif content == "cmyk":
        buf = io.BytesIO()
        Image.fromarray(photo()).convert("CMYK").save(buf, format="JPEG", quality=50)
        content = buf.getvalue()
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as err:
        project(photo(), path)
    msg = str(err.value)
    assert str(path) in msg and expect in msg and "\n" not in msg


# -- near no-op on the JPEG ---------------------------------------------------------------------------
@pytest.mark.parametrize("sub", ["4:4:4", "4:2:2", "4:2:0"])
@pytest.mark.parametrize("quality", [10, 50, 95])
@pytest.mark.parametrize("size", [(120, 160), (101, 133), (9, 7)])
def test_projecting_the_jpeg_itself_is_near_noop(sub, quality, size):
    data = encode(photo(*size), quality, sub)
    jpeg = decode(data)
    out = project(jpeg, data)
    assert out.shape == jpeg.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - jpeg)
    assert diff.mean() < 0.05 and diff.max() <= 6, (diff.mean(), diff.max())


def test_grayscale_jpeg():
    gray = photo()[:, :, 1]
    data = encode(gray, 30)
    coefs = read_coefficients(data)
    assert coefs.is_gray and len(coefs.components) == 1
    jpeg = decode(data)
    assert jpeg.ndim == 2
    assert np.abs(project(jpeg, data).astype(int) - jpeg).mean() < 0.05  # [H, W] stays [H, W]
    # a colour output of a gray JPEG is projected onto gray: the file holds no colour
    tinted = np.clip(np.stack([jpeg.astype(int) + 9, jpeg, jpeg.astype(int) - 7], axis=2), 0, 255).astype(np.uint8)
    out = project(tinted, data)
    assert out.shape == tinted.shape and np.array_equal(out[:, :, 0], out[:, :, 2])
    # its gray is the projection of its luma (+1.9 levels here, inside the DC box at q30: kept)
    luma = tinted.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(out[:, :, 0].astype(int) - project(luma / 255, data)).max() <= 1


# -- the projection never moves away from an image in the set -----------------------------------------
def _in_set(orig_plane: np.ndarray, coefs) -> np.ndarray:
    """An image known to lie in the quantisation set: the original projected onto it (float64)."""
    return project_planes([orig_plane], coefs)[0]


def test_projection_is_exact_and_nonexpansive_for_grayscale_float():
    orig = photo(96, 128)[:, :, 0].astype(np.float64)  # whole blocks: the exact case
    for quality in (10, 50, 90):
        data = encode(orig.astype(np.uint8), quality)
        coefs = read_coefficients(data)
        comp = coefs.components[0]
        o = _in_set(orig, coefs)
        d = block_dct(o) - comp.coef * comp.qtable
        assert np.all(np.abs(d) <= comp.qtable / 2 + 1e-9)  # o is in the set
        # libjpeg's DCT of the real original is in the set up to its integer rounding
        assert np.mean(np.abs(block_dct(orig) - comp.coef * comp.qtable) <= comp.qtable / 2 + 1e-6) > 0.97
        rng = np.random.default_rng(quality)
        candidates = [
            decode(data).astype(np.float64),
            blur(orig.astype(np.uint8), 2.0).astype(np.float64),
            orig + rng.normal(0, 20, orig.shape),
            np.full_like(orig, 128.0),
            rng.uniform(0, 255, orig.shape),
            orig[::-1].copy(),
        ]
        for x in candidates:
            p = project_planes([x], coefs)[0]
            assert np.linalg.norm(p - o) <= np.linalg.norm(x - o) + 1e-9
            assert np.allclose(project_planes([p], coefs)[0], p, atol=1e-9)  # idempotent
            # the float32 public path (with clipping to [0, 255], also a projection) within float tolerance
            p32 = project_float(np.clip(x, 0, 255) / 255.0, coefs).astype(np.float64)
            assert np.linalg.norm(p32 - o) <= np.linalg.norm(np.clip(x, 0, 255) - o) + 1e-2
            assert np.max(np.abs(p32 - np.clip(project_planes([np.clip(x, 0, 255)], coefs)[0], 0, 255))) < 1e-2


def test_chroma_projection_is_exact_at_stored_resolution():
    """4:2:0: the box average of the projected chroma plane lies in the set, and the projection
    is nonexpansive in full-resolution chroma (planes of whole 16 px MCUs)."""
    img = photo(96, 128)
    data = encode(img, 30, "4:2:0")
    coefs = read_coefficients(data)
    ycc = np.asarray(Image.fromarray(img).convert("YCbCr"), dtype=np.float64)
    planes = [ycc[:, :, i] for i in range(3)]
    o = project_planes(planes, coefs)
    rng = np.random.default_rng(0)
    x = [p + rng.normal(0, 15, p.shape) + (0 if i == 0 else 10) for i, p in enumerate(planes)]
    px = project_planes(x, coefs)
    for i, comp in enumerate(coefs.components):
        fv, fh = comp.factor
        small = px[i].reshape(96 // fv, fv, 128 // fh, fh).mean(axis=(1, 3))
        assert np.all(np.abs(block_dct(small) - comp.coef * comp.qtable) <= comp.qtable / 2 + 1e-9)
        assert np.linalg.norm(px[i] - o[i]) <= np.linalg.norm(x[i] - o[i]) + 1e-9


# -- bad restorations get closer to the original ------------------------------------------------------
def _bad_restorations(jpeg: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shifted = np.clip(jpeg.astype(int) + np.array([8, -5, 6]), 0, 255).astype(np.uint8)
    noisy = np.clip(np.rint(jpeg + rng.normal(0, 8, jpeg.shape)), 0, 255).astype(np.uint8)
    return {"blur": blur(jpeg), "colour shift": shifted, "noise": noisy}


@pytest.mark.skipif(not BSDS_TEST.is_dir(), reason=f"BSDS500 test images not found at {BSDS_TEST}")
@pytest.mark.parametrize("quality", [10, 30, 50, 75, 95])
def test_bad_restorations_get_closer_on_bsds500(quality):
    files = sorted(BSDS_TEST.glob("*.jpg"))[:3]
    assert files, f"no JPEGs in {BSDS_TEST}"
    for f in files:
        with Image.open(f) as im:
            orig = np.asarray(im.convert("RGB"))
        for sub in ("4:2:0", "4:4:4"):
            data = encode(orig, quality, sub)
            for name, bad in _bad_restorations(decode(data), quality).items():
                before, after = psnr(bad, orig), psnr(project(bad, data), orig)
                assert after > before, f"{f.name} q{quality} {sub} {name}: {before:.2f} -> {after:.2f} dB"


# -- EXIF orientation ------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation):
    from restorer.imageio import open_image

    img = photo(45, 70)  # odd, non-square: any transpose mistake changes the shape or the pixels
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    data = encode(img, 40, exif=exif.tobytes())
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    stored = decode(data)
    with Image.open(path) as im:
        upright = np.asarray(ImageOps.exif_transpose(im))
    assert np.array_equal(to_upright(stored, orientation), upright)
    assert np.array_equal(to_stored(upright, orientation), stored)
    assert np.array_equal(open_image(path).pixels, upright)  # what the restore pipeline works on
    coefs = read_coefficients(path)
    assert coefs.orientation == orientation
    bad = blur(upright)
    out = project_upright(bad, path)
    assert np.array_equal(out, to_upright(project(to_stored(bad, orientation), path), orientation))
    assert np.abs(project_upright(upright, path).astype(int) - upright).mean() < 0.05
    if orientation in (5, 6, 7, 8):  # the stored orientation is refused with a clear message
        with pytest.raises(ValueError, match="project_upright"):
            project(upright, path)


# -- inputs -------------------------------------------------------------------------------------------
def test_float_and_uint8_inputs_agree():
    data = encode(photo(), 20)
    bad = blur(decode(data))
    a = project(bad, data)
    b = project(bad.astype(np.float32) / 255, data)
    assert np.abs(a.astype(int) - b).max() <= 1
    import torch

    assert np.array_equal(project(torch.from_numpy(bad.astype(np.float32) / 255), data), b)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        project(bad.astype(np.float32), data)  # 0..255 floats are refused, not clipped to white
    with pytest.raises(ValueError, match="shape"):
        project(bad[:-1], data)
    with pytest.raises(ValueError, match="colour JPEG"):
        project(bad[:, :, 0], data)


# -- threads ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sub", ["4:2:0", "4:4:4"])
def test_strips_shared_among_threads_give_the_same_bytes(monkeypatch, sub):
    """Projector.each_strip: the strips on as many Python threads as torch had, torch on one
    thread in each; the output is byte for byte the one-thread output, the caller's thread count
    comes back, and more than one thread really did the work."""
    import threading

    import torch

    from restorer.infer import projection

    monkeypatch.setattr(projection, "ROWS_PER_STRIP", 2)  # many strips on a small photo
    data = encode(photo(h=200, w=160), 25, sub)
    bad = blur(decode(data))
    names: set[str] = set()
    rows_uint8 = projection.Projector.rows_uint8

    def spy(self, *args):
        names.add(threading.current_thread().name)
        return rows_uint8(self, *args)

    monkeypatch.setattr(projection.Projector, "rows_uint8", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, float_one = project(bad, data), project_float(bad, data)
        assert names == {threading.current_thread().name}
        names.clear()
        torch.set_num_threads(3)
        three, float_three = project(bad, data), project_float(bad, data)
        assert torch.get_num_threads() == 3
        assert len(names) > 1 and all(n.startswith("projection") for n in names)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(one, three) and np.array_equal(float_one, float_three)
