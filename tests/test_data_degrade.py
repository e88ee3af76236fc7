"""Training degradations (restorer.data.degrade): quality ranges, double JPEG on a shifted grid,
chroma subsampling drawn from a list, and the label = the last compression's quality; real-world
chains (saves, resizes, grid shifts) labelled with their effective quality, or with the quality
``restore --quality auto`` tells the model (``chain_label: restore``)."""

from __future__ import annotations

import dataclasses
import io
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import write_shards
from PIL import Image

from restorer.data import degrade
from restorer.data.config import StreamConfig
from restorer.data.degrade import (
    ChainParams,
    Degradation,
    Save,
    draw_degradation,
    jpeg_bytes,
    jpeg_roundtrip,
    jpeg_shifted,
    parse_chain,
)
from restorer.data.loader import make_train_loader
from restorer.errors import UserError


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[64:256, 128:320])  # 192 x 192 RGB


def data_photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()


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
    assert all(a != b for a, b in zip(firsts, lasts, strict=False))
    assert q.dtype == torch.int64 and set(labels) <= set(range(10, 91))


# --- real-world chains (issue 19) -------------------------------------------------------------------------

CHAIN = ChainParams(p=1.0, three_p=0.3, resize_p=0.5, shift_p=0.5, patch_size=48)


def test_parse_chain_reads_saves_resizes_and_shifts():
    saves = parse_chain("30>s4>x0.75:area>80:4:4:4")
    assert [s.quality for s in saves] == [30, 80] and saves[0] == Save(30)
    assert saves[1] == Save(80, "4:4:4", 0.75, "area", (4, 4))
    assert parse_chain("50") == (Save(50),) and parse_chain("40>s2,5>85")[1].shift == (2, 5)
    for bad in ("", "s4>80", "30>", "30>x1.5>80", "30>s9>80", "30>x0.5:nearest>80", "0", "30>80:4:1:1"):
        with pytest.raises(ValueError, match="not a chain"):
            parse_chain(bad)


def test_apply_chain_resizes_and_crops_the_reference_with_the_image(photo):
    deg, ref, data = degrade.apply_chain(photo, parse_chain("40>x0.75>s3,1>85"))
    assert deg.shape == ref.shape == (144 - 3, 144 - 1, 3) and deg.dtype == ref.dtype == np.uint8
    clean = np.asarray(Image.fromarray(photo).resize((144, 144), Image.Resampling.BICUBIC))[3:, 1:]
    assert np.array_equal(ref, clean)
    with Image.open(io.BytesIO(data)) as im:  # the bytes are the last save
        assert degrade.estimate_quality(im) == 85 and np.array_equal(np.asarray(im), deg)
    single_deg, single_ref, _ = degrade.apply_chain(photo, parse_chain("30"))
    assert np.array_equal(single_deg, jpeg_roundtrip(photo, 30)) and np.array_equal(single_ref, photo)


def test_chain_draws_cover_the_options_and_are_deterministic():
    rng = np.random.default_rng(0)
    draws = [draw_degradation(rng, (5, 95), 0.0, ("4:2:0", "4:4:4"), CHAIN) for _ in range(3000)]
    again = [draw_degradation(np.random.default_rng(0), (5, 95), 0.0, ("4:2:0", "4:4:4"), CHAIN)]
    assert again[0] == draws[0]
    lengths = Counter(len(d.chain) for d in draws)
    assert set(lengths) == {2, 3} and abs(lengths[3] / 3000 - 0.3) < 0.04
    resized = [s for d in draws for s in d.chain if s.scale != 1.0]
    assert abs(len(resized) / 3000 - 0.5) < 0.04  # at most one resize per chain, half of the chains
    assert all(0.5 <= s.scale <= 1.0 for s in resized) and {s.kernel for s in resized} == set(degrade.KERNELS)
    gaps = [s for d in draws for s in d.chain[1:]]
    shifted = [s for s in gaps if s.shift != (0, 0)]
    assert abs(len(shifted) / len(gaps) - 0.5) < 0.04 and all(max(s.shift) <= 7 for s in shifted)
    assert all(d.chain[0].scale == 1.0 and d.chain[0].shift == (0, 0) for d in draws)
    assert all(d.chain[-1].quality == d.quality and d.chain[-1].subsampling == d.subsampling for d in draws)
    firsts = [d.chain[0].quality - d.quality for d in draws]
    assert min(firsts) < 0 < max(firsts)  # the first save lower or higher than the last
    assert {s.subsampling for d in draws for s in d.chain} == {"4:2:0", "4:4:4"}
    assert all(d.size == 48 for d in draws)


def test_without_chains_the_draws_are_those_of_a_stream_without_the_option():
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    off = ChainParams(p=0.0, patch_size=48)
    for _ in range(200):
        assert draw_degradation(a, (10, 90), 0.3, ("4:2:0", "4:4:4")) == draw_degradation(
            b, (10, 90), 0.3, ("4:2:0", "4:4:4"), off
        )


