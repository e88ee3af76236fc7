#!/usr/bin/env python
"""Choose the architecture and loss by measurement: every candidate trains for the same wall-clock
budget on the same hardware and data, then is evaluated the same way on the BSDS500 test split.

For each candidate: a short probe run measures its training speed (patches/s) in this exact setup
(compile time left out); the real run is then given the number of optimizer steps that fills the
budget (so its warmup and cosine schedule complete). Every candidate is one quality-conditioned
model for qualities 10-40, trained on BSDS500 train+val with the recipe's augmentation.

Evaluation: ``restorer eval`` of the final EMA weights on the WHOLE images of the BSDS500 test split
(200 by default, ``--eval-images`` for fewer) at q10 and q40, RGB PSNR, 8-bit, no border crop, the
model's raw output (``--no-projection``: the comparison is of the networks). Printed with
parameters, MFLOP per pixel and training patches/s.

examples:
  # CPU: 2 processes (gloo DDP), 64 px patches, batch 2 x 8; ~45 min on 2 cores with --minutes 3
  .venv/bin/python bench/model_choice.py --shards data/bsr --minutes 3
  # one CUDA GPU: 128 px patches, batch 64, precision/compile auto; ~9 min with --minutes 1.25
  python bench/model_choice.py --shards data/bsr --gpu --minutes 1.25

The line ``best: NAME gain_q10: +X.XX dB (vs default: +Y.YY dB)`` names the winner; the last line
is ``model_choice_best_gain_q10_db: +X.XX``.
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

import benchcli

REPO = Path(__file__).resolve().parents[1]

# name, extra train.py flags; "default" is today's GPU default preset, "tiny" today's CPU one
CANDIDATES = [
    ("default mse", ["--preset", "default"]),
    ("tiny mse", ["--preset", "tiny"]),
    ("unet-tiny mse", ["--preset", "unet-tiny"]),
    ("unet mse", ["--preset", "unet"]),
    ("unet-tiny l1", ["--preset", "unet-tiny", "--loss", "l1"]),
    ("unet-tiny charbonnier", ["--preset", "unet-tiny", "--loss", "charbonnier"]),
]
COMMON = [
    "--quality",
    "10-40",
    "--condition-on-quality",
    "true",
    "--lr",
    "1e-3",
    "--ema-decay",
    "0.995",
    "--tracker",
    "none",
    "--val-qualities",
    "10",
    "40",
    "--resume",
    "none",
    "--keep-checkpoints",
    "1",
    "--mixed-precision",
    "auto",
    "--channels-last",
    "auto",
    "--compile",
    "auto",
]
SETUP = {  # per hardware: patch size, batch per process, processes, loader workers
    "cpu": {"patch": 64, "batch": 8, "procs": 2, "workers": 1},
    "gpu": {"patch": 128, "batch": 64, "procs": 1, "workers": 12},
}


def launch(args: list[str], log: Path, hw: str) -> float:
    setup = SETUP[hw]
    if hw == "cpu":
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "launch/accelerate/cpu2.yaml"),
            str(REPO / "launch/train.py"),
            *args,
        ]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(setup["procs"]),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(REPO / "launch/train.py"),
            *args,
        ]
        env = dict(os.environ)
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


def evaluate(weights: Path, images: Path, out: Path, limit: int | None, device: str) -> dict[int, tuple[float, float]]:
    """{quality: (JPEG PSNR, restored PSNR)} from ``restorer eval`` on the test split."""
    cmd = [
        sys.executable,
        "-m",
        "restorer.cli",
        "eval",
        "--weights",
        str(weights),
        "--images",
        str(images),
        "--split",
        "test",
        "--quality",
        "10",
        "40",
        "--metrics",
        "psnr",
        "--no-projection",
        "--no-progress",
        "--device",
        device,
        "--json",
        str(out),
    ] + (["--limit", str(limit)] if limit else [])
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    means = json.loads(out.read_text())["mean"]
    return {int(r["quality"]): (r["jpeg_psnr_rgb"], r["restored_psnr_rgb"]) for r in means}


def data_flags(shards: str, setup: dict, hw: str) -> list[str]:
    """The data options every candidate trains with."""
    data = ["--shards", str(Path(shards).resolve()), "--train-splits", "train", "val", "--val-split", "test"]
    data += ["--patch-size", str(setup["patch"]), "--batch-size", str(setup["batch"])]
    data += ["--num-workers", str(setup["workers"]), "--patches-per-image", "8", "--flip-p", "0.5", "--val-crop", "128"]
    if hw == "gpu":
        data += ["--resampled", "true"]
    return data


def schedule(run_dir: Path, steps: int, warmup: int, log_every: int, val_every: int, save_every: int) -> list[str]:
    return [
        *("--run-dir", str(run_dir), "--max-steps", str(steps), "--warmup-steps", str(warmup)),
        *("--log-every", str(log_every), "--val-every", str(val_every), "--save-every", str(save_every)),
    ]


def run_candidate(name: str, flags: list[str], args: argparse.Namespace, data: list[str], hw: str) -> dict:
    """A short probe for the candidate's speed, then a run of the steps that fill the budget, then eval."""
    from restorer.model import ModelConfig, build_model, count_parameters, flops_per_pixel

    setup = SETUP[hw]
    patches_per_step = setup["batch"] * setup["procs"]
    slug = name.replace(" ", "-")
    probe_dir, run_dir = args.out / f"{slug}-probe", args.out / slug
    shutil.rmtree(probe_dir, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    n = args.probe_steps
    probe = schedule(probe_dir, n, 5, n // 4, 10 * n, 10 * n)
    launch([*data, *COMMON, *flags, *probe], args.out / f"{slug}-probe.log", hw)
    speeds = [r["perf/patches_per_s"] for r in rows(probe_dir) if "perf/patches_per_s" in r]
    patches_per_s = max(speeds[1:] or speeds)  # the first window includes start-up and compiling
    steps = max(50, int(patches_per_s * args.minutes * 60 / patches_per_step))
    print(f"{name}: {patches_per_s:.1f} patches/s -> {steps} steps for {args.minutes:g} min", flush=True)
    run = schedule(run_dir, steps, max(10, steps // 20), max(1, steps // 20), 10 * steps, steps)
    seconds = launch([*data, *COMMON, *flags, *run], args.out / f"{slug}.log", hw)
    scores = evaluate(
        run_dir / "model.safetensors",
        Path(args.images),
        args.out / f"{slug}-eval.json",
        args.eval_images,
        "cuda" if hw == "gpu" else "cpu",
    )
    info = json.loads((run_dir / "model.json").read_text())["model"]
    model = build_model(ModelConfig(**info))
    return {
        "name": name,
        "params": count_parameters(model),
        "mflop_px": flops_per_pixel(model) / 1e6,
        "patches_per_s": patches_per_s,
        "steps": steps,
        "seconds": seconds,
        "jpeg_q10": scores[10][0],
        "psnr_q10": scores[10][1],
        "gain_q10": scores[10][1] - scores[10][0],
        "jpeg_q40": scores[40][0],
        "psnr_q40": scores[40][1],
        "gain_q40": scores[40][1] - scores[40][0],
    }


def print_results(results: list[dict], args: argparse.Namespace, hw: str) -> None:
    setup = SETUP[hw]
    n_images = args.eval_images or 200
    print(
        f"\n{args.minutes:g} min per candidate on {'one GPU' if hw == 'gpu' else '2 CPU processes'}, "
        f"{setup['patch']} px patches, batch {setup['procs']}x{setup['batch']}, q10-40 conditioned, precision/compile "
        f"auto; eval: BSDS500 test, {n_images} whole images, RGB PSNR, no border crop, raw model output"
    )
    print(
        f"{'candidate':<22} {'params':>9} {'MFLOP/px':>8} {'patch/s':>8} {'steps':>6} "
        f"{'q10 dB':>7} {'gain':>6} {'q40 dB':>7} {'gain':>6}"
    )
    for r in results:
        print(
            f"{r['name']:<22} {r['params']:>9,} {r['mflop_px']:>8.2f} {r['patches_per_s']:>8.1f} {r['steps']:>6} "
            f"{r['psnr_q10']:>7.2f} {r['gain_q10']:>+6.2f} {r['psnr_q40']:>7.2f} {r['gain_q40']:>+6.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = benchcli.parser(__doc__)
    parser.add_argument("--shards", default="data/bsr", help="BSDS500 shards with train, val and test splits")
    parser.add_argument(
        "--images",
        default=str(REPO.parent / "shared/datasets/BSR"),
        help="BSR root (BSDS500 test images for the evaluation)",
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget per candidate")
    parser.add_argument("--gpu", action="store_true", help="one CUDA GPU instead of 2 CPU processes")
    parser.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--probe-steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/model_choice"))
    parser.add_argument("--only", nargs="*", help="names (prefixes) of candidates to run")
    args = parser.parse_args(argv)
    hw = "gpu" if args.gpu else "cpu"
    data = data_flags(args.shards, SETUP[hw], hw)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, flags in CANDIDATES:
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        results.append(run_candidate(name, flags, args, data, hw))
        print(json.dumps(results[-1]), flush=True)
    (args.out / f"results-{hw}.json").write_text(json.dumps(results, indent=2) + "\n")
    print_results(results, args, hw)
    best = max(results, key=lambda r: r["gain_q10"])
    base = next((r for r in results if r["name"] == "default mse"), None)
    print(
        f"best: {best['name']} gain_q10: {best['gain_q10']:+.2f} dB"
        + (f" (vs default: {base['gain_q10']:+.2f} dB)" if base else "")
    )
    print(f"model_choice_best_gain_q10_db: {best['gain_q10']:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
