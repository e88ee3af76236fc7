"""StreamConfig: every option of the training stream, defined once (default, help, check).

The trainer's config is composed from this dataclass (its defaults are the trainer's), so a
stream option never has a second definition elsewhere.
"""

from __future__ import annotations

import dataclasses

from restorer.config import option
from restorer.data.augment import AugmentParams
from restorer.data.degrade import (
    CHAIN_LABELS,
    KERNELS,
    SUBSAMPLING,
    ChainParams,
    parse_kernels,
    parse_quality,
    parse_scales,
    parse_subsampling,
)
from restorer.errors import UserError

_opt = option  # a stream option: its default, help and check, in one place (restorer.config)


@dataclasses.dataclass
class StreamConfig:
    shards: str = _opt(
        "data/shards",
        "shards dir with manifest.json, or URLs: shard-{000000..000099}.tar, "
        "pipe:CMD, s3://, https:// ('::' separates several)",
    )
    splits: list[str] = _opt(["train"], "splits of a shards dir (a folder of tars or a URL pattern has only 'train')")
    patch_size: int = _opt(128, "side of the square training patches, px (>= 8)")
    patches_per_image: int = _opt(4, "patches cut from each decoded tile (>= 1)")
    quality: str = _opt("10-90", "JPEG quality, or a range like 10-90 drawn per patch (1..100)")
    double_jpeg_p: float = _opt(
        0.0,
        "probability of compressing a patch twice: first at another quality of the "
        "range, then at the labelled one; half of those on a 8x8 grid shifted by 0-7 px",
    )
    chroma_subsampling: str = _opt(
        "4:2:0",
        f"JPEG chroma subsampling, one of {', '.join(SUBSAMPLING)}, or several "
        "separated by ',' (e.g. 4:2:0,4:4:4) drawn per patch",
    )
    chain_p: float = _opt(
        0.0,
        "probability that a patch goes through a real-world chain of 2-3 JPEG saves, each at "
        "its own quality of the range and subsampling, with resizes and grid shifts between "
        "them (labelled with the chain's effective quality; restorer/data/degrade.py)",
    )
    chain_three_p: float = _opt(0.3, "share of the chains with three saves (else two)")
    chain_resize_p: float = _opt(0.5, "share of the chains resized once, between two of their saves")
    chain_scales: str = _opt("0.5-1.0", "scale of a chain's resize, drawn uniformly from this range (in (0, 1])")
    chain_kernels: str = _opt(",".join(KERNELS), f"kernels a chain's resize draws from: {', '.join(KERNELS)}")
    chain_shift_p: float = _opt(
        0.5,
        "per gap between two saves of a chain: probability of a crop of 0-7 px at the "
        "top and left (not both 0), which shifts the next save's 8x8 grid",
    )
    chain_label: str = _opt(
        "effective",
        "the quality a chain's patch is labelled with: 'effective' (the single save of equal PSNR) "
        "or 'restore' (what restore --quality auto tells the model: an earlier save whose lattice "
        "survives, else the last save's quality)",
    )
    rescale_p: float = _opt(0.5, "probability of rescaling (bicubic) before the crop")
    rescale_scales: tuple[float, ...] = _opt((0.9, 0.8, 0.7, 0.6), "scales a rescale draws from, each in (0, 1]")
    rotate_p: float = _opt(0.5, "probability of a 90/180/270 degree rotation")
    flip_p: float = _opt(0.0, "probability of a horizontal flip")
    grayscale: bool = _opt(False, "train on grayscale (one channel) patches")
    shuffle_buffer: int = _opt(1000, "patches held per worker for shuffling (within each epoch)")
    resampled: bool = _opt(
        False, "draw shards with replacement (weighted by size): epochs of any length, samples may repeat"
    )
    seed: int = _opt(0, "seed of the stream: with the epoch and each tile's address it fixes every draw")
    quarantine_epochs: int | None = _opt(
        None,
        "epochs a shard that failed (bad or missing, after its retries) is "
        "skipped for, on every rank (default: the rest of the run; "
        "0: retry it every epoch)",
    )

    def chain_params(self) -> ChainParams:
        return ChainParams(
            p=float(self.chain_p),
            three_p=float(self.chain_three_p),
            resize_p=float(self.chain_resize_p),
            scales=parse_scales(self.chain_scales),
            kernels=parse_kernels(self.chain_kernels),
            shift_p=float(self.chain_shift_p),
            patch_size=int(self.patch_size),
            label=str(self.chain_label),
        )

    def augment_params(self) -> AugmentParams:
        """How patches are cut: ``patch_size`` px, or more when chains need room for a resize and
        crops (:meth:`ChainParams.source_size`; the pair is then cut from the top-left)."""
        return AugmentParams(
            patch_size=self.chain_params().source_size(),
            rescale_p=float(self.rescale_p),
            rescale_scales=tuple(float(s) for s in self.rescale_scales),
            rotate_p=float(self.rotate_p),
            flip_p=float(self.flip_p),
        )

    def subsamplings(self) -> tuple[str, ...]:
        return parse_subsampling(self.chroma_subsampling)

    def validate(self) -> None:
        try:
            parse_quality(self.quality)
            self.subsamplings()
            self.chain_params()
            self.augment_params().validate()
        except ValueError as exc:
            raise UserError(f"stream config: {exc}") from None
        if self.chain_label not in CHAIN_LABELS:
            raise UserError(
                f"stream config: chain_label must be one of {', '.join(CHAIN_LABELS)}, got {self.chain_label!r}"
            )
        for name in ("double_jpeg_p", "chain_p", "chain_three_p", "chain_resize_p", "chain_shift_p"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise UserError(f"stream config: {name} must lie in [0, 1], got {getattr(self, name)}")
        if self.patches_per_image < 1 or self.shuffle_buffer < 0 or self.seed < 0:
            raise UserError("stream config: patches_per_image >= 1, shuffle_buffer >= 0 and seed >= 0 required")
        if self.quarantine_epochs is not None and self.quarantine_epochs < 0:
            raise UserError(f"stream config: quarantine_epochs must be >= 0, got {self.quarantine_epochs}")
        if not str(self.shards).strip():
            raise UserError("stream config: no shards given (a shards dir or a URL pattern)")

    def degradation_facts(self) -> dict:
        """The degradation options model.json records (``facts.degradations``)."""
        names = (
            "quality",
            "double_jpeg_p",
            "chroma_subsampling",
            "chain_p",
            "chain_three_p",
            "chain_resize_p",
            "chain_scales",
            "chain_kernels",
            "chain_shift_p",
            "chain_label",
        )
        return {name: getattr(self, name) for name in names}
