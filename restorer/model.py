"""The restoration networks, all built from one "conv unit".

conv unit = Conv3x3 -> Conv1x1 -> PReLU -> Conv3x3 -> PReLU   (the original design's block)

Presets
-------
``seed``     the original network, kept as the reference row: units 3->128->64->32, then
             Conv1x1 32->16, PReLU, Conv5x5 16->3, predicting the clean image directly, no skips,
             weights initialised N(0, 0.001) as the original did (313,066 parameters).
``tiny`` / ``small`` / ``default`` / ``large``
             residual presets: a head unit (in->C), N units C->C each with a skip connection, a
             3x3 tail conv C->in, and a global residual (output = input + predicted correction).
             The tail starts at zero, so an untrained model is the identity (= the JPEG itself).
``unet-tiny`` / ``unet``
             a multi-scale U-Net of the same conv units (:class:`UNet`): 3 scales of width C, 2C,
             4C, pixel-unshuffle + 1x1 conv down, 1x1 conv + pixel-shuffle up, additive skips, N
             units per scale on each side, the same zero tail and global residual. Every unit costs
             about the same FLOPs per image pixel at every scale (4x the channels^2 / 4 ... x 1/4
             the pixels), while the receptive field is ~4x that of a flat stack of equal cost.

Every network reports :meth:`receptive_radius` (context pixels one output pixel depends on) and
``alignment`` (tile origins must be multiples of it), which tiled inference uses to be exactly
equal to whole-image inference.

Quality conditioning (``condition_on_quality``) appends one input plane filled with quality/100,
so a single blind model serves every JPEG quality.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from restorer.config import at_least, option

# channels/units of the seed preset are its last width and unit count, for the record only.
PRESETS: dict[str, dict[str, int]] = {
    "seed": {"channels": 32, "units": 3},
    "tiny": {"channels": 32, "units": 2},
    "small": {"channels": 64, "units": 4},
    "default": {"channels": 64, "units": 8},
    "large": {"channels": 128, "units": 8},
    "unet-tiny": {"channels": 32, "units": 1},
    "unet": {"channels": 64, "units": 2},
}


@dataclasses.dataclass
class ModelConfig:
    preset: str = option("default", f"network: {', '.join(PRESETS)} (see restorer/model.py)")
    channels: int | None = option(None, "override the preset's width C", check=at_least(1))
    units: int | None = option(None, "override the preset's unit count N", check=at_least(1))
    in_channels: int = option(3, "3 = RGB, 1 = grayscale (commands set it from --grayscale)", choices=(1, 3))
    condition_on_quality: bool = option(False, "add an input plane of quality/100 (one blind model for all qualities)")

    def resolved(self) -> ModelConfig:
        """Fill channels/units from the preset, so the config alone describes the architecture."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        base = PRESETS[self.preset]
        return dataclasses.replace(
            self,
            channels=self.channels if self.channels is not None else base["channels"],
            units=self.units if self.units is not None else base["units"],
        )


UNET_SCALES = 3  # full, 1/2 and 1/4 resolution


