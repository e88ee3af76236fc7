"""StreamConfig: every option of the training stream, defined once (default, help, check).

The trainer's config is composed from this dataclass (its defaults are the trainer's), so a
stream option never has a second definition elsewhere.
"""

from __future__ import annotations

import dataclasses

from restorer.data.augment import AugmentParams
from restorer.data.degrade import SUBSAMPLING, parse_quality, parse_subsampling
from restorer.errors import UserError


def _opt(default, help_text: str, **meta):
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help_text, **meta})
    return dataclasses.field(default=default, metadata={"help": help_text, **meta})


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

    def augment_params(self) -> AugmentParams:
        return AugmentParams(
            patch_size=int(self.patch_size),
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
            self.augment_params().validate()
        except ValueError as exc:
            raise UserError(f"stream config: {exc}") from None
        if not 0.0 <= float(self.double_jpeg_p) <= 1.0:
            raise UserError(f"stream config: double_jpeg_p must lie in [0, 1], got {self.double_jpeg_p}")
        if self.patches_per_image < 1 or self.shuffle_buffer < 0 or self.seed < 0:
            raise UserError("stream config: patches_per_image >= 1, shuffle_buffer >= 0 and seed >= 0 required")
        if self.quarantine_epochs is not None and self.quarantine_epochs < 0:
            raise UserError(f"stream config: quarantine_epochs must be >= 0, got {self.quarantine_epochs}")
        if not str(self.shards).strip():
            raise UserError("stream config: no shards given (a shards dir or a URL pattern)")
