#!/usr/bin/env python
"""`make demo`: the whole pipeline on photos that ship with scikit-image, offline, on 2 CPU cores.

  1. shards   python -m shard_tools build  (the embedded default photos; small shards so that
              2 processes x 1 worker each get their own)
  2. train    accelerate launch, 2 CPU processes (gloo DDP), launch/configs/demo.yaml
  3. eval     restorer eval on the held-out photos at JPEG qualities 10, 20, 30, 40;
              the demo fails if the restored output does not beat JPEG at every quality
  4. compare  restorer compare: JPEG | restored | original panel of a held-out photo
  5. plot     restorer plot: loss and PSNR curves from metrics.jsonl

Re-running it resumes: finished shards and a finished training run are reused.

  .venv/bin/python launch/demo.py [--run-dir runs/demo] [--shards data/demo/shards] [--max-steps N]
                                  [any launch/train.py flag, e.g. --mixed-precision no]

Precision and memory format are chosen on the machine (``--mixed-precision auto``): bf16 +
channels_last where the CPU computes bf16 natively, fp32 elsewhere (emulated bf16 is 10-30x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from shard_tools.sources import DEFAULT_VAL, skimage_data_dir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # accelerate and restorer of this Python's environment
QUALITIES = ("10", "20", "30", "40")


def step(title: str, cmd: list[str], env: dict | None = None) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"demo: step '{title}' failed (exit {proc.returncode}); its output is above")
    print(f"=== {title}: done in {time.perf_counter() - t0:.0f} s", flush=True)


def held_out_photos(shards: Path) -> Path:
    """A folder beside the shards with the val split of the default set: never trained on."""
    photos = skimage_data_dir()
    heldout = shards.parent / "heldout"
    heldout.mkdir(parents=True, exist_ok=True)
    for name in DEFAULT_VAL:
        if not (heldout / name).exists():
            shutil.copyfile(photos / name, heldout / name)
    return heldout


def train_command(args: argparse.Namespace, train_flags: list[str]) -> list[str]:
    train = [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        "launch/accelerate/cpu2.yaml",
        "launch/train.py",
        "--config",
        "launch/configs/demo.yaml",
        "--shards",
        str(args.shards),
        "--run-dir",
        str(args.run_dir),
    ]
    if args.max_steps:
        train += ["--max-steps", str(args.max_steps)]
    return train + train_flags  # passed through to launch/train.py: they win over demo.yaml


def run_steps(args: argparse.Namespace, train_flags: list[str], heldout: Path) -> tuple[Path, Path, Path]:
    """Steps 1-5; (weights, eval json, comparison picture)."""
    step(
        "1/5 shards from the embedded default photos",
        [sys.executable, "-m", "shard_tools", "build", "--out", str(args.shards), "--max-samples", "2"],
    )
    step(
        "2/5 training: 2 CPU processes (DDP over gloo), precision chosen for this CPU",
        train_command(args, train_flags),
        {"ACCELERATE_USE_CPU": "true"},
    )
    weights = args.run_dir / "model.safetensors"
    eval_json = args.run_dir / "eval_heldout.json"
    restorer = str(BIN / "restorer")
    step(
        "3/5 eval on the held-out photos: JPEG vs restored",
        [restorer, "eval", "--weights", str(weights), "--images", str(heldout), "--quality", *QUALITIES]
        + ["--json", str(eval_json), "--no-progress"],
    )
    panel = args.run_dir / "compare_q10.png"
    step(
        "4/5 comparison picture",
        [restorer, "compare", str(heldout / DEFAULT_VAL[0]), "--weights", str(weights), "--quality", "10"]
        + ["-o", str(panel), "--overwrite"],
    )
    step("5/5 training curves", [restorer, "plot", str(args.run_dir)])
    return weights, eval_json, panel


def print_outputs(args: argparse.Namespace, minutes: float, weights: Path, eval_json: Path, panel: Path) -> None:
    wandb_runs = sorted((args.run_dir / "wandb").glob("offline-run-*"))
    print(f"\n=== demo finished in {minutes:.1f} min")
    print(f"run dir      {args.run_dir}/  (config.yaml, metrics.jsonl, checkpoints/, panels/)")
    print(f"weights      {weights}  (+ model.json)")
    print(f"eval         {eval_json}")
    print(f"picture      {panel}")
    print(f"curves       {args.run_dir / 'curves.png'}")
    if wandb_runs:
        print(f"W&B offline  {wandb_runs[-1]}\n             upload later: wandb sync {wandb_runs[-1]}")
    print("next steps:")
    print("  restore your own photos with the packaged models (trained on JPEG q5-95, double JPEG, 4:2:0 and 4:4:4;")
    print("  the demo model knows only q10-40 of 6 photos):")
    print("    .venv/bin/restorer restore photo.jpg            # -> photo.restored.png beside it ('fast' on a CPU)")
    print(
        "    .venv/bin/restorer restore photo.jpg --weights quality   # the bigger model: better, 1.85x slower on a CPU"
    )
    print(f"  train the CPU recipe on the shards the demo built ({args.shards}):")
    print("    ACCELERATE_USE_CPU=true .venv/bin/accelerate launch --config_file launch/accelerate/cpu2.yaml \\")
    print(f"        launch/train.py --config launch/configs/cpu.yaml --shards {args.shards} --run-dir runs/cpu")
    print("  real data: make shards ARGS='--bsds PATH/TO/BSR', then launch/configs/bsds_cpu.yaml (docs/training.md)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--shards", type=Path, default=Path("data/demo/shards"))
    parser.add_argument("--max-steps", type=int, default=None, help="override demo.yaml's training steps")
    args, train_flags = parser.parse_known_args(argv)
    t_start = time.perf_counter()
    weights, eval_json, panel = run_steps(args, train_flags, held_out_photos(args.shards))
    means = json.loads(eval_json.read_text())["mean"]
    gains = {m["quality"]: m["gain_psnr_rgb"] for m in means}
    print_outputs(args, (time.perf_counter() - t_start) / 60, weights, eval_json, panel)
    print(
        "held-out photos, RGB PSNR (no border crop): "
        + ", ".join(
            f"q{m['quality']} JPEG {m['jpeg_psnr_rgb']:.2f} -> {m['restored_psnr_rgb']:.2f} dB "
            f"({m['gain_psnr_rgb']:+.2f})"
            for m in means
        )
    )
    losing = [q for q, g in gains.items() if not g > 0]
    if losing:
        print(f"demo: restored output does not beat JPEG at quality {losing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
