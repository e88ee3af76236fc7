"""The trainer's config: the data stream's options and the model's, plus the trainer's own.

``TrainConfig`` is COMPOSED of :class:`restorer.data.StreamConfig` (``cfg.data``) and
:class:`restorer.model.ModelConfig` (``cfg.model``): each of their options keeps its one default,
help and check where it is defined, and :mod:`restorer.config` lays them out as flat flags and YAML
keys (``--quality``, ``--patch-size``, ``--preset`` ...; the stream's ``splits`` is
``--train-splits``; the model's ``in_channels`` follows ``--grayscale`` and is no option).
"""

from __future__ import annotations

import dataclasses

from restorer.config import option
from restorer.data.config import StreamConfig
from restorer.data.degrade import parse_quality
from restorer.errors import UserError
from restorer.hardware import AUTO_BOOL, PRECISIONS, canonical_precision
from restorer.model import ModelConfig
from restorer.train.losses import LOSSES

EXAMPLES = """examples:
  # 2 CPU processes on this machine (real gloo DDP), a few minutes:
  ACCELERATE_USE_CPU=true accelerate launch --config_file launch/accelerate/cpu2.yaml \\
      launch/train.py --config launch/configs/cpu.yaml --shards data/shards --run-dir runs/cpu
  # all GPUs of one node, full-size model (precision, channels_last, compile: chosen per machine):
  accelerate launch --config_file launch/accelerate/1node.yaml --num_processes 8 \\
      launch/train.py --config launch/configs/gpu.yaml --run-dir runs/gpu
  # override anything from the YAML on the command line; an explicit flag beats "auto":
  accelerate launch ... launch/train.py --config launch/configs/gpu.yaml --lr 5e-4 --units 12 --compile false
  # continue an interrupted run (the default): same command again, or --resume auto
  # several nodes under SLURM: sbatch --nodes 4 launch/slurm/train.sbatch --config launch/configs/gpu.yaml
"""


_opt = option  # a trainer option: its default, help and check, in one place (restorer.config)


