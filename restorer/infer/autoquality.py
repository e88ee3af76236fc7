"""``--quality auto``: the quality to tell the model, and whether to project, for each photo.

Two readings of a photo's quality:
- the **tables**: the IJG quality of the file's quantisation tables
  (:func:`restorer.data.degrade.estimate_quality`); exact for a first-generation JPEG, but a
  re-saved photo shows only its LAST save (a meme re-saved at q78 after q30 reads q78);
- the **estimate**: :mod:`restorer.estimator` reads the decoded pixels and predicts the effective
  quality (the single-save quality whose damage matches; what the models were trained with).

The rules (:func:`choose`; ``--quality-rule``):
- ``--quality N`` given: N, projected (a JPEG), as before;
- ``tables`` (the default): a JPEG is told its tables' quality and projected (the projection's
  "never further from the original" guarantee holds for a first-generation JPEG); an image without
  tables (PNG, WebP: a screenshot of a JPEG) is told the estimate, not projected;
- ``auto``: as ``tables``, except that a JPEG whose estimate is below its tables by more than
  ``MARGIN`` counts as re-saved: the pixels carry an earlier, stronger compression or a resize, so
  the model is told the estimate, and the output is NOT projected onto the file's quantisation set
  (the clean image is no longer inside it: that set describes the last save only).
``auto`` is not the default because the estimator still misreads some first-generation photos:
on scikit-image's astronaut (large flat areas) a q50 save reads q31-37 and a q90 save q65-71, so at
a margin that catches re-saved photos some first-generation ones would lose their projection
(tests/test_autoquality.py keeps the measured cases).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from restorer.data.degrade import estimate_quality
from restorer.errors import UserError

# Tables minus estimate above which a JPEG counts as re-saved. Measured with the packaged estimator,
# `bench/quality_rule.py --limit 20` (BSDS500 test, 2026-11-30): first-generation JPEGs q5-95 fall
# at most 17.5 below their tables, so 19 flags none of them (a margin of 8 flagged 10-35% of the
# q45-95 saves, which then lost the projection and its guarantee), and still catches 30>80, 10>90,
# 20>60>90 and 50>75 on every image and 30>s4>80 on 95%; a mild earlier save under a resize
# (40>x0.75>85: estimate 74.5 vs tables 85) mostly passes as first-generation.
MARGIN = 19.0
RULES = ("tables", "auto")
DEFAULT_RULE = "tables"


@dataclasses.dataclass(frozen=True)
class QualityChoice:
    """What the model is told and why; ``project``: whether the output may be projected."""

    quality: int
    source: str  # "--quality", "tables", "estimate"
    tables: int | None
    estimate: float | None
    project: bool
    why: str

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
    :class:`restorer.estimator.Estimator` or None (then only the tables can be used). Raises
    UserError (no path in it: the caller names the file) when neither reading is available."""
    if given is not None:
        return QualityChoice(int(given), "--quality", tables, None, is_jpeg, f"--quality {given}")
    jpeg_tables = tables if is_jpeg else None  # only a JPEG's tables say anything
    if jpeg_tables is None and estimator is None:
        what = "a JPEG without readable quantisation tables" if is_jpeg else "not a JPEG"
        raise UserError(f"{what}, and no quality estimator could be loaded; give --quality Q")
    if jpeg_tables is not None and (rule == "tables" or estimator is None):
        return QualityChoice(int(jpeg_tables), "tables", jpeg_tables, None, True, f"tables q{jpeg_tables}")
    est = estimator.estimate(pixels)
    q_est = int(round(est))
    if jpeg_tables is None:
        return QualityChoice(q_est, "estimate", None, est, False, f"no JPEG tables; the pixels say q{q_est}")
    if est < jpeg_tables - MARGIN:
        why = (
            f"tables say q{tables}, the pixels q{q_est}: an earlier, stronger compression or a resize, "
            f"so the estimate, not projected"
        )
        return QualityChoice(q_est, "estimate", tables, est, False, why)
    return QualityChoice(
        int(jpeg_tables), "tables", jpeg_tables, est, True, f"tables q{jpeg_tables} (the pixels agree: q{q_est})"
    )
