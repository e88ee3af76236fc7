#!/usr/bin/env python
"""Training-step throughput (forward + backward + AdamW step), patches/s, side by side.

CPU, for the ``default`` model and the CPU recipe's model (launch/configs/cpu.yaml): fp32, bf16
autocast, channels_last, bf16 + channels_last (timed round-robin, best of 3 rounds, so that a busy
shared machine slows all variants alike), and torch.compile for the CPU recipe (fp32, in a child
process with a time limit; reported as failed/too slow when it does not finish) -- with each
variant's ratio to fp32. Synthetic data, so this is the model's speed, not the loader's (bench/loader.py).

CUDA (only when a GPU is present): the default model in bf16 + channels_last, patches/s and model
FLOP utilisation (achieved training FLOP/s over the GPU's dense bf16 peak).

The process uses torch's thread count as set by OMP_NUM_THREADS (never raised). The last line is
``bf16_channels_last_speedup: <x>x`` for the CPU recipe's model.

examples:
  python bench/train_step.py                      # ~2.5 min on 2 cores
  python bench/train_step.py --patch-size 128 --batch-size 16 --seconds 5 --no-compile
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import benchcli

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
import yaml

from restorer.model import ModelConfig, build_model, flops_per_pixel

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "fp32": (False, False),
    "bf16": (True, False),
    "channels_last": (False, True),
    "bf16_channels_last": (True, True),
}
# dense bf16 tensor-core peak, FLOP/s (vendor datasheets, SXM parts)
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def cpu_recipe() -> ModelConfig:
    cfg = yaml.safe_load((REPO / "launch" / "configs" / "cpu.yaml").read_text())
    return ModelConfig(
        preset=cfg.get("preset", "default"),
        channels=cfg.get("channels"),
        units=cfg.get("units"),
        condition_on_quality=bool(cfg.get("condition_on_quality", False)),
    ).resolved()


def make_step(
    model_cfg: ModelConfig,
    *,
    bf16: bool,
    channels_last: bool,
    compile: bool,
    patch: int,
    batch: int,
    device: str = "cpu",
):
    """A closure running one training step of a fresh model on a fixed synthetic batch."""
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)  # type: ignore[call-overload]  # accepted; torch's overloads omit it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    net = torch.compile(model) if compile else model
    clean = torch.rand(batch, model_cfg.in_channels, patch, patch, device=device)
    noisy = (clean + 0.05 * torch.randn_like(clean)).clamp(0, 1).contiguous(memory_format=fmt)
    clean = clean.contiguous(memory_format=fmt)
    q = torch.full((batch,), 20, device=device) if model_cfg.condition_on_quality else None

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            out = net(noisy, q)
        F.mse_loss(out.float(), clean).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, batch: int, seconds: float, device: str = "cpu", min_steps: int = 3) -> float:
    """patches/s of ``step`` over at least ``seconds`` (and ``min_steps`` steps)."""

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    n, t0 = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    sync()
    return n * batch / (time.perf_counter() - t0)


def measure(
    model_cfg: ModelConfig,
    *,
    bf16: bool,
    channels_last: bool,
    compile: bool,
    patch: int,
    batch: int,
    seconds: float,
    warmup: int,
    device: str = "cpu",
) -> float:
    step = make_step(
        model_cfg, bf16=bf16, channels_last=channels_last, compile=compile, patch=patch, batch=batch, device=device
    )
    for _ in range(warmup):
        step()
    return timed(step, batch, seconds, device)


def measure_variants(model_cfg: ModelConfig, args) -> dict[str, float]:
    """All CPU variants of one model, timed round-robin (``--rounds`` rounds, best round kept), so
    that load from other processes on a shared machine hits every variant alike."""
    steps = {
        v: make_step(model_cfg, bf16=b, channels_last=c, compile=False, patch=args.patch_size, batch=args.batch_size)
        for v, (b, c) in VARIANTS.items()
    }
    for step in steps.values():
        step()  # warmup (first-call allocations, oneDNN kernel selection)
    best = dict.fromkeys(steps, 0.0)
    for _ in range(args.rounds):
        for variant, step in steps.items():
            best[variant] = max(best[variant], timed(step, args.batch_size, args.seconds / args.rounds, min_steps=1))
    return best


def compile_in_child(model_cfg: ModelConfig, args) -> tuple[float | None, str]:
    """torch.compile in a child process, so a slow or broken compiler cannot stall the benchmark."""
    cmd = [
        sys.executable,
        __file__,
        "--child-compile",
        json.dumps(model_cfg.__dict__),
        "--patch-size",
        str(args.patch_size),
        "--batch-size",
        str(args.batch_size),
        "--seconds",
        str(args.seconds),
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout)
    except subprocess.TimeoutExpired:
        return None, f"not done within {args.compile_timeout:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"failed: {last[:120]}"
    return json.loads(lines[-1])["patches_per_s"], f"incl. compile: {time.perf_counter() - t0:.0f} s total"


def gpu_part(args) -> None:
    name = torch.cuda.get_device_name(0)
    cfg = ModelConfig(preset="default").resolved()
    fpp = flops_per_pixel(build_model(cfg))
    patch, batch = 128, args.gpu_batch_size
    rate = measure(
        cfg,
        bf16=True,
        channels_last=True,
        compile=False,
        patch=patch,
        batch=batch,
        seconds=args.seconds,
        warmup=10,
        device="cuda",
    )
    achieved = rate * 3 * fpp * patch * patch
    peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
    mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a (peak of this GPU unknown)"
    print(
        f"\nGPU {name}: default model, bf16 + channels_last, batch {batch} x {patch} px: "
        f"{rate:,.0f} patches/s, {achieved / 1e12:.1f} TFLOP/s, MFU {mfu}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = benchcli.parser(__doc__)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per variant (over all rounds)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds; the best is kept")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-timeout", type=float, default=90.0)
    parser.add_argument("--gpu-batch-size", type=int, default=64)
    parser.add_argument("--child-compile", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_compile:
        cfg = ModelConfig(**json.loads(args.child_compile))
        rate = measure(
            cfg,
            bf16=False,
            channels_last=False,
            compile=True,
            patch=args.patch_size,
            batch=args.batch_size,
            seconds=args.seconds,
            warmup=3,
        )
        print(json.dumps({"patches_per_s": rate}))
        return 0

    models = {"default": ModelConfig(preset="default").resolved(), "cpu-recipe": cpu_recipe()}
    print(
        f"CPU training step, batch {args.batch_size} x {args.patch_size} px, {torch.get_num_threads()} thread(s) "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), torch {torch.__version__}"
    )
    results: dict[str, dict[str, float | None]] = {}
    notes: dict[str, str] = {}
    for label, cfg in models.items():
        results[label] = {**measure_variants(cfg, args)}
        if label == "cpu-recipe" and not args.no_compile:  # compile costs ~30 s (C=64,N=4) to 70 s (default) here
            results[label]["compile"], notes[label] = compile_in_child(cfg, args)
        else:
            results[label]["compile"] = None
            notes[label] = "not run" if label == "cpu-recipe" else "not run for this model (slow to compile on CPU)"

    header = ["model", "C", "N", "GFLOPs/patch(train)"] + [f"{v} p/s (x)" for v in results["default"]]
    print("  ".join(header))
    for label, cfg in models.items():
        fpp = flops_per_pixel(build_model(cfg))
        base = results[label]["fp32"] or float("nan")
        cells = [label, str(cfg.channels), str(cfg.units), f"{3 * fpp * args.patch_size**2 / 1e9:.2f}"]
        for value in results[label].values():
            cells.append("n/a" if value is None else f"{value:.1f} ({value / base:.2f}x)")
        print("  ".join(cells) + (f"   [compile {notes[label]}]" if label in notes else ""))
        print(f"  {label} fp32 achieved {base * 3 * fpp * args.patch_size**2 / 1e9:.1f} GFLOP/s")

    if torch.cuda.is_available():
        gpu_part(args)
    else:
        print("\nGPU: none here (CUDA not available), GPU part skipped")
    recipe = results["cpu-recipe"]
    fast, fp32 = recipe["bf16_channels_last"], recipe["fp32"]
    print(f"bf16_channels_last_speedup: {fast / fp32:.2f}x" if fast and fp32 else "bf16_channels_last_speedup: nan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
