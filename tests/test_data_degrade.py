"""Training degradations (restorer.data.degrade): quality ranges, double JPEG on a shifted grid,
chroma subsampling drawn from a list, and the label = the last compression's quality."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import write_shards

from restorer.data import StreamConfig, degrade, make_train_loader
from restorer.data.degrade import Degradation, draw_degradation, jpeg_roundtrip, jpeg_shifted
from restorer.errors import UserError


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[64:256, 128:320])  # 192 x 192 RGB


def blockiness(img: np.ndarray) -> np.ndarray:
    """Mean |column step| at each phase x % 8 (phase k: between columns x-1 and x, x = k mod 8),
    over rows and channels: a JPEG's block borders stand out at one phase."""
    g = img.astype(np.float64)
    steps = np.abs(np.diff(g, axis=1))  # steps[:, x - 1] is between columns x - 1 and x
    x = np.arange(1, img.shape[1])
    return np.array([steps[:, x % 8 == k].mean() for k in range(8)])


def test_unshifted_jpeg_blocks_at_phase_zero(photo):
    prof = blockiness(jpeg_roundtrip(photo, 10))
    assert int(np.argmax(prof)) == 0
    assert prof[0] > 1.3 * np.median(prof)


@pytest.mark.parametrize("dx", [1, 3, 5, 7])
def test_grid_shift_moves_the_block_borders(photo, dx):
    """Padding dx columns at the left puts the encoder's borders at x = 8k - dx of the patch."""
    out = jpeg_shifted(photo, 10, "4:2:0", (0, dx))
    assert out.shape == photo.shape and out.dtype == np.uint8
    prof = blockiness(out)
    assert int(np.argmax(prof)) == (-dx) % 8, prof
    assert prof[(-dx) % 8] > 1.3 * prof[0]  # the unshifted phase is no longer the blocky one
    rows = blockiness(np.ascontiguousarray(jpeg_shifted(photo, 10, "4:2:0", (dx, 0)).transpose(1, 0, 2)))
    assert int(np.argmax(rows)) == (-dx) % 8  # a vertical shift moves the horizontal borders


def test_double_compression_differs_from_single_and_shifts_the_second_grid(photo):
    single = degrade.degrade(photo, Degradation(30))
    aligned = degrade.degrade(photo, Degradation(30, first_quality=10))
    shifted = degrade.degrade(photo, Degradation(30, first_quality=10, shift=(0, 3)))
    assert np.abs(single.astype(int) - aligned).mean() > 1.0
    assert np.array_equal(aligned, jpeg_roundtrip(jpeg_roundtrip(photo, 10), 30))  # the last compression is q30
    prof_shifted, prof_aligned = blockiness(shifted), blockiness(aligned)
    assert int(np.argmax(prof_aligned)) == 0  # both grids at phase 0
    assert int(np.argmax(prof_shifted)) == 5 and prof_shifted[5] > 1.1 * prof_aligned[5]  # second grid at 8k - 3
    assert degrade.degrade(photo, Degradation(30, "4:4:4")).shape == photo.shape


def test_draws_double_shift_and_subsampling():
    rng = np.random.default_rng(0)
    n = 4000
    draws = [draw_degradation(rng, (10, 90), 0.5, ("4:2:0", "4:4:4")) for _ in range(n)]
    double = [d for d in draws if d.first_quality is not None]
    assert abs(len(double) / n - 0.5) < 0.04
    assert all(d.first_quality != d.quality and 10 <= d.first_quality <= 90 for d in double)
    shifted = [d for d in double if d.shift != (0, 0)]
    assert abs(len(shifted) / len(double) - 0.5) < 0.05  # half of the double cases
    assert all(0 <= d.shift[0] <= 7 and 0 <= d.shift[1] <= 7 for d in shifted)
    assert {d.shift[1] for d in shifted} == set(range(8)) and {d.shift[0] for d in shifted} == set(range(8))
    assert all(d.shift == (0, 0) for d in draws if d.first_quality is None)
    subs = Counter(d.subsampling for d in draws)
    assert set(subs) == {"4:2:0", "4:4:4"} and abs(subs["4:4:4"] / n - 0.5) < 0.04
    assert {d.quality for d in draws} == set(range(10, 91))
    fixed = [draw_degradation(rng, (40, 40), 1.0) for _ in range(50)]
    assert all(d.quality == d.first_quality == 40 for d in fixed)  # one quality: the same twice


def test_stream_config_checks_degradation_options(tmp_path):
    assert StreamConfig(chroma_subsampling="4:2:0, 4:4:4").subsamplings() == ("4:2:0", "4:4:4")
    for bad in (dict(chroma_subsampling="4:1:1"), dict(chroma_subsampling=","), dict(double_jpeg_p=1.5)):
        with pytest.raises(UserError, match="chroma_subsampling|double_jpeg_p"):
            StreamConfig(**bad).validate()


def test_loader_labels_each_patch_with_its_last_compression(tmp_path, monkeypatch):
    """Every patch of a double-JPEG stream is compressed twice; the label is the second quality."""
    root = write_shards(tmp_path / "s", splits={"train": 8}, samples_per_shard=4, tile=96)
    calls: list[int] = []
    real = degrade.jpeg_roundtrip

    def recording(img, quality, subsampling="4:2:0"):
        calls.append(int(quality))
        return real(img, quality, subsampling)

    monkeypatch.setattr(degrade, "jpeg_roundtrip", recording)
    cfg = StreamConfig(
        shards=str(root),
        patch_size=32,
        quality="10-90",
        double_jpeg_p=1.0,
        chroma_subsampling="4:2:0,4:4:4",
        shuffle_buffer=8,
    )
    loader = make_train_loader(cfg, batch_size=4, num_workers=0)
    it = iter(loader)
    labels: list[int] = []
    for _ in range(3):
        deg, clean, q = next(it)
        labels.extend(q.tolist())
    # in-process: each patch's two encodes are consecutive calls; the label is the second
    firsts, lasts = calls[0::2], calls[1::2]
    assert len(calls) >= 2 * len(labels) and lasts[: len(labels)] == labels
    assert all(a != b for a, b in zip(firsts, lasts))
    assert q.dtype == torch.int64 and set(labels) <= set(range(10, 91))
