"""``--quality auto``: the quality to tell the model, and whether to project, for each photo.

Two readings of a photo's quality:
- the **tables**: the IJG quality of the file's quantisation tables
  (:func:`restorer.data.degrade.estimate_quality`); exact for a first-generation JPEG, but a
  re-saved photo shows only its LAST save (a meme re-saved at q78 after q30 reads q78);
- the **estimate**: :mod:`restorer.estimator` reads the decoded pixels and predicts the effective
  quality (the single-save quality whose damage matches; what the models were trained with).

The rule (:func:`choose`; the margin measured by ``bench/quality_rule.py``):
- ``--quality N`` given: N, projected (a JPEG), as before;
- a JPEG whose estimate is below its tables by more than ``MARGIN``: the pixels carry an earlier,
  stronger compression or a resize, so the model is told the estimate, and the output is NOT
  projected onto the file's quantisation set (the clean image is no longer inside it: that set
  describes the last save only);
- any other JPEG: the tables, projected (a first-generation JPEG: the projection's "never further
  from the original" guarantee holds);
- an image without tables (PNG, WebP: a screenshot of a JPEG): the estimate, not projected.
``rule="tables"`` (``--quality-rule tables``) is the behaviour before the estimator: tables, always
projected; an image without tables is then an error.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from restorer.data.degrade import estimate_quality
from restorer.errors import UserError

# Tables minus estimate above which a JPEG counts as re-saved (bench/quality_rule.py).
MARGIN = 8.0
RULES = ("auto", "tables")


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
    pixels: np.ndarray, tables: int | None, given: int | None, estimator, is_jpeg: bool, rule: str = "auto"
) -> QualityChoice:
    """The module docstring's rule for one decoded image. ``estimator``: a
    :class:`restorer.estimator.Estimator` or None (then only the tables can be used). Raises
    UserError (no path in it: the caller names the file) when neither reading is available."""
    if given is not None:
        return QualityChoice(int(given), "--quality", tables, None, is_jpeg, f"--quality {given}")
    jpeg_tables = tables if is_jpeg else None  # only a JPEG's tables say anything
    if rule == "tables" or estimator is None:
        if jpeg_tables is None:
            what = "a JPEG without readable quantisation tables" if is_jpeg else "not a JPEG"
            raise UserError(f"{what}, and no quality estimator is used; give --quality Q")
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