def test_apply_returns_the_patch_size_pair_and_the_effective_label():
    rng = np.random.default_rng(3)
    big = np.ascontiguousarray(
        np.asarray(Image.open(io.BytesIO(jpeg_bytes(data_photo(), 95))))[: CHAIN.source_size(), : CHAIN.source_size()]
    )
    for _ in range(40):
        d = draw_degradation(rng, (5, 95), 0.0, ("4:2:0",), CHAIN)
        deg, clean, label = degrade.apply(big, d)
        assert deg.shape == clean.shape == (48, 48, 3) and deg.flags.c_contiguous and clean.flags.c_contiguous
        assert 1 <= label <= d.quality
        assert degrade.apply(big, d)[2] == label and np.array_equal(degrade.apply(big, d)[0], deg)  # deterministic
    single = Degradation(40, size=48)
    deg, clean, label = degrade.apply(big, single)
    assert (
        label == 40 and np.array_equal(clean, big[:48, :48]) and np.array_equal(deg, jpeg_roundtrip(big[:48, :48], 40))
    )


def test_effective_quality_is_the_single_save_of_equal_psnr(photo):
    """A single save is labelled with itself; a chain with the single-save quality whose PSNR it
    matches: no higher than its last save, about its lower save when not resized, and above its
    first save when a resize between the saves softened that save's damage."""

    def label(spec):
        saves = parse_chain(spec)
        deg, ref, _ = degrade.apply_chain(photo, saves)
        return degrade.effective_quality(ref, deg, saves)

    assert label("37") == 37
    assert 24 <= label("30>80") <= 31 and label("90>30") in range(26, 31)
    assert label("30>s4>80") <= label("30>80")  # a shifted second grid adds its own damage
    assert label("40>x0.6>85") > 45  # downscaling averages the first save's error away


def test_stream_with_chains_batches_the_patch_size_and_records_its_options(tmp_path):
    root = write_shards(tmp_path / "s", splits={"train": 8}, samples_per_shard=4, tile=192)
    cfg = StreamConfig(shards=str(root), patch_size=48, quality="10-90", chain_p=1.0, shuffle_buffer=8)
    assert cfg.augment_params().patch_size == CHAIN.source_size() == cfg.chain_params().source_size()
    batches = [next(iter(make_train_loader(cfg, batch_size=4, num_workers=0))) for _ in range(2)]
    assert all(deg.shape == clean.shape == (4, 3, 48, 48) for deg, clean, _ in batches)
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][2], batches[1][2])  # seeded
    facts = cfg.degradation_facts()
    assert (
        facts["chain_p"] == 1.0
        and facts["chain_scales"] == "0.5-1.0"
        and set(facts)
        >= {
            "quality",
            "double_jpeg_p",
            "chroma_subsampling",
            "chain_three_p",
            "chain_resize_p",
            "chain_kernels",
            "chain_shift_p",
            "chain_label",
        }
    )
    for bad in (
        dict(chain_p=2.0),
        dict(chain_scales="0-1"),
        dict(chain_kernels="nearest"),
        dict(chain_shift_p=-1),
        dict(chain_label="last"),
    ):
        with pytest.raises(UserError, match="chain"):
            StreamConfig(**bad).validate()


@pytest.mark.parametrize(
    "spec, told",
    [
        ("30>80", 30),  # aligned earlier save: its lattice is what restore finds
        ("30>s4>80", 30),  # cropped in between: found on its shifted grid
        ("20>60>90", 20),  # the strongest earlier save
        ("40>x0.75>85", 85),  # a resize hides the earlier save: the tables' quality
        ("40>x0.8>30>85", 30),  # the save after the resize survives
        ("30>x0.7>50>90", 50),
        ("90>30", 30),  # the earlier save is not stronger
        ("75>80", 80),  # nor 1.5x stronger: taken for the file's own save
    ],
)
def test_restore_label_is_what_restore_tells_the_model(spec, told):
    assert degrade.restore_label(parse_chain(spec)) == told


def test_restore_label_matches_the_lattice_found_on_a_photo():
    """On a whole photo, what restorer.infer.resave finds agrees with the label from the facts."""
    from restorer.data.degrade import reference_tables
    from restorer.infer.resave import find_earlier_save

    for spec in ("30>80", "30>s4>80", "40>x0.75>85", "90>30"):
        saves = parse_chain(spec)
        deg, _, _ = degrade.apply_chain(data_photo(), saves)
        assert saves[-1].quality in reference_tables()
        found = find_earlier_save(deg, saves[-1].quality)
        assert (found.quality if found else saves[-1].quality) == degrade.restore_label(saves), spec


def test_stream_labels_chains_as_restore_tells_the_model(tmp_path):
    rng = np.random.default_rng(5)
    params = dataclasses.replace(CHAIN, p=1.0, label="restore")
    big = np.ascontiguousarray(data_photo()[: CHAIN.source_size(), : CHAIN.source_size()])
    labels = []
    for _ in range(30):
        d = draw_degradation(rng, (5, 95), 0.0, ("4:2:0",), params)
        assert d.chain and d.chain_label == "restore"
        labels.append((degrade.apply(big, d)[2], degrade.restore_label(d.chain)))
    assert all(a == b for a, b in labels)
    root = write_shards(tmp_path / "s", splits={"train": 4}, samples_per_shard=2, tile=192)
    cfg = StreamConfig(shards=str(root), patch_size=48, chain_p=1.0, chain_label="restore", shuffle_buffer=4)
    assert cfg.chain_params().label == "restore" and cfg.degradation_facts()["chain_label"] == "restore"
