"""The one config dataclass of ``python -m shard_tools build``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from restorer.errors import UserError
from shard_tools.images import ENCODINGS

# Fields that do not change what ends up in the shards (excluded from the resume fingerprint).
NON_CONTENT_FIELDS = ("out", "stage_dir", "overwrite", "workers", "verify", "progress")


@dataclass
class BuildConfig:
    out: str = field(
        default="data/shards", metadata={"help": "output folder, or a bucket URL (s3://bucket/prefix, gs://...)"}
    )
    stage_dir: str | None = field(
        default=None,
        metadata={
            "help": "with a URL --out: local folder to build in before uploading (kept, so a re-run "
            "resumes; default: a temporary folder, removed at the end)"
        },
    )
    div2k: list[str] = field(
        default_factory=list,
        metadata={"help": "folder with DIV2K_train_HR/, DIV2K_valid_HR/ (folders or .zip)", "append": True},
    )
    bsds: list[str] = field(
        default_factory=list,
        metadata={"help": "folder holding BSR/ (or BSR/ itself) or BSR_bsds500.tgz", "append": True},
    )
    openimages: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Open Images folder(s)/.tar.gz (train_0.., validation, test) and image-ids CSV",
            "append": True,
        },
    )
    folder: list[str] = field(
        default_factory=list,
        metadata={"help": "any tree of images (repeatable); split by a hash of the path", "append": True},
    )
    val_fraction: float = field(default=0.1, metadata={"help": "share of --folder images in val"})
    max_images: int | None = field(default=None, metadata={"help": "at most N images per source and split"})
    tile: int = field(default=512, metadata={"help": "tile side in pixels"})
    min_size: int = field(
        default=128, metadata={"help": "skip images, and drop remainder tiles, whose shorter side is below this"}
    )
    downscale_lossy: float = field(
        default=0.5, metadata={"help": "bicubic scale factor applied to lossy sources (Open Images JPEGs); 1 = off"}
    )
    encoding: str = field(default="webp", metadata={"help": "lossless tile encoding", "choices": list(ENCODINGS)})
    max_samples: int = field(default=256, metadata={"help": "samples per shard at most"})
    max_bytes: int = field(default=256_000_000, metadata={"help": "payload bytes per shard"})
    max_pixels: int = field(
        default=100_000_000, metadata={"help": "skip images declaring more pixels (decompression bombs)"}
    )
    max_file_bytes: int = field(default=512 * 2**20, metadata={"help": "skip input files larger than this"})
    seed: int = field(default=0, metadata={"help": "seed of the sample shuffle"})
    workers: int = field(default=0, metadata={"help": "decode processes (0 = all cores)"})
    num_jobs: int = field(default=1, metadata={"help": "split the build over K machines"})
    job_index: int = field(default=0, metadata={"help": "which of the K parts this run builds"})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "replace an --out that holds something else than this build (other settings or inputs, a "
            "merged folder, other files: the builder's files there are removed first); never an input"
        },
    )
    verify: bool = field(default=False, metadata={"help": "re-hash every shard after building"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self) -> None:
        if self.tile < 16:
            raise UserError(f"--tile {self.tile}: must be at least 16")
        if self.min_size < 1 or self.min_size > self.tile:
            raise UserError(f"--min-size {self.min_size}: must be in 1..tile ({self.tile})")
        if not 0 < self.downscale_lossy <= 1:
            raise UserError(f"--downscale-lossy {self.downscale_lossy}: must be in (0, 1]")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.encoding not in ENCODINGS:
            raise UserError(f"--encoding {self.encoding}: choose one of {', '.join(ENCODINGS)}")
        if self.max_samples < 1 or self.max_bytes < 1:
            raise UserError("--max-samples and --max-bytes must be positive")
        if self.max_images is not None and self.max_images < 1:
            raise UserError(f"--max-images {self.max_images}: must be positive")
        if self.num_jobs < 1 or not 0 <= self.job_index < self.num_jobs:
            raise UserError(f"--job-index {self.job_index}: must be in 0..{self.num_jobs - 1}")
        if self.workers < 0:
            raise UserError(f"--workers {self.workers}: must be >= 0")

    @property
    def n_workers(self) -> int:
        return self.workers or (os.cpu_count() or 1)

    @property
    def has_inputs(self) -> bool:
        return bool(self.div2k or self.bsds or self.openimages or self.folder)
