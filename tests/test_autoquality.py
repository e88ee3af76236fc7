"""``--quality auto`` (restorer/infer/autoquality.py): the quality rule and the projection decision,
first with estimates fixed by hand (the rule alone), then with the packaged estimator on real
re-saved photos."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from restorer.data.degrade import apply_chain, parse_chain
from restorer.errors import UserError
from restorer.estimator import PACKAGED, load_estimator
from restorer.infer.autoquality import MARGIN, choose, tables_quality


class Fixed:
    """An estimator that always says ``value`` (the rule is tested alone)."""

    def __init__(self, value: float):
        self.value, self.calls = value, 0

    def estimate(self, pixels: np.ndarray) -> float:
        self.calls += 1
        return self.value


PIXELS = np.zeros((16, 16, 3), dtype=np.uint8)


def test_given_quality_wins_and_projects_a_jpeg():
    est = Fixed(20.0)
    c = choose(PIXELS, 80, 45, est, is_jpeg=True)
    assert (c.quality, c.source, c.project, est.calls) == (45, "--quality", True, 0)
    assert choose(PIXELS, None, 45, est, is_jpeg=False).project is False  # nothing to project onto


def test_first_generation_jpeg_keeps_its_tables_and_the_projection():
    for estimate in (80.0, 80 - MARGIN, 91.0, 99.0):  # agreeing, at the margin, or better than the tables
        c = choose(PIXELS, 80, None, Fixed(estimate), is_jpeg=True)
        assert (c.quality, c.source, c.project) == (80, "tables", True), estimate
        assert c.estimate == estimate and "tables q80" in c.why


def test_a_jpeg_whose_pixels_are_worse_than_its_tables_gets_the_estimate_unprojected():
    c = choose(PIXELS, 80, None, Fixed(80 - MARGIN - 0.5), is_jpeg=True)
    assert (c.source, c.project, c.tables) == ("estimate", False, 80) and c.quality == round(80 - MARGIN - 0.5)
    c = choose(PIXELS, 78, None, Fixed(31.4), is_jpeg=True)
    assert c.quality == 31 and not c.project and "earlier, stronger compression or a resize" in c.why


def test_an_image_without_tables_gets_the_estimate():
    c = choose(PIXELS, None, None, Fixed(42.6), is_jpeg=False)
    assert (c.quality, c.source, c.project, c.tables) == (43, "estimate", False, None)
    c = choose(PIXELS, None, None, Fixed(42.6), is_jpeg=True)  # a JPEG whose tables could not be read
    assert c.source == "estimate" and not c.project


def test_the_tables_rule_is_the_old_behaviour():
    est = Fixed(20.0)
    c = choose(PIXELS, 80, None, est, is_jpeg=True, rule="tables")
    assert (c.quality, c.source, c.project, c.estimate, est.calls) == (80, "tables", True, None, 0)
    for rule, estimator in (("tables", est), ("auto", None)):
        with pytest.raises(UserError, match="not a JPEG.*--quality"):
            choose(PIXELS, None, None, estimator, is_jpeg=False, rule=rule)


# --- with the packaged estimator --------------------------------------------------------------------------

needs_estimator = pytest.mark.skipif(not PACKAGED.is_file(), reason=f"no packaged estimator at {PACKAGED}")


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [np.ascontiguousarray(img[:256, :256]) for img in (data.astronaut(), data.coffee(), data.chelsea())]


@needs_estimator
def test_packaged_estimator_reads_single_saves_near_their_quality(photos):
    est = load_estimator()
    for img in photos:
        for q in (10, 50, 90):
            deg, _, data_ = apply_chain(img, parse_chain(str(q)))
            c = choose(deg, tables_quality(data_), None, est, is_jpeg=True)
            assert c.source == "tables" and c.project, (q, c)
            assert abs(c.estimate - q) < 12, (q, c.estimate)


@needs_estimator
def test_packaged_estimator_catches_a_stronger_earlier_save(photos):
    est = load_estimator()
    for img in photos:
        for spec in ("30>80", "30>s4>80", "40>x0.75>85"):
            deg, _, data_ = apply_chain(img, parse_chain(spec))
            c = choose(deg, tables_quality(data_), None, est, is_jpeg=True)
            assert c.source == "estimate" and not c.project and c.estimate < c.tables - MARGIN, (spec, c)
            if spec == "30>80":  # an aligned earlier save is read almost exactly (its label: about 30)
                assert c.quality < 40, c
