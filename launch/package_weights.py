#!/usr/bin/env python
"""Package a finished release run as a model that ships: restorer/weights/NAME.safetensors + NAME.json.

The JSON is the model card: the run's model.json (architecture and training facts), how it was
trained (recipe, command, data, degradations, hardware, wall time, code commit; read from the run's
config.yaml / run_info.json / the shards' manifest unless given), the BSDS500 test table made by
launch/model_card.py, and per-image checks (the first 3 test images at q10/50/90, fp32 + projection,
what `restore` does) that tests/test_weights.py re-measures. Both files are written atomically; the
run itself is only read.

  .venv/bin/python launch/model_card.py --weights runs/release_quality/model.safetensors \\
      --json runs/release_quality/card.json
  .venv/bin/python launch/package_weights.py --run runs/release_quality --name quality \\
      --recipe launch/configs/release_quality.yaml
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import yaml

from restorer import weights as packaged
from restorer.data.degrade import decoded_jpeg
from restorer.errors import UserError
from restorer.fsutil import atomic_write, atomic_write_text
from restorer.imageio import open_image
from restorer.infer.engine import load_restorers
from restorer.infer.evaluate import image_metrics, list_images, resolve_images_dir
from restorer.infer.projection import project
from restorer.modelfile import read_meta

REPO = Path(__file__).resolve().parents[1]
CHECK_IMAGES, CHECK_QUALITIES = 3, (10, 50, 90)
CPU2_COMMAND = (
    "python -m shard_tools build --bsds ../shared/datasets/BSR --out {shards} --max-samples 16 && "
    "ACCELERATE_USE_CPU=true accelerate launch --config_file launch/accelerate/cpu2.yaml "
    "launch/train.py --config {recipe}"
)
GPU_COMMAND = "accelerate launch launch/train.py --config {recipe}"


def describe_data(cfg: dict) -> str:
    """'shards data/bsr: train (200) + val (100) images; the test split never trained on'."""
    manifest = Path(cfg["shards"]) / "manifest.json"
    splits = cfg["train_splits"]
    try:
        counts = json.loads(manifest.read_text())["splits"]
        parts = [f"{s} ({counts[s]['samples']})" for s in splits]
    except (OSError, KeyError, ValueError):
        parts = list(splits)
    return (
        f"shards {cfg['shards']}: {' + '.join(parts)} images; validated on '{cfg.get('val_split')}', never trained on"
    )


def describe_degradations(cfg: dict) -> str:
    p = float(cfg.get("double_jpeg_p") or 0)
    chain = float(cfg.get("chain_p") or 0)
    parts = []
    if p:
        parts.append(
            f"{100 * p:.0f}% of patches compressed twice (first at another quality of the range; half of "
            f"those with the second 8x8 grid shifted by 0-7 px), told the last quality"
        )
    if chain:
        parts.append(
            f"{100 * chain:.0f}% through a real-world chain of 2-3 saves ({100 * float(cfg['chain_three_p']):.0f}% "
            f"three), each at its own quality of the range and chroma; one resize between two saves in "
            f"{100 * float(cfg['chain_resize_p']):.0f}% of the chains (scale {cfg['chain_scales']}, "
            f"{cfg['chain_kernels'].replace(',', ' / ')}), each gap's 8x8 grid shifted by a 1-7 px crop "
            f"with p={cfg['chain_shift_p']}; told "
            + (
                "the quality restore --quality auto tells for it (an earlier save whose lattice survives, no resize "
                "after it, with 1.5x the last save's steps; else the last save's quality)"
                if cfg.get("chain_label") == "restore"
                else "the chain's effective quality (the single save of equal PSNR)"
            )
        )
    if not parts:
        parts.append("single compression only")
    single = 100 * (1 - p - (1 - p) * chain)
    return (
        f"JPEG quality drawn per patch over {cfg['quality']} (Pillow); {'; '.join(parts)}; the other "
        f"{single:.0f}% single saves; chroma {' or '.join(str(cfg.get('chroma_subsampling', '4:2:0')).split(','))} "
        f"per save; " + ("the model is told the quality" if cfg.get("condition_on_quality") else "blind")
    )


def describe_lineage(cfg: dict) -> str | None:
    """'fine-tuned from launch/init/quality-v1.safetensors (release 1 ...)', or None for a fresh start."""
    init = cfg.get("init_weights")
    if not init:
        return None
    try:
        before = read_meta(REPO / init if not Path(init).is_absolute() else init)
        steps, recipe = before.get("facts", {}).get("steps"), before.get("training", {}).get("recipe")
        return f"fine-tuned from {init} ({steps} steps" + (f" by {recipe}" if recipe else "") + ")"
    except Exception:  # noqa: BLE001 (the lineage line is informative; the path itself is recorded)
        return f"fine-tuned from {init}"


def describe_augmentation(cfg: dict) -> str:
    scales = "-".join(str(s) for s in (max(cfg["rescale_scales"]), min(cfg["rescale_scales"])))
    return (
        f"{cfg['patch_size']} px patches, {cfg['patches_per_image']} per photo; rescale p={cfg['rescale_p']} "
        f"({scales}, bicubic), rotate p={cfg['rotate_p']}, flip p={cfg['flip_p']}"
    )


def describe_hardware(info: dict) -> str:
    kind = "GPU" if str(info.get("device", "")).startswith("cuda") else "CPU"
    world = int(info.get("world_size", 1))
    extra = " (gloo DDP), 1 thread each" if kind == "CPU" and world > 1 else ""
    layout = " + channels_last" if info.get("channels_last") else ""
    where = f" on {info['device_name']}" if info.get("device_name") else ""
    mp = info.get("mixed_precision")
    precision = "fp32" if mp in (None, "no") else f"{mp} mixed precision"
    return (
        f"{world} {kind} process{'es' if world > 1 else ''}{extra}{where}, {precision}"
        f"{layout} ({info.get('mixed_precision_reason', '')})"
    )


def per_image_checks(weights: Path, bsr: Path) -> dict:
    """PSNR of the first test images at a few qualities, the way `restore` works (fp32 + projection)."""
    restorers, errors = load_restorers([str(weights)], torch.device("cpu"), precision="fp32")
    if errors:
        sys.exit("error: " + "; ".join(errors))
    rows = []
    for path in list_images(resolve_images_dir(bsr, "test"))[:CHECK_IMAGES]:
        ref = open_image(path).pixels
        for q in CHECK_QUALITIES:
            jpeg, data = decoded_jpeg(ref, q)
            out = project(restorers[0].restore(jpeg, q), data)
            rows.append(
                {
                    "image": path.name,
                    "quality": q,
                    "jpeg_psnr": round(image_metrics(jpeg, ref, which=("psnr",))["psnr_rgb"], 4),
                    "psnr": round(image_metrics(out, ref, which=("psnr",))["psnr_rgb"], 4),
                }
            )
    return {
        "about": f"per-image RGB PSNR of the first {CHECK_IMAGES} BSDS500 test images, Pillow 4:2:0 JPEG, "
        "model in fp32 + projection (what restore does); tests/test_weights.py re-measures them "
        "within 0.05 dB",
        "rows": rows,
    }


def build_parser(names: tuple[str, ...] | list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run dir (model.safetensors, model.json)")
    parser.add_argument("--name", required=True, choices=names)
    parser.add_argument("--recipe", required=True, help="the launch/configs/release_*.yaml that trained it")
    parser.add_argument(
        "--card", type=Path, default=None, help="launch/model_card.py --json output (default RUN/card.json)"
    )
    parser.add_argument("--bsr", type=Path, default=REPO.parent / "shared/datasets/BSR", help="BSR root for the checks")
    parser.add_argument("--command", default=None, help="the documented training command (default: from the run)")
    parser.add_argument("--data", default=None, help="what it was trained on (default: from the shards' manifest)")
    parser.add_argument("--hardware", default=None, help="default: from run_info.json")
    parser.add_argument("--wall-time-min", type=float, default=None, help="default: run_info.json wall_seconds")
    parser.add_argument("--code", default=None, help="the commit it was trained at (default: run_info.json's)")
    parser.add_argument("--out", type=Path, default=REPO / "restorer/weights", help="folder to write NAME.* into")
    return parser


def read_run(args: argparse.Namespace) -> tuple[dict, dict, dict, dict]:
    """(model.json, config.yaml, run_info.json, the card) of a finished run; exits with one line if it is not."""
    try:
        meta = json.loads((args.run / "model.json").read_text())
        cfg = yaml.safe_load((args.run / "config.yaml").read_text())
        info = json.loads((args.run / "run_info.json").read_text())
        card = json.loads((args.card or args.run / "card.json").read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"error: {args.run}: not a finished run with a card ({exc})")
    return meta, cfg, info, card


def training_facts(args: argparse.Namespace, meta: dict, cfg: dict, info: dict) -> dict:
    """The card's "training" section: how the run was made, from the run's files unless given."""
    wall = args.wall_time_min or (info["wall_seconds"] / 60 if info.get("wall_seconds") else None)
    if wall is None:
        sys.exit(f"error: {args.run}/run_info.json has no wall_seconds: give --wall-time-min")
    world = int(info.get("world_size", 1))
    cpu = not str(info.get("device", "")).startswith("cuda")
    steps = int(meta["facts"]["steps"])
    return {
        "recipe": args.recipe,
        "command": args.command
        or (CPU2_COMMAND if cpu else GPU_COMMAND).format(shards=cfg["shards"], recipe=args.recipe),
        "data": args.data or describe_data(cfg),
        "degradations": describe_degradations(cfg),
        "augmentation": describe_augmentation(cfg),
        "steps": steps,
        "patches": steps * int(cfg["batch_size"]) * int(cfg.get("grad_accum", 1)) * world,
        "hardware": args.hardware or describe_hardware(info),
        "wall_time_min": round(wall, 1),
        "parameters": info.get("parameters"),
        "loss": cfg.get("loss", "mse"),
        "ema_decay": cfg.get("ema_decay"),
        "code": f"restorer at commit {args.code or info.get('code') or 'unknown'}",
        "lineage": describe_lineage(cfg) or "trained from scratch",
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser(packaged.NAMES).parse_args(argv)
    meta, cfg, info, card = read_run(args)
    weights = args.run / "model.safetensors"
    doc = {**meta, "name": args.name, "training": training_facts(args, meta, cfg, info), "card": card}
    try:
        doc["checks"] = per_image_checks(weights, args.bsr)  # before anything is written
        atomic_write(args.out / f"{args.name}.safetensors", lambda tmp: shutil.copyfile(weights, tmp))
        atomic_write_text(args.out / f"{args.name}.json", json.dumps(doc, indent=1) + "\n")
    except UserError as exc:
        sys.exit(f"error: {exc}")
    size = (args.out / f"{args.name}.safetensors").stat().st_size
    print(f"packaged {args.name}: {args.out / args.name}.safetensors ({size / 2**20:.2f} MB) + .json")
    print(f"weights_mb: {size / 2**20:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
