"""Finding an earlier, stronger JPEG save in a photo's pixels: the quantisation lattice test.

A JPEG save rounds every 8x8 block's DCT coefficients to multiples of its table's steps. Later
saves at a higher quality move them only a little, so the decoded pixels of a re-saved photo still
carry the earlier save's lattice: on the earlier save's 8x8 grid (the same grid, or shifted when
the photo was cropped in between), the luma DCT coefficients sit near multiples of the earlier,
larger steps. A first-generation JPEG shows only its own table's lattice on its own grid. This is
the classic double-JPEG forensic test (primary quantisation estimation), here in its simplest form:

- for each of the 64 grid offsets and each candidate quality q (libjpeg's standard tables, the
  same ones :func:`restorer.data.degrade.estimate_quality` reads), over the DC and the ten lowest
  AC frequencies, the *lattice score*: of the coefficients not in the zero cluster (|x| >= T/4,
  T the candidate's step), the share within T/4 of a nonzero multiple of T;
- a lattice is found when a score reaches :data:`THRESHOLD` on at least :data:`MIN_COEFS`
  coefficients; for a JPEG, only candidates whose steps are at least :data:`STEP_RATIO` times the
  file's own count (a lattice near the file's own is the file's own save).

A resize between the saves destroys the lattice (the blocks no longer align with anything), so a
resized chain is not found here (``bench/realworld.py`` measures what that costs: little, the
tables and the projection do as well as the first quality there).

Cost: the photo's most textured window of at most ``WINDOW`` px (a fixed cost, whatever its size),
64 DCT passes, a coarse score to rank the offsets and a full one on the best few: about 0.1 s on
one CPU core (24 MP photo or BSDS500 image alike).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from restorer.data.degrade import reference_tables
from restorer.estimator import block_dct, ycbcr_planes

# Natural-order indices (row * 8 + column) of the DC and the ten lowest AC frequencies: the ones a
# strong save keeps nonzero often enough to show its lattice.
FREQS = np.array([0, 1, 8, 9, 2, 16, 10, 17, 18, 3, 24])
CANDIDATES = np.arange(5, 96)  # qualities tried for an earlier save
# Measured (bench/quality_rule.py --limit 40, BSDS500 test + 6 scikit-image photos, 2026-11-30):
# 690 first-generation saves q10-95 (4:2:0 and 4:4:4) score at most 0.66 (the moon at q30; the next
# 0.59) at candidates 1.5x their steps or more, and none is found; an aligned earlier save (30>80,
# 10>90, 20>60>90, 50>75) scores 0.95-0.98 on average and is always found, a cropped one 0.86-0.87
# (30>s4>80, 40>s4>85: found on all 46 photos at 0.70), a cropped one under a q70 save 0.73
# (30>s3,5>70: 78%).
THRESHOLD = 0.70
STEP_RATIO = 1.5
MIN_COEFS = 200
WINDOW = 384
FINE_OFFSETS = 3  # grid offsets scored in full after the coarse ranking (plus (0, 0))


@dataclasses.dataclass(frozen=True)
class EarlierSave:
    """The lattice found: the earlier save's quality, its score, and its grid's offset (dy, dx) in
    the photo (``(0, 0)``: aligned with the last save's grid)."""

    quality: int
    score: float
    offset: tuple[int, int]


@functools.cache
def _steps() -> np.ndarray:
    tables = reference_tables()
    return np.stack([tables[int(q)] for q in CANDIDATES])[:, FREQS].astype(np.float32)


def is_stronger(quality: int, own: int) -> bool:
    """Whether a save at ``quality`` counts as earlier and stronger than a file saved at ``own``:
    its steps over :data:`FREQS` sum to at least :data:`STEP_RATIO` times the file's."""
    tables = reference_tables()
    return float(tables[quality][FREQS].sum()) >= STEP_RATIO * float(tables[own][FREQS].sum())


def _window(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the most textured of up to nine ``WINDOW`` px windows (the
    whole image if smaller), judged on the green channel (or the gray plane)."""
    h, w = pixels.shape[:2]
    wh, ww = min(h, WINDOW), min(w, WINDOW)
    best, best_energy = (0, 0, wh, ww), -1.0
    for top in np.linspace(0, h - wh, 3 if h > wh else 1).astype(int):
        for left in np.linspace(0, w - ww, 3 if w > ww else 1).astype(int):
            win = pixels[top : top + wh, left : left + ww]
            g = (win if win.ndim == 2 else win[:, :, 1]).astype(np.int16)
            energy = float(np.abs(np.diff(g, axis=1)).mean() + np.abs(np.diff(g, axis=0)).mean())
            if energy > best_energy:
                best, best_energy = (int(top), int(left), wh, ww), energy
    return best


def _coefficients(y: np.ndarray, oy: int, ox: int) -> np.ndarray:
    """The :data:`FREQS` DCT coefficients of the level-shifted luma's blocks on grid (oy, ox)."""
    return block_dct(y, oy, ox)[:, FREQS]


def lattice_scores(coefs: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, count) per candidate row of ``steps`` [K, F] for coefficients [N, F]: the share of
    the ``count`` coefficients outside the zero cluster that lie near a nonzero multiple."""
    on = np.zeros(len(steps))
    counted = np.zeros(len(steps))
    for f in range(coefs.shape[1]):
        r = coefs[None, :, f] / steps[:, f, None]
        outside = np.abs(r) >= 0.25
        near = np.abs(r - np.rint(r)) < 0.25
        on += (outside & near).sum(axis=1)
        counted += outside.sum(axis=1)
    return on / np.maximum(counted, 1), counted


def _best_at(coefs: np.ndarray, steps: np.ndarray, quals: np.ndarray) -> tuple[float, int]:
    """(best score, its quality) over candidate ``steps`` rows; score -1 where too few coefficients."""
    score, counted = lattice_scores(coefs, steps)
    score = np.where(counted >= MIN_COEFS, score, -1.0)
    i = int(np.argmax(score))
    return float(score[i]), int(quals[i])


def best_lattice(pixels: np.ndarray, tables: int | None) -> EarlierSave | None:
    """The best-scoring candidate lattice, whatever its score (None when no candidate qualifies or
    no offset has :data:`MIN_COEFS` coefficients outside the zero cluster).

    Two passes, for speed: every grid offset is ranked with every third candidate on every second
    block; the :data:`FINE_OFFSETS` best offsets, and (0, 0), are then scored in full."""
    steps, quals = _steps(), CANDIDATES
    if tables is not None:
        keep = np.array([is_stronger(int(q), int(tables)) for q in quals])
        steps, quals = steps[keep], quals[keep]
    if not len(quals) or min(pixels.shape[:2]) < 16:  # no shifted grid has a whole block
        return None
    top, left, wh, ww = _window(pixels)
    win = (ycbcr_planes(pixels[top : top + wh, left : left + ww])[0] - 128).astype(np.float32)  # level shift
    offsets = [(oy, ox) for oy in range(8) for ox in range(8)]
    coarse = [_best_at(_coefficients(win, oy, ox)[::2], steps[::3], quals[::3])[0] for oy, ox in offsets]
    ranked = [offsets[i] for i in np.argsort(coarse)[::-1][:FINE_OFFSETS]]
    best: EarlierSave | None = None
    for oy, ox in dict.fromkeys([(0, 0), *ranked]):
        score, q = _best_at(_coefficients(win, oy, ox), steps, quals)
        if score >= 0 and (best is None or score > best.score):
            best = EarlierSave(q, score, ((top + oy) % 8, (left + ox) % 8))
    return best


def find_earlier_save(pixels: np.ndarray, tables: int | None) -> EarlierSave | None:
    """The strongest earlier save whose lattice the pixels carry (score >= :data:`THRESHOLD`), or
    None. ``tables``: the file's own quality (a JPEG; candidates must have steps
    :data:`STEP_RATIO` times larger), or None (a PNG or WebP: any lattice counts, the file's last
    JPEG save included)."""
    best = best_lattice(pixels, tables)
    return best if best is not None and best.score >= THRESHOLD else None


def strongest_save(pixels: np.ndarray) -> EarlierSave | None:
    """For an image without tables (a PNG or WebP of a JPEG): the strongest JPEG save its pixels
    carry: the last save's lattice (the best score), then an earlier, stronger one under it."""
    last = find_earlier_save(pixels, None)
    if last is None:
        return None
    return find_earlier_save(pixels, last.quality) or last
