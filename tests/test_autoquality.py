"""``--quality auto`` (restorer/infer/autoquality.py): the quality rules and the projection decision,
first with the readings fixed by hand (the rule alone), then on real re-saved photos (the lattice
test of restorer/infer/resave.py and the packaged estimator)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from restorer.data.degrade import apply_chain, parse_chain
from restorer.errors import UserError
from restorer.estimator import PACKAGED, load_estimator
from restorer.infer import autoquality
from restorer.infer.autoquality import choose, tables_quality
from restorer.infer.resave import EarlierSave


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


@pytest.fixture
def lattice(monkeypatch):
    """Fix what the lattice test finds (the rule is tested alone): ``lattice.found = EarlierSave``."""

    class Lattice:
        def __init__(self):
            self.found: EarlierSave | None = None
            self.calls: list = []

        def find(self, pixels, tables):
            self.calls.append(tables)
            return self.found

    fixed = Lattice()
    monkeypatch.setattr(autoquality, "find_earlier_save", fixed.find)
    monkeypatch.setattr(autoquality, "strongest_save", lambda pixels: fixed.find(pixels, None))
    return fixed


def test_first_generation_jpeg_keeps_its_tables_and_the_projection(lattice):
    est = Fixed(20.0)  # never asked for a JPEG with tables, whatever it would say
    for rule in ("auto", None):  # None: the default
        c = choose(PIXELS, 80, None, est, is_jpeg=True, **({} if rule is None else {"rule": rule}))
        assert (c.quality, c.source, c.project, c.lattice, est.calls) == (80, "tables", True, None, 0)
        assert "tables q80" in c.why
    assert lattice.calls == [80, 80]


def test_a_jpeg_carrying_an_earlier_save_gets_its_quality_unprojected(lattice):
    lattice.found = EarlierSave(31, 0.91, (4, 4))
    c = choose(PIXELS, 78, None, Fixed(60.0), is_jpeg=True)
    assert (c.quality, c.source, c.project, c.tables, c.estimate) == (31, "earlier save", False, 78, None)
    assert c.lattice == {"quality": 31, "score": 0.91, "offset": (4, 4)}
    assert "earlier save at q31" in c.why and "grid offset 4,4" in c.why and "not projected" in c.why


def test_the_tables_rule_never_looks_for_an_earlier_save(lattice):
    lattice.found = EarlierSave(31, 0.91, (0, 0))
    c = choose(PIXELS, 80, None, Fixed(20.0), is_jpeg=True, rule="tables")
    assert (c.quality, c.source, c.project) == (80, "tables", True) and lattice.calls == []


def test_an_image_without_tables_gets_its_lattice_else_the_estimate(lattice):
    for rule in ("auto", "tables"):
        lattice.found = EarlierSave(42, 0.88, (0, 0))
        c = choose(PIXELS, None, None, Fixed(70.0), is_jpeg=False, rule=rule)
        assert (c.quality, c.source, c.project, c.tables) == (42, "lattice", False, None)
        lattice.found = None
        c = choose(PIXELS, None, None, Fixed(42.6), is_jpeg=False, rule=rule)
        assert (c.quality, c.source, c.project, c.tables) == (43, "estimate", False, None)
    c = choose(PIXELS, None, None, Fixed(42.6), is_jpeg=True)  # a JPEG whose tables could not be read
    assert c.source == "estimate" and not c.project and "without readable quantisation tables" in c.why
    with pytest.raises(UserError, match="not a JPEG.*--quality"):
        choose(PIXELS, None, None, None, is_jpeg=False)  # no tables, no lattice and no estimator


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
            assert abs(est.estimate(deg) - q) < 12, q
            c = choose(deg, tables_quality(data_), None, est, is_jpeg=True)
            assert (c.source, c.quality, c.project) == ("tables", q, True), (q, c)


def test_the_default_rule_catches_a_stronger_earlier_save(photos):
    for img in photos:
        for spec in ("30>80", "30>s4>80"):
            deg, _, data_ = apply_chain(img, parse_chain(spec))
            c = choose(deg, tables_quality(data_), None, None, is_jpeg=True)
            assert (c.source, c.tables, c.project) == ("earlier save", 80, False), (spec, c)
            assert abs(c.quality - 30) <= 2, c


@needs_estimator
def test_the_estimate_misreads_a_smooth_photo_where_the_lattice_rule_does_not():
    """Why the estimate is not used for JPEGs: on the astronaut's flat areas the estimate of a
    first-generation q50/q90 save is far below its tables (measured q31 and q65 on this crop), but
    no earlier save is found, so the tables and the projection stay."""
    est = load_estimator()
    ref = np.ascontiguousarray(data.astronaut()[64:320, 96:352])
    for q in (50, 90):
        deg, _, data_ = apply_chain(ref, parse_chain(str(q)))
        assert est.estimate(deg) < q - 12
        c = choose(deg, tables_quality(data_), None, est, is_jpeg=True)
        assert (c.source, c.quality, c.project) == ("tables", q, True)
