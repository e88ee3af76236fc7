"""shard_tools.images: colour modes, orientation, tiles, bomb limits, hostile bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from shard_fixtures import decode_bytes, jpeg_bytes, photo_crops, png_bomb, png_bytes, truncated_jpeg

from shard_tools.images import Skip, decode, tile_grid, to_rgb8

PHOTO = photo_crops(1, h=100, w=140, seed=3)[0]


def tiles_of(data: bytes, **kw) -> tuple[object, dict[str, np.ndarray]]:
    dec = decode(data, **{"tile": 64, "min_size": 16, "encoding": "png", **kw})
    return dec, {f"{t.y}_{t.x}": decode_bytes(t.data) for t in dec.tiles}


def assemble(tiles: dict[str, np.ndarray], h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w, 3), np.uint8)
    for key, arr in tiles.items():
        y, x = map(int, key.split("_"))
        out[y : y + arr.shape[0], x : x + arr.shape[1]] = arr
    return out


@pytest.mark.parametrize("encoding", ["webp", "png", "ppm"])
def test_lossless_round_trip_every_encoding(encoding):
    dec, tiles = tiles_of(png_bytes(PHOTO), encoding=encoding)
    assert dec.orig_size == (140, 100)
    # 140 wide: tiles at x 0, 64 and a 12 px remainder (< min_size 16) dropped
    assert sorted(tiles) == sorted(["0_0", "0_64", "64_0", "64_64"])
    assert np.array_equal(assemble(tiles, 100, 128), PHOTO[:, :128])


def test_tile_grid_keeps_remainders_at_least_min_size():
    assert list(tile_grid(130, 70, 64, 16)) == [(0, 0, 64, 64), (0, 64, 64, 64)]
    assert list(tile_grid(150, 90, 64, 16)) == [
        (0, 0, 64, 64),
        (0, 64, 64, 64),
        (0, 128, 64, 22),
        (64, 0, 26, 64),
        (64, 64, 26, 64),
        (64, 128, 26, 22),
    ]


def test_exif_orientation_applied():
    stored = np.ascontiguousarray(np.rot90(PHOTO, k=1))  # upright = stored rotated 90 deg CW
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "PNG", exif=exif.tobytes())
    dec, tiles = tiles_of(buf.getvalue())
    assert dec.orig_size == (140, 100)
    assert dec.rotation == 270
    assert np.array_equal(assemble(tiles, 100, 128), PHOTO[:, :128])


def test_explicit_rotation_is_counter_clockwise_and_overrides_exif():
    stored = np.ascontiguousarray(np.rot90(PHOTO, k=-1))  # stored rotated CW; needs 90 CCW
    exif = Image.Exif()
    exif[0x0112] = 8  # would rotate the other way: must be ignored when rotation is given
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "PNG", exif=exif.tobytes())
    dec, tiles = tiles_of(buf.getvalue(), rotation=90)
    assert dec.orig_size == (140, 100)
    assert np.array_equal(assemble(tiles, 100, 128), PHOTO[:, :128])
    dec, tiles = tiles_of(png_bytes(np.ascontiguousarray(np.rot90(PHOTO, 2))), rotation=180)
    assert np.array_equal(assemble(tiles, 100, 128), PHOTO[:, :128])


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(to_rgb8(img))


def test_colour_modes():
    gray = PHOTO[..., 1]
    assert np.array_equal(_rgb(Image.fromarray(gray)), np.stack([gray] * 3, -1))
    pal = Image.fromarray(PHOTO).quantize(64)
    assert np.array_equal(_rgb(pal), np.asarray(pal.convert("RGB")))
    alpha = np.linspace(0, 255, PHOTO.shape[1]).astype(np.uint8)[None, :].repeat(100, 0)
    rgba = np.dstack([PHOTO, alpha])
    out = _rgb(Image.fromarray(rgba, "RGBA")).astype(int)
    assert np.array_equal(out[:, -1], PHOTO[:, -1])  # opaque column unchanged
    assert (out[:, 0] == 255).all()  # transparent column -> white
    mid = PHOTO.astype(int) * alpha[..., None] + 255 * (255 - alpha[..., None].astype(int))
    assert np.abs(out - mid / 255).max() <= 0.5 + 1e-9  # composite on white, rounded
    la = Image.fromarray(np.dstack([gray, alpha]), "LA")
    assert (_rgb(la)[:, 0] == 255).all() and np.array_equal(_rgb(la)[:, -1, 0], gray[:, -1])
    g16 = (gray.astype(np.uint16) * 257 + 100).astype(np.uint16)
    img16 = Image.open(io.BytesIO(png_bytes(g16)))
    assert img16.mode.startswith("I")
    assert np.array_equal(_rgb(img16)[..., 0], np.rint(g16 / 257).astype(np.uint8))
    cmyk = Image.fromarray(PHOTO).convert("CMYK")
    assert np.array_equal(_rgb(cmyk), np.asarray(cmyk.convert("RGB")))
    bw = Image.fromarray(gray > 128)
    assert set(np.unique(_rgb(bw))) <= {0, 255}
    with pytest.raises(Skip, match="mode F"):
        to_rgb8(Image.fromarray(gray.astype(np.float32)))


def test_bad_inputs_skip_with_reason():
    cases = {
        b"": "empty",
        png_bomb(): "decompression bomb",
        truncated_jpeg(): "truncated",
        b"hello world, not an image" * 20: "not an image",
    }
    for data, reason in cases.items():
        with pytest.raises(Skip, match=reason):
            decode(data)
    with pytest.raises(Skip, match="too small"):
        decode(png_bytes(PHOTO[:50, :50]), min_size=64)
    with pytest.raises(Skip, match="decompression bomb"):
        decode(png_bytes(PHOTO), max_pixels=1000)


def test_max_pixels_above_pillows_own_limit():
    """95 MP is over Pillow's MAX_IMAGE_PIXELS (89.5 MP) but under --max-pixels 200M: the header
    check lets it through (this forged PNG then fails as truncated, without allocating 95 MP);
    under --max-pixels 50M it is a bomb. Pillow's global limit is restored afterwards."""
    forged = png_bomb(10_000, 9_500)
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(Skip) as info:
        decode(forged, max_pixels=200_000_000)
    assert "bomb" not in str(info.value) and "truncated" in str(info.value)
    with pytest.raises(Skip, match="decompression bomb: declares 10000x9500"):
        decode(forged, max_pixels=50_000_000)
    assert Image.MAX_IMAGE_PIXELS == limit