@dataclasses.dataclass
class TrainConfig:
    data: StreamConfig = dataclasses.field(
        default_factory=StreamConfig, metadata={"flatten": True, "rename": {"splits": "train_splits"}}
    )
    val_split: str = _opt("val", "split of --shards to validate on")
    val_shards: str | None = _opt(
        None,
        "validation shards as they are (a shards dir with one split, a folder of "
        "tars, a URL pattern); default: the --val-split split of --shards",
    )
    epoch_patches: int | None = _opt(
        None,
        "PATCHES per epoch, summed over all processes (default: every tile of the train splits x --patches-per-image)",
    )
    num_workers: int = _opt(4, "data loader workers per process")
    model: ModelConfig = dataclasses.field(
        default_factory=ModelConfig, metadata={"flatten": True, "hide": ("in_channels",)}
    )
    init_weights: str | None = _opt(
        None,
        "start from these weights (a model.safetensors, a run folder, or fast / quality) instead of a fresh "
        "initialisation: a fine-tune; the architecture must match, and a resumed checkpoint wins",
    )
    # optimisation
    max_steps: int = _opt(20000, "optimizer steps")
    batch_size: int = _opt(16, "patches per process per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    global_batch_size: int | None = _opt(
        None,
        "patches per optimizer step over all processes: --grad-accum is derived from it, --batch-size and the "
        "number of processes (their product must divide it), so a run resumed on another number of processes keeps it",
    )
    loss: str = _opt(
        "mse",
        "training loss (train/psnr is computed from the MSE whatever the loss)",
        choices=LOSSES,
    )
    lr: float = _opt(5e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = _opt(0.1, "final LR / peak LR of the cosine")
    warmup_steps: int = _opt(500, "linear LR warm-up steps before the cosine")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    clip_grad: float = _opt(1.0, "max gradient norm (0 = no clipping)")
    ema_decay: float = _opt(0.999, "EMA decay (0 = no EMA)")
    # speed: chosen on the machine at run time by restorer.hardware unless set explicitly
    mixed_precision: str = _opt(
        "auto",
        "auto: bf16 on GPUs that have it (else fp16), on CPUs only with native bf16 (else fp32); "
        "'no' is accepted for fp32",
        choices=PRECISIONS,
        parse=canonical_precision,
    )
    channels_last: str = _opt("auto", "auto: on GPUs, and on CPUs with bf16", choices=list(AUTO_BOOL), const="true")
    compile: str = _opt(
        "auto",
        "torch.compile the model; auto: on GPUs (falls back to eager if compiling fails)",
        choices=list(AUTO_BOOL),
        const="true",
    )
    max_nonfinite: int = _opt(20, "stop after this many non-finite losses in a row")
    # validation, logging, checkpoints
    val_every: int = _opt(1000, "validate every N optimizer steps")
    val_qualities: list[int] = _opt([10, 20, 30, 40], "JPEG qualities validated at")
    val_crop: int = _opt(256, "centre crop of each val image (px)")
    val_batch_size: int = _opt(8, "images per validation batch")
    panel_images: int = _opt(4, "images in the JPEG|restored|clean panel")
    log_every: int = _opt(50, "log training metrics every N steps")
    save_every: int = _opt(1000, "checkpoint every N steps")
    keep_checkpoints: int = _opt(3, "checkpoints kept (older ones are deleted)")
    run_dir: str = _opt("runs/train", "folder of the run: checkpoints, model.safetensors, metrics.jsonl")
    resume: str = _opt("auto", "auto, none, or a checkpoint directory")
    data_ledger: bool = _opt(
        False,
        "write RUN/ledger/rank-R.jsonl: the address (shard, sample, patch) of every patch each process took, per step",
    )
    tracker: str = _opt("wandb", "where metrics go besides metrics.jsonl", choices=("wandb", "none"))
    wandb_project: str = _opt("restorer", "W&B project")
    run_name: str | None = _opt(None, "W&B run name (default: W&B picks one)")
    # several processes and machines
    dist_timeout: float = _opt(
        600.0,
        "seconds a process waits for the others in a collective (and at the start) before it stops with "
        "one error line: bounds a lost or frozen process or machine, on GPUs (NCCL) and CPUs (gloo) alike "
        "(torch's default: 1800). Keep it above the longest time one process works alone (a checkpoint "
        "save, the final validation)",
    )

    def __post_init__(self) -> None:
        # YAML may say `channels_last: true`; the option is auto|true|false
        for name in ("channels_last", "compile"):
            value = getattr(self, name)
            if isinstance(value, bool):
                setattr(self, name, "true" if value else "false")
        self.model.in_channels = 1 if self.data.grayscale else 3

    def validate(self) -> None:
        """The config check (the stream's and the model's own checks included): one line per problem."""
        self.data.validate()
        try:
            self.model.resolved()
            for q in self.val_qualities:
                parse_quality(q)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        positive = (
            "batch_size",
            "grad_accum",
            "max_steps",
            "val_every",
            "save_every",
            "log_every",
            "keep_checkpoints",
            "max_nonfinite",
            "val_batch_size",
            "val_crop",
        )
        for name in positive + ("patch_size",):
            value = getattr(self.data if name == "patch_size" else self, name)
            if value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not self.data.splits:
            raise UserError("--train-splits needs at least one split")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise UserError(f"--global-batch-size must be >= 1, got {self.global_batch_size}")
        if self.epoch_patches is not None and self.epoch_patches < 1:
            raise UserError(f"--epoch-patches must be >= 1, got {self.epoch_patches}")
        if not self.dist_timeout > 0:
            raise UserError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
        if not (0.0 <= self.ema_decay < 1.0):
            raise UserError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")

    def model_config(self) -> ModelConfig:
        """The architecture, every size filled in (what model.json records)."""
        return self.model.resolved()

    def val_source(self) -> tuple[str, str | None]:
        """(shard spec, split) to validate on: ``--val-shards`` as is, else ``--val-split`` of ``--shards``."""
        return (self.val_shards, None) if self.val_shards else (self.data.shards, self.val_split)
