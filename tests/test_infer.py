"""Tiled inference, receptive radius, weights choice; and the small trained model the CLI tests share."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from restorer.modelfile import export_weights
from restorer.data.degrade import jpeg_roundtrip
from restorer.errors import UserError
from restorer.infer import (Restorer, choose_restorer, load_restorers, receptive_radius, tile_spans)
from restorer.model import ModelConfig, build_model

# A deliberately small network (16 channels, 1 unit) trained in-test, so it really improves JPEG.
SMALL = ModelConfig(preset="tiny", channels=16, units=1)
TRAIN_STEPS = 150


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def photos() -> dict[str, np.ndarray]:
    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}


def train_small_q10(steps: int = TRAIN_STEPS, seed: int = 0) -> torch.nn.Module:
    """~150 Adam steps on 48 px patches from the LEFT halves of three photos at JPEG quality 10
    (whole photo compressed once, patches on the 8x8 grid); the right halves stay unseen."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pairs = []
    for ref in photos().values():
        half = ref[:, : (ref.shape[1] // 2) // 8 * 8]
        pairs.append((half, jpeg_roundtrip(ref, 10)[:, : half.shape[1]]))
    model = build_model(SMALL)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    size = 48
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(8):
            ref, jp = pairs[rng.integers(len(pairs))]
            y = int(rng.integers(0, (ref.shape[0] - size) // 8)) * 8
            x = int(rng.integers(0, (ref.shape[1] - size) // 8)) * 8
            xs.append(jp[y:y + size, x:x + size])
            ys.append(ref[y:y + size, x:x + size])
        x_t = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
        y_t = torch.from_numpy(np.stack(ys)).permute(0, 3, 1, 2).float() / 255
        loss = (model(x_t) - y_t).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


_TRAINED: dict[str, Path] = {}


@pytest.fixture(scope="session")
def small_q10_weights(tmp_path_factory) -> Path:
    """model.safetensors of the in-test trained model (facts quality "10"). Other test modules
    import this fixture, which makes one fixture per module: the cache trains only once."""
    if "q10" not in _TRAINED:
        out = tmp_path_factory.mktemp("small_q10")
        _TRAINED["q10"] = export_weights(train_small_q10(), SMALL, out, facts={"quality": "10", "steps": TRAIN_STEPS})
    return _TRAINED["q10"]


def _random_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.08)
    return model.eval()


def _restorer(model, cfg: ModelConfig, tile: int = 0, **kw) -> Restorer:
    return Restorer(model, {"model": {"in_channels": cfg.in_channels, "condition_on_quality": cfg.condition_on_quality}},
                    Path("test"), torch.device("cpu"), tile, **kw)


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


@pytest.mark.parametrize("cfg", [ModelConfig(preset="tiny"), ModelConfig(preset="seed"),
                                 ModelConfig(preset="tiny", condition_on_quality=True),
                                 ModelConfig(preset="tiny", in_channels=1)])
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
        paths[name] = export_weights(build_model(ModelConfig(preset="tiny")), ModelConfig(preset="tiny"),
                                     tmp_path / name, facts={"quality": q})
    restorers, errors = load_restorers([str(tmp_path / n) for n in paths], torch.device("cpu"))
    assert not errors and len(restorers) == 4
    pick = lambda q: choose_restorer(restorers, q).path.parent.name
    assert pick(10) == "q10" and pick(12) == "blind" and pick(30) == "q30" and pick(55) == "q50-60"
    assert pick(95) == "blind" and pick(5) == "q10" and pick(None) == "blind"
    without_blind = [r for r in restorers if r.path.parent.name != "blind"]
    assert choose_restorer(without_blind, 19).path.parent.name == "q10"
    assert choose_restorer(without_blind, 21).path.parent.name == "q30"
    assert choose_restorer(without_blind, 95).path.parent.name == "q50-60"


def test_trained_small_model_beats_jpeg_on_unseen_halves(small_q10_weights):
    restorers, errors = load_restorers([str(small_q10_weights)], torch.device("cpu"), tile=96)
    assert not errors
    r = restorers[0]
    for name, ref in photos().items():
        jpeg = jpeg_roundtrip(ref, 10)
        right = slice((ref.shape[1] // 2) // 8 * 8, None)  # the half never trained on
        out = r.restore(jpeg[:, right], quality=10)
        err = lambda a: np.mean((a.astype(float) - ref[:, right].astype(float)) ** 2)
        gain = 10 * np.log10(err(jpeg[:, right]) / err(out))
        assert gain > 0.1, f"{name}: restored only {gain:+.2f} dB vs JPEG"
