"""Tiled inference, receptive radius, weights choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photos
from skimage import data

from restorer.data.degrade import jpeg_roundtrip
from restorer.errors import UserError
from restorer.infer.engine import Restorer, choose_restorer, load_restorers, tile_spans
from restorer.model import ModelConfig, alignment, build_model, receptive_radius
from restorer.modelfile import export_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.08)
    return model.eval()


def _restorer(model, cfg: ModelConfig, tile: int = 0, **kw) -> Restorer:
    return Restorer(
        model,
        {"model": {"in_channels": cfg.in_channels, "condition_on_quality": cfg.condition_on_quality}},
        Path("test"),
        torch.device("cpu"),
        tile,
        **kw,
    )


@pytest.mark.parametrize("preset", ["tiny", "seed", "default"])
def test_receptive_radius_is_the_impulse_response_extent(preset):
    model = _random_model(ModelConfig(preset=preset))
    r = receptive_radius(model)
    assert r == {"tiny": 2 + 2 * 2 + 1, "seed": 3 * 2 + 0 + 2, "default": 2 + 8 * 2 + 1}[preset]
    n = 2 * r + 11
    base = torch.full((1, 3, n, n), 0.5)
    poked = base.clone()
    poked[0, :, n // 2, n // 2] = 1.0
    with torch.no_grad():
        changed = (model(poked) - model(base)).abs().sum(dim=(0, 1)) > 0
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert int(rows.min()) == n // 2 - r and int(rows.max()) == n // 2 + r
    assert int(cols.min()) == n // 2 - r and int(cols.max()) == n // 2 + r


def test_tile_spans_partition_the_axis():
    for length in (1, 7, 64, 65, 200, 513):
        for tile, overlap in ((32, 7), (64, 0), (100, 19), (0, 5)):
            spans = tile_spans(length, tile, overlap)
            covered = np.zeros(length, int)
            for s0, s1, c0, c1 in spans:
                assert 0 <= s0 <= c0 < c1 <= s1 <= length
                assert s1 - s0 <= max(tile, 0) or tile <= 0 or tile >= length
                assert c0 - s0 in (0, overlap) or s0 == 0
                covered[c0:c1] += 1
            assert (covered == 1).all()
    with pytest.raises(UserError, match="larger than twice"):
        tile_spans(100, 20, 10)
    for length in (7, 65, 200, 513):  # aligned: every input start on the grid, cores still partition
        for tile, overlap, align in ((64, 7, 4), (100, 19, 4), (48, 4, 8)):
            spans = tile_spans(length, tile, overlap, align)
            covered = np.zeros(length, int)
            for s0, s1, c0, c1 in spans:
                assert s0 % align == 0 and c0 % align == 0 and s1 - s0 <= tile
                covered[c0:c1] += 1
            assert (covered == 1).all()


def test_tiled_equals_whole_image_for_a_multiscale_unet():
    """U-Net (pixel-unshuffle, alignment 4): tiles on the image's grid give the whole-image output,
    also for odd image sizes and a tile size that is not a multiple of the alignment."""
    cfg = ModelConfig(preset="unet-tiny", condition_on_quality=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    assert alignment(model) == 4
    r = _restorer(model, cfg)
    img = jpeg_roundtrip(data.coffee()[37:250, 11:290], 20)  # 213x279, odd offsets and sizes
    whole = r.restore(img, quality=20, tile=0)
    tile = 2 * r.overlap + 4 * 9 + 3
    tiled = r.restore(img, quality=20, tile=tile)
    assert len(tile_spans(img.shape[0], tile, r.overlap, 4)) > 1  # really tiled
    assert np.abs(whole.astype(int) - tiled.astype(int)).max() <= 1
    assert (whole != img).mean() > 0.5


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(preset="tiny"),
        ModelConfig(preset="seed"),
        ModelConfig(preset="tiny", condition_on_quality=True),
        ModelConfig(preset="tiny", in_channels=1),
    ],
)
def test_tiled_equals_whole_image(cfg):
    model = _random_model(cfg)
    r = _restorer(model, cfg)
    img = jpeg_roundtrip(data.coffee()[37:157, 11:150], 20)  # odd offsets, 120x139
    whole = r.restore(img, quality=20, tile=0)
    tiled = r.restore(img, quality=20, tile=48)
    assert np.abs(whole.astype(int) - tiled.astype(int)).max() <= 1
    assert (whole != img).mean() > 0.5  # the random net really changes the image
    # too little overlap shows up as seams: the default overlap is what makes them vanish
    thin = _restorer(model, cfg, overlap=1).restore(img, quality=20, tile=48)
    assert np.abs(whole.astype(int) - thin.astype(int)).max() > 1


def test_gray_images_with_a_three_channel_model():
    cfg = ModelConfig(preset="tiny")
    model = _random_model(cfg)
    gray = data.camera()[:64, :80]
    out = _restorer(model, cfg, tile=32).restore(gray)
    assert out.shape == gray.shape and out.dtype == np.uint8
    with torch.no_grad():
        x = torch.from_numpy(gray.copy()).float().div(255).expand(1, 3, -1, -1)
        expected = model(x).mean(dim=1)[0].clamp(0, 1).mul(255).round().byte().numpy()
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_untrained_residual_model_is_exact_identity():
    cfg = ModelConfig(preset="tiny")
    r = _restorer(build_model(cfg).eval(), cfg, tile=40)
    img = data.astronaut()[:100, :130]
    assert np.array_equal(r.restore(img), img)
    assert np.array_equal(r.restore(img[:, :, 0]), img[:, :, 0])


def test_choose_nearest_quality_range(tmp_path):
    paths = {}
    for name, q in (("q10", "10"), ("q30", "30"), ("blind", "10-90"), ("q50-60", "50-60")):
        paths[name] = export_weights(
            build_model(ModelConfig(preset="tiny")), ModelConfig(preset="tiny"), tmp_path / name, facts={"quality": q}
        )
    restorers, errors = load_restorers([str(tmp_path / n) for n in paths], torch.device("cpu"))
    assert not errors and len(restorers) == 4

    def pick(q):
        return choose_restorer(restorers, q).path.parent.name

    assert pick(10) == "q10" and pick(12) == "blind" and pick(30) == "q30" and pick(55) == "q50-60"
    assert pick(95) == "blind" and pick(5) == "q10" and pick(None) == "blind"
    without_blind = [r for r in restorers if r.path.parent.name != "blind"]
    assert choose_restorer(without_blind, 19).path.parent.name == "q10"
    assert choose_restorer(without_blind, 21).path.parent.name == "q30"
    assert choose_restorer(without_blind, 95).path.parent.name == "q50-60"


def test_trained_quality_range_and_covers(tmp_path, monkeypatch):
    from restorer import weights as packaged
    from restorer.infer.engine import trained_quality_range

    assert trained_quality_range({"quality": "10-90", "quality_range": [20, 40]}, tmp_path) == (20, 40)
    assert trained_quality_range({"quality": "10-90"}, tmp_path) == (10, 90)
    assert trained_quality_range({"quality_range": [50, 5]}, tmp_path) is None  # unreadable: warned, unknown
    assert trained_quality_range({}, tmp_path) is None
    cfg = ModelConfig(preset="tiny")
    export_weights(build_model(cfg), cfg, tmp_path / "w", facts={"quality": "10-90", "quality_range": [10, 40]})
    r = load_restorers([str(tmp_path / "w")], torch.device("cpu"))[0][0]
    assert r.covers(10) and r.covers(40) and not r.covers(41) and not r.covers(5)
    # packaged names: a missing file is one error line, not a traceback
    monkeypatch.setattr(packaged, "FOLDER", tmp_path / "nothing")
    restorers, errors = load_restorers(["fast"], torch.device("cpu"))
    assert not restorers and len(errors) == 1 and "'fast' model is not installed" in errors[0]


def test_trained_small_model_beats_jpeg_on_unseen_halves(small_q10_weights):
    restorers, errors = load_restorers([str(small_q10_weights)], torch.device("cpu"), tile=96)
    assert not errors
    r = restorers[0]
    for name, ref in photos().items():
        jpeg = jpeg_roundtrip(ref, 10)
        right = slice((ref.shape[1] // 2) // 8 * 8, None)  # the half never trained on
        out = r.restore(jpeg[:, right], quality=10)
        target = ref[:, right].astype(float)
        gain = 10 * np.log10(np.mean((jpeg[:, right] - target) ** 2) / np.mean((out - target) ** 2))
        assert gain > 0.1, f"{name}: restored only {gain:+.2f} dB vs JPEG"
