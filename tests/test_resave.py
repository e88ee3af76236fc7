"""The lattice test (restorer/infer/resave.py): an earlier, stronger JPEG save found in the pixels,
with its quality and grid offset; none in first-generation saves; the limit (a resize hides it)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image
from skimage import data

from restorer.data.degrade import apply_chain, parse_chain
from restorer.infer.autoquality import tables_quality
from restorer.infer.resave import THRESHOLD, best_lattice, find_earlier_save, lattice_scores, strongest_save


def test_lattice_score_is_high_on_multiples_of_the_step_only():
    rng = np.random.default_rng(0)
    steps = np.array([[10.0], [20.0], [7.0]])
    on_lattice = 20.0 * rng.integers(-4, 5, size=(2000, 1)) + rng.normal(0, 1.0, size=(2000, 1))
    score, counted = lattice_scores(on_lattice, steps)
    assert score[1] > 0.95 and score[0] > 0.95  # the step and its divisor
    assert score[2] < 0.6
    smooth = rng.laplace(0, 15, size=(2000, 1))  # no lattice
    score, counted = lattice_scores(smooth, steps)
    assert score.max() < 0.6 and counted.min() > 500


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    crops = {"astronaut": data.astronaut()[64:320, 96:352], "coffee": data.coffee()[:256, :256]}
    crops["camera"] = data.camera()[:256, :256]  # gray: luma only
    return {k: np.ascontiguousarray(v) for k, v in crops.items()}


def _find(img: np.ndarray, spec: str):
    deg, _, jpeg = apply_chain(img, parse_chain(spec))
    return find_earlier_save(deg, tables_quality(jpeg))


@pytest.mark.parametrize("spec", ["10", "30", "50", "70", "90", "95", "50:4:4:4", "90:4:4:4"])
def test_first_generation_saves_carry_no_earlier_save(photos, spec):
    for name, img in photos.items():
        assert _find(img, spec) is None, (name, spec)


@pytest.mark.parametrize("spec,first", [("30>80", 30), ("10>90", 10), ("20>60>90", 20), ("50>75", 50)])
def test_an_aligned_earlier_save_is_found_with_its_quality(photos, spec, first):
    for name, img in photos.items():
        found = _find(img, spec)
        assert found is not None and found.score >= THRESHOLD, (name, spec)
        assert abs(found.quality - first) <= 2 and found.offset == (0, 0), (name, found)


@pytest.mark.parametrize("spec,offset", [("30>s4>80", (4, 4)), ("30>s3,5>80", (5, 3)), ("40>s1,6>85", (7, 2))])
def test_a_cropped_earlier_save_is_found_on_its_shifted_grid(photos, spec, offset):
    """Cropping DY, DX px moves the earlier save's grid to (8 - DY, 8 - DX) in the re-saved photo."""
    for name, img in photos.items():
        found = _find(img, spec)
        assert found is not None and found.offset == offset, (name, found)
        assert abs(found.quality - parse_chain(spec)[0].quality) <= 2, (name, found)


def test_grid_offset_is_in_photo_coordinates_when_a_window_is_used():
    """A photo larger than resave.WINDOW is tested on its most textured window; the offset reported
    is still the grid's in the photo."""
    big = np.ascontiguousarray(data.astronaut())  # 512 px: a window is chosen
    found = _find(big, "30>s3,5>80")
    assert found is not None and found.offset == (5, 3) and abs(found.quality - 30) <= 2


def test_a_resize_between_the_saves_hides_the_lattice(photos):
    """The documented limit: after a resize the blocks align with nothing (bench/quality_rule.py:
    the tables and the projection do as well as the first quality there)."""
    for name, img in photos.items():
        assert _find(img, "40>x0.75>85") is None, name


def test_a_screenshot_of_a_jpeg_gives_its_strongest_save(photos):
    img = photos["coffee"]
    for spec, q in (("50", 50), ("30>s4>80", 30), ("20", 20)):
        deg, _, _ = apply_chain(img, parse_chain(spec))
        png = io.BytesIO()
        Image.fromarray(deg).save(png, format="PNG")
        found = strongest_save(np.asarray(Image.open(png)))
        assert found is not None and abs(found.quality - q) <= 2, (spec, found)


def test_a_never_compressed_image_has_no_lattice():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    assert strongest_save(noise) is None
    flat = np.full((64, 64, 3), 128, dtype=np.uint8)  # nothing outside the zero cluster
    assert best_lattice(flat, None) is None and strongest_save(flat) is None


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 7, 3), (15, 3000, 3), (3000, 12), (9, 9)])
def test_tiny_or_thin_images_have_no_lattice_and_no_warning(shape):
    img = np.random.default_rng(2).integers(0, 256, size=shape, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert best_lattice(img, None) is None and find_earlier_save(img, 80) is None
