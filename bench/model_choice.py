#!/usr/bin/env python
"""Choose the default preset's width C and depth N by measurement: every candidate trains for the
same wall-clock budget on the same 2 CPU processes and data, then is validated the same way.

For each candidate: a short probe run measures its training speed (patches/s) in this exact setup;
the real run is then given the number of optimizer steps that fills the budget (so its warmup and
cosine schedule complete), and its final validation is read from ``metrics.jsonl``. The seed
preset (the original network) runs with its original learning rate, the residual presets with the
CPU recipe's.

  .venv/bin/python bench/model_choice.py --shards data/bsr --minutes 4      # ~25 min on 2 cores

Validation: 256 px centre crops of the BSDS500 test split (``--val-split test``), RGB PSNR, no
border crop, at quality 10 (what every candidate trains on). The last line is
``best_preset: NAME (C=.., N=..) gain_q10: +X.XX dB``.
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

REPO = Path(__file__).resolve().parents[1]

# name, extra train.py flags
CANDIDATES = [
    ("seed", ["--preset", "seed", "--lr", "5e-4"]),
    ("tiny (C=32, N=2)", ["--preset", "tiny"]),
    ("small (C=64, N=4)", ["--preset", "small"]),
    ("C=64, N=8", ["--preset", "default", "--channels", "64", "--units", "8"]),
]
COMMON = ["--quality", "10", "--patch-size", "64", "--batch-size", "8", "--patches-per-image", "8",
          "--mixed-precision", "bf16", "--channels-last", "--lr", "1e-3", "--num-workers", "1",
          "--ema-decay", "0.995", "--tracker", "none", "--val-qualities", "10", "--val-crop", "256",
          "--resume", "none", "--keep-checkpoints", "1"]


def launch(args: list[str], log: Path) -> float:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch/accelerate/cpu2.yaml"), str(REPO / "launch/train.py"), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"error: training failed, see {log}")
    return time.perf_counter() - t0


def rows(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="data/bsr", help="shards with train, val and test splits")
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget per candidate")
    parser.add_argument("--probe-steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/model_choice"))
    parser.add_argument("--only", nargs="*", help="names (prefixes) of candidates to run")
    args = parser.parse_args()
    data = ["--shards", str(Path(args.shards).resolve()), "--train-splits", "train", "val", "--val-split", "test"]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, flags in CANDIDATES:
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        slug = name.split(" ")[0].replace("=", "").replace(",", "")
        probe_dir, run_dir = args.out / f"{slug}-probe", args.out / slug
        shutil.rmtree(probe_dir, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        n = args.probe_steps
        launch([*data, *COMMON, *flags, "--run-dir", str(probe_dir), "--max-steps", str(n), "--warmup-steps", "5",
                "--log-every", str(n // 3), "--val-every", str(10 * n), "--save-every", str(10 * n),
                "--val-split", "val", "--val-crop", "64"], args.out / f"{slug}-probe.log")
        speeds = [r["perf/patches_per_s"] for r in rows(probe_dir) if "perf/patches_per_s" in r]
        patches_per_s = max(speeds[1:] or speeds)  # the first window includes start-up
        steps = max(50, int(patches_per_s * args.minutes * 60 / 16))  # 2 processes x batch 8
        print(f"{name}: {patches_per_s:.1f} patches/s -> {steps} steps for {args.minutes} min", flush=True)
        seconds = launch([*data, *COMMON, *flags, "--run-dir", str(run_dir), "--max-steps", str(steps),
                          "--warmup-steps", str(max(10, steps // 20)), "--log-every", str(max(1, steps // 20)),
                          "--val-every", str(10 * steps), "--save-every", str(steps)], args.out / f"{slug}.log")
        final = [r for r in rows(run_dir) if "val/psnr_q10" in r][-1]
        info = json.loads((run_dir / "model.json").read_text())["model"]
        from restorer.model import build_model, count_parameters, flops_per_pixel, ModelConfig

        model = build_model(ModelConfig(**info))
        results.append({"name": name, "params": count_parameters(model), "mflop_px": flops_per_pixel(model) / 1e6,
                        "patches_per_s": patches_per_s, "steps": steps, "seconds": seconds,
                        "jpeg": final["val/jpeg_psnr_q10"], "psnr": final["val/psnr_q10"],
                        "gain": final["val/gain_q10"], "ssim": final.get("val/ssim_q10", float("nan"))})
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{args.minutes:g} min per candidate, 2 CPU processes, bf16 + channels_last, 64 px patches, "
          f"batch 2x8, quality 10; val: BSDS500 test, 256 px centre crops, RGB PSNR, no border crop")
    print(f"{'candidate':<20} {'params':>8} {'MFLOP/px':>8} {'patch/s':>8} {'steps':>6} "
          f"{'JPEG dB':>8} {'restored':>8} {'gain':>7} {'SSIM':>6}")
    for r in results:
        print(f"{r['name']:<20} {r['params']:>8,} {r['mflop_px']:>8.2f} {r['patches_per_s']:>8.1f} {r['steps']:>6} "
              f"{r['jpeg']:>8.2f} {r['psnr']:>8.2f} {r['gain']:>+7.2f} {r['ssim']:>6.4f}")
    best = max(results, key=lambda r: r["gain"])
    print(f"best_preset: {best['name']} gain_q10: {best['gain']:+.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
