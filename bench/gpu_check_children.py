#!/usr/bin/env python
"""The child processes of bench/gpu_check.py: one measuring stage in its own process.

Each stage that measures runs here, in its own process with its own time cap (so an OOM, a
compiler crash or a hang ends one stage only), and prints one JSON record per line that
gpu_check.py reads back (its SPEC_JSON is what gpu_check.py's stage_NAME builds). Also the
process plumbing both sides use. Run by hand only to debug one stage.

examples:
  python bench/gpu_check_children.py model '{"device": "cpu", "compile": false, "presets": ["tiny"],
      "condition_on_quality": true, "bf16": false, "channels_last": false, "patch": 48, "batch": 4,
      "seconds": 2}'
  python bench/gpu_check.py --tiny        # how they are meant to run: every stage, side by side

The last line is ``gpu_check_child_records: <n>`` (the JSON records printed; gpu_check.py reads
only the lines that start with ``{``).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(REPO), str(BENCH)):  # restorer, and bench/train_step.py as `train_step`
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchcli import parser  # noqa: E402
from restorer.errors import first_line  # noqa: E402

# ------------------------------------------------------------------------------------ processes


def run_child(cmd: list[str], cap: float, log: Path, env: dict | None = None) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group with stdout to ``log``.out and stderr to ``log``.err;
    after ``cap`` seconds the group gets SIGTERM, 20 s later SIGKILL. Returns (exit code or None
    when it was stopped, stdout text -- complete up to the stop)."""
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=REPO, env=env, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            code = None
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)  # the group this call started (launcher, ranks, loader workers)
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
    return code, out.read_text(errors="replace")


