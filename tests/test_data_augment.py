"""Augmentation (restorer.data.augment): probabilities, crop-first == whole-image reference, small tiles."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from restorer.data import augment
from restorer.data.augment import AugmentParams, TileTooSmall
from restorer.data.degrade import jpeg_roundtrip


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()[:300, :420])  # rectangular on purpose


def test_draw_probabilities_match_parameters():
    rng = np.random.default_rng(0)
    params = AugmentParams(patch_size=128, rescale_p=0.5, rotate_p=0.5, flip_p=0.25)
    n = 6000
    draws = [augment.draw(rng, 512, 512, params) for _ in range(n)]
    rescaled = [d.scale for d in draws if d.scale != 1.0]
    rotated = [d.rot for d in draws if d.rot]
    # binomial sd at n=6000, p=0.5 is 0.0065: 0.03 is > 4 sd
    assert abs(len(rescaled) / n - 0.5) < 0.03
    assert abs(len(rotated) / n - 0.5) < 0.03
    assert abs(sum(d.flip for d in draws) / n - 0.25) < 0.03
    scales = Counter(rescaled)
    assert set(scales) == {0.9, 0.8, 0.7, 0.6}
    assert all(abs(c / len(rescaled) - 0.25) < 0.04 for c in scales.values())
    rots = Counter(rotated)
    assert set(rots) == {1, 2, 3}
    assert all(abs(c / len(rotated) - 1 / 3) < 0.04 for c in rots.values())
    # rescale and rotation are drawn independently
    both = sum(1 for d in draws if d.scale != 1.0 and d.rot) / n
    assert abs(both - 0.25) < 0.03


def test_probabilities_zero_and_one():
    rng = np.random.default_rng(1)
    never = AugmentParams(patch_size=64, rescale_p=0.0, rotate_p=0.0, flip_p=0.0)
    always = AugmentParams(patch_size=64, rescale_p=1.0, rotate_p=1.0, flip_p=1.0)
    assert all(
        d.scale == 1.0 and d.rot == 0 and not d.flip for d in (augment.draw(rng, 200, 300, never) for _ in range(300))
    )
    assert all(d.scale < 1.0 and d.rot and d.flip for d in (augment.draw(rng, 200, 300, always) for _ in range(300)))


def test_crop_positions_cover_the_image():
    rng = np.random.default_rng(2)
    params = AugmentParams(patch_size=64, rescale_p=0.0, rotate_p=0.0)
    ys, xs = zip(*[(d.y, d.x) for d in (augment.draw(rng, 200, 300, params) for _ in range(3000))])
    assert min(ys) == 0 and max(ys) == 200 - 64
    assert min(xs) == 0 and max(xs) == 300 - 64


def test_crop_first_equals_whole_image_reference(photo):
    """Resampling only the crop's region gives the original design's whole-image result."""
    rng = np.random.default_rng(3)
    params = AugmentParams(patch_size=96, rescale_p=0.7, rotate_p=0.75, flip_p=0.5)
    seen_rots, worst, diffs = set(), 0, []
    for _ in range(240):
        d = augment.draw(rng, photo.height, photo.width, params)
        fast = augment.crop_first(photo, d, 96).astype(np.int16)
        ref = augment.whole_image(photo, d, 96).astype(np.int16)
        assert fast.shape == ref.shape == (96, 96, 3)
        diff = np.abs(fast - ref)
        worst = max(worst, int(diff.max()))
        diffs.append(float(diff.mean()))
        seen_rots.add((d.rot, d.scale != 1.0))
    assert len(seen_rots) == 8  # every rotation with and without rescale was exercised
    # identical where not rescaled; Pillow's fixed-point rounding differs by <= 2 levels when it is
    assert worst <= 2 and np.mean(diffs) < 0.05


def test_unscaled_unrotated_patch_is_a_plain_crop(photo):
    rng = np.random.default_rng(4)
    params = AugmentParams(patch_size=64, rescale_p=0.0, rotate_p=0.0)
    d = augment.draw(rng, photo.height, photo.width, params)
    patch = augment.crop_first(photo, d, 64)
    np.testing.assert_array_equal(patch, np.asarray(photo)[d.y : d.y + 64, d.x : d.x + 64])


def test_small_tiles(photo):
    rng = np.random.default_rng(5)
    params = AugmentParams(patch_size=128, rescale_p=1.0, rotate_p=0.5)
    tiny = photo.crop((0, 0, 100, 140))
    with pytest.raises(TileTooSmall):
        augment.draw(rng, tiny.height, tiny.width, params)
    # between the patch and patch/scale: the smallest scale that still fits is used
    snug = photo.crop((0, 0, 150, 140))
    for _ in range(50):
        d = augment.draw(rng, snug.height, snug.width, params)
        assert min(d.size) >= 128
        assert augment.crop_first(snug, d, 128).shape == (128, 128, 3)
    exact = photo.crop((0, 0, 128, 128))
    patches = augment.random_patches(exact, 3, rng, params)
    assert [p.shape for p in patches] == [(128, 128, 3)] * 3


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "PPM"])
def test_decode_lossless_formats(photo, fmt):
    buf = io.BytesIO()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    photo.save(buf, format=fmt, **kwargs)
    img = augment.decode_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == photo.size
    np.testing.assert_array_equal(np.asarray(img), np.asarray(photo))
    gray = augment.decode_image(buf.getvalue(), grayscale=True)
    assert gray.mode == "L" and np.asarray(gray).shape == (photo.height, photo.width)


def test_jpeg_roundtrip_of_a_patch(photo):
    patch = np.asarray(photo)[:64, :64]
    out = jpeg_roundtrip(patch, 10)
    assert out.shape == patch.shape and out.dtype == np.uint8 and not np.array_equal(out, patch)