def test_one_list_of_image_extensions():
    from restorer.imageio import IMAGE_SUFFIXES
    from shard_tools.images import IMAGE_EXTENSIONS

    assert set(IMAGE_EXTENSIONS) == set(IMAGE_SUFFIXES) >= {".jfif", ".gif", ".pnm", ".jpg"}


def test_downscale_lossy_bicubic():
    dec = decode(jpeg_bytes(PHOTO), tile=512, min_size=16, downscale=0.5, encoding="png")
    assert dec.orig_size == (140, 100) and dec.size == (70, 50)
    ref = Image.open(io.BytesIO(jpeg_bytes(PHOTO))).convert("RGB").resize((70, 50), Image.Resampling.BICUBIC)
    assert np.array_equal(decode_bytes(dec.tiles[0].data), np.asarray(ref))


# --------------------------------------------------------------------------- hostile (hypothesis)
_REAL = [png_bytes(PHOTO), jpeg_bytes(PHOTO)]


def _hostile():
    prefixes = st.tuples(st.sampled_from(_REAL), st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])])
    header_bomb = st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)).map(lambda wh: png_bomb(*wh))
    flipped = st.tuples(st.sampled_from(_REAL), st.integers(0, 10**6), st.integers(1, 255)).map(
        lambda t: t[0][: t[1] % len(t[0])] + bytes([t[0][t[1] % len(t[0])] ^ t[2]]) + t[0][t[1] % len(t[0]) + 1 :]
    )
    return st.one_of(st.binary(max_size=3000), prefixes, header_bomb, flipped)


@settings(max_examples=50, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
@given(data=_hostile())
def test_hostile_bytes_never_crash(data):
    max_pixels = 200_000
    try:
        dec = decode(data, tile=64, min_size=16, max_pixels=max_pixels)
    except Skip as exc:
        assert str(exc)  # a reason
        return
    # some byte flips still decode (e.g. in pixel data): then it is a bounded, valid image
    w, h = dec.size
    assert w * h <= max_pixels and dec.tiles