def records(stdout: str) -> list[dict]:
    """The JSON records a child printed (one per line, each starting with '{')."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def why_failed(log: Path, code: int | None, cap: float) -> str:
    if code is None:
        return f"stopped after its {cap:.0f} s cap (log {log.with_suffix('.err')})"
    lines = [ln.strip() for ln in log.with_suffix(".err").read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    last = (errors or lines or [f"exit status {code}"])[-1]
    return f"{last[:160]} (exit {code}; log {log.with_suffix('.err')})"


EMITTED = [0]  # records printed by this process


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
    EMITTED[0] += 1


def child_env() -> dict:
    """Children find the project first (this worktree), like `python -m` from the repo root."""
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ---------------------------------------------------------------------------- child: model step


def child_model(spec: dict) -> None:
    """One record per (preset, variant): patches/s, first-step seconds (includes compiling)."""
    import torch

    from restorer.model import ModelConfig, build_model, flops_per_pixel
    from train_step import make_step, timed

    device = spec["device"]
    variants = [("eager", False)] + ([("compiled", True)] if spec["compile"] else [])
    for variant, compile_ in variants:
        for preset in spec["presets"]:
            cfg = ModelConfig(preset=preset, condition_on_quality=spec["condition_on_quality"]).resolved()
            rec = {
                "preset": preset,
                "variant": variant,
                "channels": cfg.channels,
                "units": cfg.units,
                "flops_per_pixel": flops_per_pixel(build_model(cfg)),
            }
            try:
                if compile_:
                    torch._dynamo.reset()
                step = make_step(
                    cfg,
                    bf16=spec["bf16"],
                    channels_last=spec["channels_last"],
                    compile=compile_,
                    patch=spec["patch"],
                    batch=spec["batch"],
                    device=device,
                )
                t0 = time.perf_counter()
                step()
                if device == "cuda":
                    torch.cuda.synchronize()
                rec["first_step_s"] = time.perf_counter() - t0
                for _ in range(3):
                    step()
                rec["patches_per_s"] = timed(step, spec["batch"], spec["seconds"], device)
                del step
            except Exception as exc:  # noqa: BLE001 (an OOM or a compiler failure ends this row only)
                rec["error"] = f"{type(exc).__name__}: {first_line(exc, 150)}"
            if device == "cuda":
                torch.cuda.empty_cache()
            emit(rec)


# --------------------------------------------------------------------------------- child: loader


def child_loader(spec: dict) -> None:
    """patches/s of the training loader alone, per worker count (after its first batch)."""
    import gc

    import torch

    from restorer.data.config import StreamConfig
    from restorer.data.loader import make_train_loader

    torch.set_num_threads(1)
    cfg = StreamConfig(
        shards=spec["shards"],
        splits=spec["splits"],
        patch_size=spec["patch"],
        patches_per_image=spec["patches_per_image"],
        quality=spec["quality"],
        shuffle_buffer=spec["shuffle_buffer"],
        resampled=True,
        seed=0,
    )
    for workers in spec["workers"]:
        rec = {"workers": workers}
        try:
            loader = make_train_loader(cfg, batch_size=spec["batch"], num_workers=workers)
            t0 = time.perf_counter()
            n, start = 0, None
            while start is None or time.perf_counter() - start < spec["seconds"]:
                if start is None and time.perf_counter() - t0 > 10 * spec["seconds"] + 60:
                    raise RuntimeError("no batch came out of the loader")
                for deg, _, _ in loader:  # endless under the loader contract; re-entered if an epoch ends
                    if start is None:
                        start = time.perf_counter()
                        rec["first_batch_s"] = start - t0
                        continue
                    n += deg.shape[0]
                    if time.perf_counter() - start >= spec["seconds"]:
                        break
            rec["patches_per_s"] = n / (time.perf_counter() - start)
            del loader
            gc.collect()  # stops this loader's persistent workers before the next count starts
        except Exception as exc:  # noqa: BLE001
            rec["error"] = f"{type(exc).__name__}: {first_line(exc, 150)}"
        emit(rec)


# -------------------------------------------------------------------------------- child: restore


def child_restore(spec: dict) -> None:
    """``restorer restore`` (the CLI's main, in this process) on a synthetic JPEG; one record with
    the seconds of the whole command, peak GPU memory (torch allocator) and peak RSS."""
    import numpy as np
    import torch
    from PIL import Image

    from restorer import cli

    w, h = spec["size"]
    work = Path(spec["work"])
    src = sorted(Path(spec["bsds"]).rglob("*.jpg"))[:1]
    if src:  # real photo content, upscaled, plus fine noise: JPEG-like statistics at 24 MP
        with Image.open(src[0]) as im:
            base = np.asarray(im.convert("RGB").resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    else:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1).astype(np.int16)
    noise = np.random.default_rng(0).integers(-6, 7, size=(h, w, 1), dtype=np.int16)
    jpeg = work / f"synthetic_{w}x{h}.jpg"
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(jpeg, quality=30)
    del base, noise
    weights = spec.get("weights")
    if not weights:  # training produced nothing: a fixed-seed model of the same preset (speed only)
        from restorer.model import ModelConfig, build_model
        from restorer.modelfile import export_weights

        torch.manual_seed(0)
        cfg = ModelConfig(preset=spec["preset"])
        weights = str(export_weights(build_model(cfg), cfg, work / "untrained", facts={"quality": "10-90"}))
    for name in [weights, *spec.get("packaged", [])]:  # the model just trained, then the shipped ones
        if spec["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        code = cli.main(restore_argv(jpeg, work / "restored.png", name, spec["device"]))
        rec = {
            "seconds": time.perf_counter() - t0,
            "exit": code,
            "megapixels": w * h / 1e6,
            "weights": name,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if spec["device"] == "cuda":
            rec["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        emit(rec)


def restore_argv(jpeg: Path, out: Path, weights: str, device: str) -> list[str]:
    return [
        "restore",
        str(jpeg),
        "-o",
        str(out),
        "--weights",
        weights,
        "--device",
        device,
        "--overwrite",
        "--no-progress",
    ]


CHILDREN = {"model": child_model, "loader": child_loader, "restore": child_restore}


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("stage", choices=sorted(CHILDREN), help="the stage to measure")
    ap.add_argument("spec", type=json.loads, help="the stage's settings, a JSON object (see gpu_check.py)")
    args = ap.parse_args(argv)
    CHILDREN[args.stage](args.spec)
    print(f"gpu_check_child_records: {EMITTED[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
