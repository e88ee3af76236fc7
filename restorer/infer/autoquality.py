"""``--quality auto``: which quality to tell the model, and whether to project, for each photo.

(Skeleton: tables + projection, the pre-issue behaviour, until the estimator exists.)
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from restorer.data.degrade import estimate_quality


@dataclasses.dataclass(frozen=True)
class QualityChoice:
    quality: int
    source: str
    tables: int | None
    estimate: float | None
    project: bool
    why: str


def tables_quality(data: bytes) -> int | None:
    with Image.open(io.BytesIO(data)) as img:
        return estimate_quality(img)


def load_estimator(spec, device):
    return None


def choose(pixels: np.ndarray, tables: int | None, given: int | None, estimator, is_jpeg: bool) -> QualityChoice:
    if given is not None:
        return QualityChoice(given, "--quality", tables, None, is_jpeg, "given")
    return QualityChoice(int(tables), "tables", tables, None, True, "tables")
