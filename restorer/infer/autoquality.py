"""``--quality auto``: the quality to tell the model, and whether to project, for each photo.

Three readings of a photo's quality:
- the **tables**: the IJG quality of the file's quantisation tables
  (:func:`restorer.data.degrade.estimate_quality`); exact for a first-generation JPEG, but a
  re-saved photo shows only its LAST save (a meme re-saved at q78 after q30 reads q78);
- the **lattice** (:mod:`restorer.infer.resave`): an earlier, stronger save leaves its
  quantisation lattice in the decoded pixels, on its own 8x8 grid (aligned, or shifted by a crop);
  found, it gives that save's quality; first-generation photos show none (measured, resave.py);
- the **estimate**: :mod:`restorer.estimator` reads the decoded pixels and predicts the effective
  quality (the single-save quality whose damage matches; what the models were trained with).

The rules (:func:`choose`; ``--quality-rule``):
- ``--quality N`` given: N, projected (a JPEG), as before;
- ``auto`` (the default): a JPEG whose pixels carry an earlier save's lattice with steps at least
  1.5x its own is told that save's quality and its output is NOT projected (the clean image is no
  longer inside the set the last save describes); any other JPEG is told its tables' quality and
  projected (the "never further from the original" guarantee of a first-generation JPEG). An image
  without tables (PNG, WebP: a screenshot of a JPEG) is told the strongest lattice its pixels
  carry, else the estimate; not projected;
- ``tables``: a JPEG is told its tables' quality and projected, always (the rule before ``auto``);
  an image without tables as under ``auto``.
The pixel estimate is not used for JPEGs: it misreads some first-generation photos by 13-25
quality steps (scikit-image's astronaut: a q90 save reads q65-71), where the lattice test has no
false alarm on the photos measured (bench/quality_rule.py).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from restorer.data.degrade import estimate_quality
from restorer.errors import UserError
from restorer.infer.resave import find_earlier_save, strongest_save

RULES = ("auto", "tables")
DEFAULT_RULE = "auto"


@dataclasses.dataclass(frozen=True)
class QualityChoice:
    """What the model is told and why; ``project``: whether the output may be projected."""

    quality: int
    source: str  # "--quality", "tables", "earlier save", "lattice", "estimate"
    tables: int | None
    estimate: float | None
    project: bool
    why: str
    lattice: dict | None = None  # the JPEG save found in the pixels: quality, score, offset

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def tables_quality(data: bytes) -> int | None:
    """The tables' quality of JPEG bytes (None when they are not a JPEG)."""
    with Image.open(io.BytesIO(data)) as img:
        return estimate_quality(img)


def choose(
    pixels: np.ndarray, tables: int | None, given: int | None, estimator, is_jpeg: bool, rule: str = DEFAULT_RULE
) -> QualityChoice:
    """The module docstring's rule for one decoded image. ``estimator``: a
    :class:`restorer.estimator.Estimator` or None (then an image without tables needs a lattice).
    Raises UserError (no path in it: the caller names the file) when no reading is available."""
    if given is not None:
        return QualityChoice(int(given), "--quality", tables, None, is_jpeg, f"--quality {given}")
    jpeg_tables = tables if is_jpeg else None  # only a JPEG's tables say anything
    if jpeg_tables is None:
        return _without_tables(pixels, tables, estimator, is_jpeg)
    if rule == "tables":
        return QualityChoice(int(jpeg_tables), "tables", jpeg_tables, None, True, f"tables q{jpeg_tables}")
    earlier = find_earlier_save(pixels, jpeg_tables)
    if earlier is None:
        why = f"tables q{jpeg_tables} (no earlier, stronger save in the pixels)"
        return QualityChoice(int(jpeg_tables), "tables", jpeg_tables, None, True, why)
    why = (
        f"tables say q{jpeg_tables}, but the pixels carry an earlier save at q{earlier.quality} "
        f"(grid offset {earlier.offset[0]},{earlier.offset[1]}, lattice score {earlier.score:.2f}): "
        "that quality, not projected"
    )
    lattice = dataclasses.asdict(earlier)
    return QualityChoice(earlier.quality, "earlier save", jpeg_tables, None, False, why, lattice)


def _without_tables(pixels: np.ndarray, tables: int | None, estimator, is_jpeg: bool) -> QualityChoice:
    """An image without readable JPEG tables: the strongest lattice its pixels carry, else the
    estimate; never projected (there is no quantisation set to project onto)."""
    found = strongest_save(pixels)
    what = "a JPEG without readable quantisation tables" if is_jpeg else "not a JPEG"
    if found is not None:
        why = f"{what}; the pixels carry a JPEG save at q{found.quality} (lattice score {found.score:.2f})"
        return QualityChoice(found.quality, "lattice", tables, None, False, why, dataclasses.asdict(found))
    if estimator is None:
        raise UserError(f"{what}, no JPEG lattice in its pixels and no quality estimator loaded; give --quality Q")
    est = estimator.estimate(pixels)
    q_est = int(round(est))
    return QualityChoice(q_est, "estimate", tables, est, False, f"{what}; the pixels say q{q_est}")
