#!/usr/bin/env python
"""Restore throughput (megapixels/s) and peak memory, side by side in one run.

Cases, each in its own child process so that peak resident memory (``ru_maxrss`` of that child,
from ``os.wait4``) is its own:

* ``cpu_untiled`` / ``cpu_tiled`` / ``cpu_tiled_bf16``: the ``default`` preset (fixed-seed,
  untrained -- speed does not depend on the weights) on a 1024x768 photo-like image, whole image vs
  512 px tiles (overlap = receptive radius), fp32 and bf16 autocast; the tiled output is compared
  with the untiled one (max difference in 8-bit levels). Memory format as ``restorer.hardware``
  decides for the device and precision; ``cpu_tiled_nhwc`` forces channels_last in fp32 to show
  what that rule costs or saves on this CPU.
* ``cli_24mp``: ``restorer restore`` end to end on a 6000x4000 JPEG (decode, tiled restore, PNG
  encode, metadata), peak RSS. By default with the ``tiny`` preset so the run stays ~2 min on 2
  shared cores; ``--full`` uses the ``default`` preset (about 4-5 min on 2 cores).
* ``cuda_untiled`` / ``cuda_tiled``: the default preset on a 4 MP image, when a GPU is present.
* ``--packaged``: instead of all that, the models that ship (restorer/weights: ``fast``, ``quality``
  where installed), each restoring the same 6000x4000 JPEG with ``restorer restore big.jpg --weights
  NAME`` exactly as a user runs it (auto precision, projection on), side by side; the last line is
  ``restore_24mp_seconds_fast: <value>``.

The last line is ``restore_cpu_mpix_per_s: <value>`` (default preset, tiled, fp32, CPU).

examples:
  python bench/restore.py                 # ~2 min on 2 cores
  python bench/restore.py --full          # the 24 MP case with the default preset
  python bench/restore.py --threads 1     # torch threads in every child
  python bench/restore.py --packaged      # the shipped models on a 24 MP JPEG, as `restore` runs them
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchcli import parser

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))


def photo_like(width: int, height: int):
    """A deterministic photo-like RGB image: a real photo resized, plus fine noise."""
    import numpy as np
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.int16)
    noise = np.random.default_rng(0).integers(-6, 7, size=(height, width, 1), dtype=np.int16)
    return np.clip(arr + noise, 0, 255).astype(np.uint8)


def child(args) -> None:
    """One timed restore in this process; prints a JSON line."""
    import numpy as np
    import torch

    from restorer.data.degrade import jpeg_roundtrip
    from restorer.infer.engine import Restorer
    from restorer.model import ModelConfig, build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(preset=args.preset)
    model = build_model(cfg)
    for p in model.parameters():  # fixed-seed weights; the tail non-zero so the net is not the identity
        torch.nn.init.normal_(p, std=0.02)
    device = torch.device(args.device)
    r = Restorer(
        model.to(device).eval(),
        {"model": {"in_channels": 3}},
        Path(args.preset),
        device,
        args.tile,
        None,
        "bf16" if args.bf16 else "fp32",
        {"auto": None, "true": True, "false": False}[args.channels_last],
    )
    w, h = (int(v) for v in args.size.split("x"))
    img = jpeg_roundtrip(photo_like(w, h), 30)
    r.restore(img[:128, :128], 30, tile=args.tile)  # warm-up (kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = r.restore(img, 30, tile=args.tile)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if args.save:
        np.save(args.save, out)
    res = {"seconds": dt, "mpix_per_s": w * h / 1e6 / dt, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res))


def measured(cmd: list[str], env: dict) -> tuple[int, str, str, float, float]:
    """Run ``cmd`` and reap it with os.wait4: (returncode, stdout, stderr, wall s, peak RSS MiB)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, cwd=REPO, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        return proc.returncode, fo.read(), fe.read(), wall, usage.ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--full", action="store_true", help="24 MP case with the default preset (slow on CPU)")
    ap.add_argument(
        "--packaged", action="store_true", help="only the shipped models on a 24 MP JPEG, as users run them"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    ap.add_argument("--size", default="1024x768", help="image size of the speed cases")
    ap.add_argument("--tile", type=int, default=512)
    # child mode
    ap.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        child(args)
        return 0

    import numpy as np
    import torch

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    threads = ["--threads", str(args.threads)] if args.threads else []
    print(
        f"# restore bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
        f"cuda {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}"
    )
    if args.packaged:
        return packaged_models(env, threads)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_restore_"))
    # (name, device, tile, bf16, channels_last): "auto" = restorer.hardware's rule for the device/precision
    cases = [
        ("cpu_untiled", "cpu", 0, False, "auto"),
        ("cpu_tiled", "cpu", args.tile, False, "auto"),
        ("cpu_tiled_nhwc", "cpu", args.tile, False, "true"),
        ("cpu_tiled_bf16", "cpu", args.tile, True, "auto"),
    ]
    if torch.cuda.is_available():
        cases += [("cuda_untiled", "cuda", 0, False, "auto"), ("cuda_tiled", "cuda", args.tile, False, "auto")]
    outputs = {}
    for name, device, tile, bf16, nhwc in cases:
        size = args.size if device == "cpu" else "2304x1728"
        save = tmp / f"{name}.npy"
        cmd = (
            [
                sys.executable,
                __file__,
                "--case",
                "--preset",
                "default",
                "--device",
                device,
                "--tile",
                str(tile),
                "--size",
                size,
                "--save",
                str(save),
                "--channels-last",
                nhwc,
            ]
            + threads
            + (["--bf16"] if bf16 else [])
        )
        code, out, err, wall, rss = measured(cmd, env)
        if code != 0:
            print(f"{name}: FAILED ({err.strip().splitlines()[-1] if err.strip() else code})")
            continue
        res = json.loads(out.strip().splitlines()[-1])
        outputs[name] = save
        rows.append(
            (
                name,
                "default",
                size,
                tile or "-",
                "bf16" if bf16 else "fp32",
                res["mpix_per_s"],
                res["seconds"],
                rss,
                res.get("cuda_peak_mib"),
            )
        )
    diffs = {}
    for a, b in (
        ("cpu_untiled", "cpu_tiled"),
        ("cpu_untiled", "cpu_tiled_nhwc"),
        ("cuda_untiled", "cuda_tiled"),
        ("cpu_untiled", "cpu_tiled_bf16"),
    ):
        if a in outputs and b in outputs:
            diffs[b] = int(np.abs(np.load(outputs[a]).astype(np.int16) - np.load(outputs[b]).astype(np.int16)).max())

    # 24 MP end to end through the CLI
    from PIL import Image

    from restorer.model import ModelConfig, build_model
    from restorer.modelfile import export_weights

    big_preset = "default" if args.full else "tiny"
    torch.manual_seed(0)
    cfg = ModelConfig(preset=big_preset)
    model = build_model(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    weights = export_weights(model, cfg, tmp / "w", facts={"quality": "10-90"})
    big = tmp / "big.jpg"
    Image.fromarray(photo_like(6000, 4000)).save(big, quality=30)
    cmd = [
        sys.executable,
        "-m",
        "restorer.cli",
        "restore",
        str(big),
        "-o",
        str(tmp / "big.png"),
        "--weights",
        str(weights),
        "--device",
        "cpu",
        "--tile",
        str(args.tile),
        "--precision",
        "fp32",
        "--no-progress",
    ] + threads
    code, out, err, wall, rss = measured(cmd, env)
    if code == 0:
        rows.append(("cli_24mp", big_preset, "6000x4000", args.tile, "fp32", 24.0 / wall, wall, rss, None))
    else:
        print(f"cli_24mp: FAILED ({err.strip().splitlines()[-1] if err.strip() else code})")

    print(
        f"{'case':<16} {'preset':<8} {'size':<10} {'tile':>5} {'dtype':<5} {'Mpix/s':>8} {'seconds':>8} "
        f"{'peak RSS MiB':>13} {'max |diff| vs untiled':>22}"
    )
    for name, preset, size, tile, dtype, mps, sec, rss, cuda_mib in rows:
        extra = f"{diffs[name]:>22}" if name in diffs else f"{'':>22}"
        cuda = f"  (GPU peak {cuda_mib:.0f} MiB)" if cuda_mib else ""
        print(
            f"{name:<16} {preset:<8} {size:<10} {tile!s:>5} {dtype:<5} {mps:>8.3f} {sec:>8.1f} {rss:>13.0f} "
            f"{extra}{cuda}"
        )
    print("(cli_24mp: end to end incl. JPEG decode and PNG encode; peak RSS of the whole `restorer restore` process)")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    best = next((r for r in rows if r[0] == "cpu_tiled"), None)
    print(f"restore_cpu_mpix_per_s: {best[5]:.3f}" if best else "restore_cpu_mpix_per_s: nan")
    return 0


def packaged_models(env: dict, threads: list[str]) -> int:
    """``restorer restore big.jpg --weights NAME`` for each packaged model, on the same 24 MP JPEG."""
    import shutil

    from PIL import Image

    from restorer import weights as packaged

    names = [n for n in packaged.NAMES if packaged.installed(n)]
    tmp = Path(tempfile.mkdtemp(prefix="bench_restore_"))
    big = tmp / "big.jpg"
    Image.fromarray(photo_like(6000, 4000)).save(big, quality=30)
    rows = {}
    for name in names:
        cmd = [
            sys.executable,
            "-m",
            "restorer.cli",
            "restore",
            str(big),
            "-o",
            str(tmp / f"{name}.png"),
            "--weights",
            name,
            "--device",
            "cpu",
            "--no-progress",
        ] + threads
        code, out, err, wall, rss = measured(cmd, env)
        if code != 0:
            print(f"{name}: FAILED ({err.strip().splitlines()[-1] if err.strip() else code})")
            continue
        rows[name] = (wall, rss)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'weights':<8} {'seconds':>8} {'Mpix/s':>7} {'peak RSS MiB':>13} {'x fast':>7}")
    for name, (wall, rss) in rows.items():
        ratio = f"{wall / rows['fast'][0]:>7.2f}" if "fast" in rows else ""
        print(f"{name:<8} {wall:>8.1f} {24.0 / wall:>7.2f} {rss:>13.0f} {ratio}")
    print("(6000x4000 JPEG at q30, `restorer restore` end to end: decode, restore, projection, PNG encode)")
    print(f"restore_24mp_seconds_fast: {rows['fast'][0]:.1f}" if "fast" in rows else "restore_24mp_seconds_fast: nan")
    return 0 if len(rows) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