class ConvUnit(nn.Module):
    """Conv3x3 (cin->cout) -> Conv1x1 -> PReLU -> Conv3x3 -> PReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.mix = nn.Conv2d(cout, cout, 1)
        self.act1 = nn.PReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.act2 = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.act1(self.mix(self.conv1(x)))))


def quality_plane(x: torch.Tensor, quality: torch.Tensor | None) -> torch.Tensor:
    """Append a plane of quality/100 (one value per image) to ``x``."""
    if quality is None:
        raise ValueError("this model is quality-conditioned: pass the JPEG quality of each image")
    q = quality.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1) / 100.0
    return torch.cat([x, q.expand(x.shape[0], 1, x.shape[2], x.shape[3])], dim=1)


class SeedNet(nn.Module):
    """The original network, exactly (see module docstring)."""

    def __init__(self, in_channels: int = 3, condition_on_quality: bool = False):
        super().__init__()
        self.condition_on_quality = condition_on_quality
        cin = in_channels + int(condition_on_quality)
        self.body = nn.Sequential(
            ConvUnit(cin, 128),
            ConvUnit(128, 64),
            ConvUnit(64, 32),
            nn.Conv2d(32, 16, 1),
            nn.PReLU(),
            nn.Conv2d(16, in_channels, 5, padding=2),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, quality: torch.Tensor | None = None) -> torch.Tensor:
        if self.condition_on_quality:
            x = quality_plane(x, quality)
        return self.body(x)

    alignment = 1

    def receptive_radius(self) -> int:
        return _conv_radius(self)


def _zero(conv: nn.Conv2d) -> None:
    """A tail that starts at zero: an untrained residual network is the identity."""
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ResidualNet(nn.Module):
    """Head unit, N skip-connected units, tail conv, global residual."""

    def __init__(self, channels: int, units: int, in_channels: int = 3, condition_on_quality: bool = False):
        super().__init__()
        self.condition_on_quality = condition_on_quality
        self.head = ConvUnit(in_channels + int(condition_on_quality), channels)
        self.units = nn.ModuleList(ConvUnit(channels, channels) for _ in range(units))
        self.tail = nn.Conv2d(channels, in_channels, 3, padding=1)
        _zero(self.tail)

    def forward(self, x: torch.Tensor, quality: torch.Tensor | None = None) -> torch.Tensor:
        h = self.head(quality_plane(x, quality) if self.condition_on_quality else x)
        for unit in self.units:
            h = h + unit(h)
        return x + self.tail(h)

    alignment = 1

    def receptive_radius(self) -> int:
        return _conv_radius(self)


def _conv_radius(module: nn.Module) -> int:
    """Sum over the convolutions of ``module`` of dilation * (kernel - 1) / 2: the receptive radius
    of a chain of stride-1 convolutions with skip connections (the longest path runs through every
    conv), e.g. the default preset: 2 + 8 x 2 + 1 = 19."""
    radius = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if any(s != 1 for s in m.stride):
                raise ValueError("_conv_radius assumes stride-1 convolutions")
            radius += max(d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation, strict=True))
    return radius


class UNet(nn.Module):
    """Conv-unit U-Net: head unit (in->C); at scale s (width C*2^s, resolution 1/2^s) N units
    going down, then, after the deepest scale, N units coming back up at each shallower scale.
    Down = pixel-unshuffle(2) + 1x1 conv (4w -> 2w), up = 1x1 conv (2w -> 4w) + pixel-shuffle(2),
    skips are additive, every unit is residual, the 3x3 tail starts at zero and the output is
    input + tail: an untrained UNet is the identity, like the residual presets.

    Inputs of any size: the image is padded (replicate) to a multiple of :attr:`alignment`
    (4 for 3 scales) and the output cropped back."""

    def __init__(
        self,
        channels: int,
        units: int,
        in_channels: int = 3,
        condition_on_quality: bool = False,
        scales: int = UNET_SCALES,
    ):
        super().__init__()
        self.condition_on_quality = condition_on_quality
        self.scales = scales
        self.alignment = 2 ** (scales - 1)
        widths = [channels * 2**s for s in range(scales)]
        self.head = ConvUnit(in_channels + int(condition_on_quality), channels)
        self.down_units = nn.ModuleList(nn.ModuleList(ConvUnit(w, w) for _ in range(units)) for w in widths)
        self.down = nn.ModuleList(nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * w, 2 * w, 1)) for w in widths[:-1])
        self.up = nn.ModuleList(nn.Sequential(nn.Conv2d(2 * w, 4 * w, 1), nn.PixelShuffle(2)) for w in widths[:-1])
        self.up_units = nn.ModuleList(nn.ModuleList(ConvUnit(w, w) for _ in range(units)) for w in widths[:-1])
        self.tail = nn.Conv2d(channels, in_channels, 3, padding=1)
        _zero(self.tail)

    @staticmethod
    def _units(h: torch.Tensor, units: nn.Module) -> torch.Tensor:
        for unit in units.children():
            h = h + unit(h)
        return h

    def forward(self, x: torch.Tensor, quality: torch.Tensor | None = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        a = self.alignment
        pad_h, pad_w = -height % a, -width % a
        xp = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
        h = self.head(quality_plane(xp, quality) if self.condition_on_quality else xp)
        skips = []
        for s in range(self.scales):
            h = self._units(h, self.down_units[s])
            if s < self.scales - 1:
                skips.append(h)
                h = self.down[s](h)
        for s in reversed(range(self.scales - 1)):
            h = self._units(self.up[s](h) + skips[s], self.up_units[s])
        out = xp + self.tail(h)
        return out[..., :height, :width] if pad_h or pad_w else out

    def receptive_radius(self) -> int:
        """Full-resolution context pixels on each side: a conv of radius r at scale s reaches
        r * 2^s pixels, and the deepest pixel grid adds up to alignment - 1 pixels of block
        slack; pixel-(un)shuffle and 1x1 convs reach nothing further. tests/test_model.py checks
        this bound against the measured gradient footprint and tiled == untiled inference."""
        radius = _conv_radius(self.head) + _conv_radius(self.tail)
        for s in range(self.scales):
            radius += _conv_radius(self.down_units[s]) * 2**s
            if s < self.scales - 1:
                radius += _conv_radius(self.up_units[s]) * 2**s
        return radius + self.alignment - 1


def build_model(cfg: ModelConfig) -> nn.Module:
    cfg = cfg.resolved()
    assert cfg.channels is not None and cfg.units is not None  # resolved() filled them in
    if cfg.preset == "seed":
        return SeedNet(cfg.in_channels, cfg.condition_on_quality)
    if cfg.preset.startswith("unet"):
        return UNet(cfg.channels, cfg.units, cfg.in_channels, cfg.condition_on_quality)
    return ResidualNet(cfg.channels, cfg.units, cfg.in_channels, cfg.condition_on_quality)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_pixel(model: nn.Module) -> int:
    """Forward FLOPs per input pixel: 2 x multiply-accumulates of every conv, counted at the
    resolution each conv runs at (one forward of a 64x64 probe with hooks), so multi-scale nets
    are counted right; activations, additions and pixel shuffles are ignored (< 1% here)."""
    side = 64
    macs = 0

    def count(m: nn.Conv2d, _inp, out) -> None:
        nonlocal macs
        k = m.kernel_size[0] * m.kernel_size[1]
        macs += k * (m.in_channels // m.groups) * m.out_channels * out.shape[-2] * out.shape[-1]

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        cin = first.in_channels - int(getattr(model, "condition_on_quality", False))
        q = torch.full((1,), 50.0) if getattr(model, "condition_on_quality", False) else None
        with torch.no_grad():
            model(torch.zeros(1, cin, side, side, device=first.weight.device, dtype=first.weight.dtype), q)
    finally:
        for h in hooks:
            h.remove()
    return 2 * macs // (side * side)


def receptive_radius(model: nn.Module) -> int:
    """Context pixels on each side one output pixel depends on (each network computes its own)."""
    return int(model.receptive_radius())  # type: ignore[operator]  # torch types Module attributes as Tensor | Module


def alignment(model: nn.Module) -> int:
    """Tile origins (and tile sizes) must be multiples of this for tiled == whole-image output."""
    return int(getattr(model, "alignment", 1))


def model_summary(cfg: ModelConfig) -> dict[str, object]:
    cfg = cfg.resolved()
    model = build_model(cfg)
    fpp = flops_per_pixel(model)
    return {
        "preset": cfg.preset,
        "channels": cfg.channels,
        "units": cfg.units,
        "in_channels": cfg.in_channels,
        "condition_on_quality": cfg.condition_on_quality,
        "parameters": count_parameters(model),
        "gflops_per_megapixel": fpp * 1e6 / 1e9,
        # training ~ 3x forward (forward + backward w.r.t. activations and weights)
        "train_gflops_per_128px_patch": 3 * fpp * 128 * 128 / 1e9,
    }
