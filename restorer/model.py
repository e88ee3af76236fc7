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

Quality conditioning (``condition_on_quality``) appends one input plane filled with quality/100,
so a single blind model serves every JPEG quality.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn


@dataclasses.dataclass
class ModelConfig:
    preset: str = dataclasses.field(default="default", metadata={"help": "seed, tiny, small, default, large"})
    channels: Optional[int] = dataclasses.field(default=None, metadata={"help": "override the preset's width C"})
    units: Optional[int] = dataclasses.field(default=None, metadata={"help": "override the preset's unit count N"})
    in_channels: int = 3  # 3 = RGB, 1 = grayscale
    condition_on_quality: bool = dataclasses.field(
        default=False, metadata={"help": "add an input plane of quality/100 (one blind model for all qualities)"})

    def resolved(self) -> "ModelConfig":
        """Fill channels/units from the preset, so the config alone describes the architecture."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        base = PRESETS[self.preset]
        return dataclasses.replace(
            self,
            channels=self.channels if self.channels is not None else base["channels"],
            units=self.units if self.units is not None else base["units"],
        )


# channels/units of the seed preset are its last width and unit count, for the record only.
PRESETS: dict[str, dict[str, int]] = {
    "seed": {"channels": 32, "units": 3},
    "tiny": {"channels": 32, "units": 2},
    "small": {"channels": 64, "units": 4},
    "default": {"channels": 64, "units": 8},
    "large": {"channels": 128, "units": 8},
}


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


def quality_plane(x: torch.Tensor, quality: Optional[torch.Tensor]) -> torch.Tensor:
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
            ConvUnit(cin, 128), ConvUnit(128, 64), ConvUnit(64, 32),
            nn.Conv2d(32, 16, 1), nn.PReLU(), nn.Conv2d(16, in_channels, 5, padding=2),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, quality: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.condition_on_quality:
            x = quality_plane(x, quality)
        return self.body(x)


class ResidualNet(nn.Module):
    """Head unit, N skip-connected units, tail conv, global residual."""

    def __init__(self, channels: int, units: int, in_channels: int = 3, condition_on_quality: bool = False):
        super().__init__()
        self.condition_on_quality = condition_on_quality
        self.head = ConvUnit(in_channels + int(condition_on_quality), channels)
        self.units = nn.ModuleList(ConvUnit(channels, channels) for _ in range(units))
        self.tail = nn.Conv2d(channels, in_channels, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor, quality: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.head(quality_plane(x, quality) if self.condition_on_quality else x)
        for unit in self.units:
            h = h + unit(h)
        return x + self.tail(h)


def build_model(cfg: ModelConfig) -> nn.Module:
    cfg = cfg.resolved()
    if cfg.preset == "seed":
        return SeedNet(cfg.in_channels, cfg.condition_on_quality)
    return ResidualNet(cfg.channels, cfg.units, cfg.in_channels, cfg.condition_on_quality)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_pixel(model: nn.Module) -> int:
    """Forward FLOPs per output pixel (2 x multiply-accumulates of every conv; activations and
    additions are ignored, < 1% here). Exact for these fully convolutional, stride-1 nets."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            total += 2 * k * (m.in_channels // m.groups) * m.out_channels
    return total


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
