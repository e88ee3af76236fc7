"""restorer.pngio: lossless for every mode restore writes, metadata kept, valid for a strict reader,
and the same bytes however the rows are handed in and however many threads deflate."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms
from skimage import data

from restorer.pngio import GROUP_ROWS, PngWriter, write_png


def png_bytes(pixels, alpha=None, **kw) -> bytes:
    buf = io.BytesIO()
    write_png(buf, pixels, alpha, **kw)
    return buf.getvalue()


def chunks(blob: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, each CRC checked: a strict reader's view of the file."""
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(blob):
        (n,) = struct.unpack(">I", blob[pos : pos + 4])
        kind, body = blob[pos + 4 : pos + 8], blob[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", blob[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(kind + body), kind
        out.append((kind, body))
        pos += 12 + n
    return out


@pytest.mark.parametrize(
    "shape, with_alpha, mode",
    [
        ((1, 1, 3), False, "RGB"),
        ((70, 33), False, "L"),
        ((GROUP_ROWS * 2 + 5, 65, 3), True, "RGBA"),
        ((200, 31), True, "LA"),
    ],
)
def test_lossless_in_every_mode(shape, with_alpha, mode):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    alpha = rng.integers(0, 256, shape[:2], dtype=np.uint8) if with_alpha else None
    blob = png_bytes(pixels, alpha)
    with Image.open(io.BytesIO(blob)) as im:
        im.verify()
    with Image.open(io.BytesIO(blob)) as im:
        assert im.mode == mode
        got = np.asarray(im)
    want = pixels if alpha is None else np.concatenate([pixels.reshape(*shape[:2], -1), alpha[:, :, None]], axis=2)
    assert np.array_equal(got, want)
    kinds = [k for k, _ in chunks(blob)]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds[1:-1]) == {b"IDAT"}
    stream = b"".join(body for k, body in chunks(blob) if k == b"IDAT")
    assert len(zlib.decompress(stream)) == shape[0] * (1 + shape[1] * got.reshape(*shape[:2], -1).shape[2])


def test_icc_and_exif_read_back_by_pillow():
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "restorer test camera"
    photo = data.astronaut()[:50, :60]
    blob = png_bytes(photo, icc_profile=icc, exif=exif.tobytes())
    with Image.open(io.BytesIO(blob)) as im:
        assert im.info["icc_profile"] == icc
        assert im.getexif()[0x010F] == "restorer test camera"
        assert np.array_equal(np.asarray(im), photo)


def test_same_bytes_however_rows_arrive_and_threads():
    photo = np.ascontiguousarray(data.coffee()[: GROUP_ROWS * 3 + 17])
    whole = png_bytes(photo, threads=1)
    assert png_bytes(photo, threads=4) == whole
    buf = io.BytesIO()
    with PngWriter(buf, (photo.shape[1], photo.shape[0]), 3, threads=3) as w:
        y = 0
        for n in (1, 5, GROUP_ROWS, 2 * GROUP_ROWS + 3, 200):
            w.write(photo[y : y + n])
            y += n
    assert y >= photo.shape[0] and buf.getvalue() == whole


def test_row_count_is_checked():
    photo = data.camera()[:20, :30]
    with pytest.raises(ValueError, match="rows"):
        with PngWriter(io.BytesIO(), (30, 20), 1) as w:
            w.write(photo[:10])
    with pytest.raises(ValueError, match="more than 20 rows"):
        with PngWriter(io.BytesIO(), (30, 20), 1) as w:
            w.write(np.concatenate([photo, photo]))


def test_smaller_than_raw_on_a_photo():
    """Level 1 with the Average filter: a real photo compresses (the size cost against Pillow's
    level 6 is measured in bench/restore.py, not asserted here)."""
    photo = data.astronaut()
    assert len(png_bytes(photo)) < 0.8 * photo.nbytes
