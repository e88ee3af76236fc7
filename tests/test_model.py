import pytest
import torch

from restorer.model import ModelConfig, PRESETS, build_model, count_parameters, flops_per_pixel, model_summary


def test_seed_preset_is_the_original_network():
    model = build_model(ModelConfig(preset="seed"))
    # 3->128->64->32 units, 1x1 32->16, 5x5 16->3: the original's ~313k parameters
    weights = (3*128*9 + 128*128 + 128*128*9 + 128*64*9 + 64*64 + 64*64*9
               + 64*32*9 + 32*32 + 32*32*9 + 32*16 + 16*3*25)
    biases = 128*3 + 64*3 + 32*3 + 16 + 3
    prelus = 7  # one slope each, as nn.PReLU() has
    assert count_parameters(model) == weights + biases + prelus == 313_066
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (3, 128, 3), (128, 128, 1), (128, 128, 3),
        (128, 64, 3), (64, 64, 1), (64, 64, 3),
        (64, 32, 3), (32, 32, 1), (32, 32, 3),
        (32, 16, 1), (16, 3, 5)]
    assert all(float(c.weight.detach().std()) < 0.002 for c in convs)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("cond", [False, True])
def test_shapes_every_preset(preset, cond):
    model = build_model(ModelConfig(preset=preset, condition_on_quality=cond))
    x = torch.rand(2, 3, 24, 40)
    q = torch.tensor([10, 50]) if cond else None
    assert model(x, q).shape == x.shape


def test_residual_preset_starts_as_identity_and_grayscale():
    x = torch.rand(1, 1, 16, 16)
    model = build_model(ModelConfig(preset="small", in_channels=1))
    assert torch.equal(model(x), x)


def test_conditioning_needs_quality():
    model = build_model(ModelConfig(preset="tiny", condition_on_quality=True))
    with pytest.raises(ValueError, match="quality"):
        model(torch.rand(1, 3, 8, 8))


def test_flops_count_matches_hand_arithmetic():
    model = build_model(ModelConfig(preset="seed"))
    macs = (3*128*9 + 128*128 + 128*128*9 + 128*64*9 + 64*64 + 64*64*9
            + 64*32*9 + 32*32 + 32*32*9 + 32*16 + 16*3*25)
    assert flops_per_pixel(model) == 2 * macs
    s = model_summary(ModelConfig(preset="default"))
    assert s["channels"] == PRESETS["default"]["channels"] and s["parameters"] > 0


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model(ModelConfig(preset="huge"))
