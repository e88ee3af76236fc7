import pytest
import torch

from restorer.model import PRESETS, ModelConfig, build_model, count_parameters, flops_per_pixel, model_summary


def test_seed_preset_is_the_original_network():
    model = build_model(ModelConfig(preset="seed"))
    # 3->128->64->32 units, 1x1 32->16, 5x5 16->3: the original's ~313k parameters
    weights = (
        3 * 128 * 9
        + 128 * 128
        + 128 * 128 * 9
        + 128 * 64 * 9
        + 64 * 64
        + 64 * 64 * 9
        + 64 * 32 * 9
        + 32 * 32
        + 32 * 32 * 9
        + 32 * 16
        + 16 * 3 * 25
    )
    biases = 128 * 3 + 64 * 3 + 32 * 3 + 16 + 3
    prelus = 7  # one slope each, as nn.PReLU() has
    assert count_parameters(model) == weights + biases + prelus == 313_066
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (3, 128, 3),
        (128, 128, 1),
        (128, 128, 3),
        (128, 64, 3),
        (64, 64, 1),
        (64, 64, 3),
        (64, 32, 3),
        (32, 32, 1),
        (32, 32, 3),
        (32, 16, 1),
        (16, 3, 5),
    ]
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
    macs = (
        3 * 128 * 9
        + 128 * 128
        + 128 * 128 * 9
        + 128 * 64 * 9
        + 64 * 64
        + 64 * 64 * 9
        + 64 * 32 * 9
        + 32 * 32
        + 32 * 32 * 9
        + 32 * 16
        + 16 * 3 * 25
    )
    assert flops_per_pixel(model) == 2 * macs
    s = model_summary(ModelConfig(preset="default"))
    assert s["channels"] == PRESETS["default"]["channels"] and s["parameters"] > 0


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model(ModelConfig(preset="huge"))


@pytest.mark.parametrize("preset", ["tiny", "unet-tiny"])
def test_receptive_radius_equals_measured_gradient_footprint(preset):
    """The computed radius is exact: with random weights, the gradient of one output pixel reaches
    input pixels exactly that far away (worst case over the 4x4 grid phases of a multi-scale net)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset)).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    reach = 0
    for oy in range(4):
        for ox in range(4):
            x = torch.rand(1, 3, 64, 64, dtype=torch.double, requires_grad=True)
            cy, cx = 30 + oy, 30 + ox
            model(x)[0, :, cy, cx].sum().backward()
            ys, xs = torch.nonzero(x.grad[0].abs().sum(0), as_tuple=True)
            reach = max(reach, cy - int(ys.min()), int(ys.max()) - cy, cx - int(xs.min()), int(xs.max()) - cx)
    from restorer.model import receptive_radius

    assert reach == receptive_radius(model)


@pytest.mark.parametrize("size", [(17, 30), (5, 3), (64, 64)])
def test_unet_is_identity_at_init_for_any_size(size):
    model = build_model(ModelConfig(preset="unet-tiny", condition_on_quality=True))
    x = torch.rand(2, 3, *size)
    assert torch.equal(model(x, torch.tensor([5, 95])), x)


def test_unet_flops_count_its_scales():
    """Convs at 1/2 and 1/4 resolution cost 1/4 and 1/16 per image pixel: the hook count must
    agree with hand arithmetic for the smallest U-Net."""
    from restorer.model import UNet

    c, n = 32, 1
    unit = lambda cin, w: 9 * cin * w + w * w + 9 * w * w  # noqa: E731
    widths = [c, 2 * c, 4 * c]
    macs = unit(3, c) + 9 * c * 3  # head + tail at full resolution
    for s, w in enumerate(widths):
        macs += n * unit(w, w) / 4**s  # down units
        if s < 2:
            macs += n * unit(w, w) / 4**s  # up units
            macs += 2 * (4 * w) * (2 * w) / 4 ** (s + 1)  # 1x1 down and up convs at the lower scale
    model = UNet(c, n)
    assert flops_per_pixel(model) == int(2 * macs)
