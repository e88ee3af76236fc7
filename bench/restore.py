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

* ``--end-to-end``: instead, ``restorer restore big.jpg`` with the packaged ``fast`` (``--weights``)
  on a 6000x4000 q30 JPEG (or ``--image``), as a user runs it: first each stage alone in one child
  (decode / coefficients / network / projection / encode, wall and CPU seconds; ``--compare-png``
  adds Pillow's PNG writer for the size cost), then the command end to end in another (process
  start to exit, peak RSS). Last line ``end_to_end_over_network: <end to end / network>``
  (the median over ``--repeat`` runs). Module: bench/restore_stages.py.
* ``--folder N``: instead, a folder of N photo-like JPEGs of ``--folder-size``: the network alone on
  each (decoded beforehand), ``restorer restore folder/`` with its default overlap and with
  ``--sequential``, back to back in each of ``--repeat`` rounds (order reversed every other round);
  each rate is against its own round's network time. Last line ``folder_rate_over_network:
  <network seconds / end to end seconds>`` (overlapped, median over the rounds).

The last line is ``restore_cpu_mpix_per_s: <value>`` (default preset, tiled, fp32, CPU) for the
default cases.

examples:
  python bench/restore.py                 # ~2 min on 2 cores
  python bench/restore.py --full          # the 24 MP case with the default preset
  python bench/restore.py --threads 1     # torch threads in every child
  python bench/restore.py --packaged      # the shipped models on a 24 MP JPEG, as `restore` runs them
  python bench/restore.py --end-to-end --compare-png   # the split of a 24 MP restore (fast), ~3 min on 2 cores
  python bench/restore.py --folder 8 --repeat 3   # 8 photos of 6 MP, overlapped and sequential, 3 rounds
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

import restore_stages  # noqa: E402  (bench/restore_stages.py, beside this script)


def photo_like(width: int, height: int, seed: int = 0):
    """A deterministic photo-like RGB image: a real photo resized, plus fine noise (``seed``)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.int16)
    noise = np.random.default_rng(seed).integers(-6, 7, size=(height, width, 1), dtype=np.int16)
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
    return measured_cpu(cmd, env)[:5]


def measured_cpu(cmd: list[str], env: dict) -> tuple[int, str, str, float, float, float]:
    """:func:`measured` plus the child's CPU seconds (user + system, all its threads)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, cwd=REPO, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        rss = usage.ru_maxrss / 1024  # Linux: KiB
        return proc.returncode, fo.read(), fe.read(), wall, rss, usage.ru_utime + usage.ru_stime


def build_parser() -> argparse.ArgumentParser:
    ap = parser(__doc__)
    ap.add_argument("--full", action="store_true", help="24 MP case with the default preset (slow on CPU)")
    ap.add_argument(
        "--packaged", action="store_true", help="only the shipped models on a 24 MP JPEG, as users run them"
    )
    ap.add_argument(
        "--end-to-end",
        action="store_true",
        help="only `restorer restore` on one big JPEG (--image, default a 6000x4000 q30 one): the time of each "
        "stage against the network's; last line end_to_end_over_network",
    )
    ap.add_argument(
        "--folder",
        type=int,
        default=0,
        metavar="N",
        help="only `restorer restore` on a folder of N JPEGs of --folder-size (default 3000x2000), with and "
        "without --sequential, against the network alone; last line folder_rate_over_network",
    )
    ap.add_argument("--folder-size", default="3000x2000", help="photo size of --folder")
    ap.add_argument("--image", default=None, help="--end-to-end: this JPEG instead of the generated one")
    ap.add_argument("--weights", default="fast", help="--end-to-end / --folder: weights (default fast)")
    ap.add_argument("--repeat", type=int, default=1, help="--end-to-end / --folder: runs / rounds (median reported)")
    ap.add_argument("--compare-png", action="store_true", help="--end-to-end: also Pillow's PNG levels 6 and 1")
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
    ap.add_argument("--split-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--network-child", nargs="+", default=None, help=argparse.SUPPRESS)
    return ap


def restore_cmd(inputs: list[Path], out: Path, weights: str | Path, *extra: str) -> list[str]:
    """``restorer restore INPUTS -o OUT --weights W EXTRA...`` run by this Python."""
    cmd = [sys.executable, "-m", "restorer.cli", "restore", *map(str, inputs), "-o", str(out)]
    return [*cmd, "--weights", str(weights), *extra]


def failure(err: str, code: int) -> str:
    return err.strip().splitlines()[-1] if err.strip() else str(code)


# (name, device, tile, bf16, channels_last): "auto" = restorer.hardware's rule for the device/precision
def speed_cases(tile: int, cuda: bool) -> list[tuple[str, str, int, bool, str]]:
    cases = [
        ("cpu_untiled", "cpu", 0, False, "auto"),
        ("cpu_tiled", "cpu", tile, False, "auto"),
        ("cpu_tiled_nhwc", "cpu", tile, False, "true"),
        ("cpu_tiled_bf16", "cpu", tile, True, "auto"),
    ]
    if cuda:
        cases += [("cuda_untiled", "cuda", 0, False, "auto"), ("cuda_tiled", "cuda", tile, False, "auto")]
    return cases


def run_speed_cases(args, env: dict, threads: list[str], tmp: Path, cuda: bool) -> tuple[list[tuple], dict]:
    """Each case in a child (``--case``): (table rows, name -> the saved output)."""
    rows, outputs = [], {}
    for name, device, tile, bf16, nhwc in speed_cases(args.tile, cuda):
        size = args.size if device == "cpu" else "2304x1728"
        save = tmp / f"{name}.npy"
        cmd = [sys.executable, __file__, "--case", "--preset", "default", "--device", device, "--tile", str(tile)]
        cmd += ["--size", size, "--save", str(save), "--channels-last", nhwc, *threads] + (["--bf16"] if bf16 else [])
        code, out, err, wall, rss = measured(cmd, env)
        if code != 0:
            print(f"{name}: FAILED ({failure(err, code)})")
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
    return rows, outputs


def untiled_diffs(outputs: dict[str, Path]) -> dict[str, int]:
    """Largest pixel difference of each tiled / bf16 / NHWC output from its untiled one."""
    import numpy as np

    diffs = {}
    for a, b in (
        ("cpu_untiled", "cpu_tiled"),
        ("cpu_untiled", "cpu_tiled_nhwc"),
        ("cuda_untiled", "cuda_tiled"),
        ("cpu_untiled", "cpu_tiled_bf16"),
    ):
        if a in outputs and b in outputs:
            diffs[b] = int(np.abs(np.load(outputs[a]).astype(np.int16) - np.load(outputs[b]).astype(np.int16)).max())
    return diffs


def cli_24mp(args, env: dict, threads: list[str], tmp: Path) -> tuple | None:
    """24 MP end to end through the CLI, a random-weight model of the tiny (``--full``: default) preset."""
    import torch
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
    extra = ["--device", "cpu", "--tile", str(args.tile), "--precision", "fp32", "--no-progress", *threads]
    code, out, err, wall, rss = measured(restore_cmd([big], tmp / "big.png", weights, *extra), env)
    if code == 0:
        return ("cli_24mp", big_preset, "6000x4000", args.tile, "fp32", 24.0 / wall, wall, rss, None)
    print(f"cli_24mp: FAILED ({failure(err, code)})")
    return None


def print_rows(rows: list[tuple], diffs: dict[str, int]) -> None:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.case:
        child(args)
        return 0
    if args.split_child:
        restore_stages.split_child(Path(args.split_child), args.weights, args.threads, args.compare_png)
        return 0
    if args.network_child:
        restore_stages.network_child([Path(p) for p in args.network_child], args.weights, args.threads)
        return 0

    import torch

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    threads = ["--threads", str(args.threads)] if args.threads else []
    print(
        f"# restore bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
        f"cuda {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}"
    )
    if args.packaged:
        return packaged_models(env, threads)
    if args.end_to_end:
        return end_to_end(args, env, threads)
    if args.folder:
        return folder(args, env, threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_restore_"))
    rows, outputs = run_speed_cases(args, env, threads, tmp, torch.cuda.is_available())
    diffs = untiled_diffs(outputs)
    big = cli_24mp(args, env, threads, tmp)
    rows += [big] if big else []
    print_rows(rows, diffs)
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
        cmd = restore_cmd([big], tmp / f"{name}.png", name, "--device", "cpu", "--no-progress", *threads)
        code, out, err, wall, rss = measured(cmd, env)
        if code != 0:
            print(f"{name}: FAILED ({failure(err, code)})")
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


def _cli(inputs: list[Path], out: Path, args, env: dict, threads: list[str], extra=()) -> tuple:
    """``restorer restore`` in a child: (wall s, peak RSS MiB, CPU s, its stdout)."""
    cmd = restore_cmd(inputs, out, args.weights, "--no-progress", "--overwrite", *threads, *extra)
    code, out_text, err, wall, rss, cpu = measured_cpu(cmd, env)
    if code != 0:
        raise SystemExit(f"restorer restore failed: {failure(err, code)}")
    return wall, rss, cpu, out_text.strip()


def _child_json(flag: str, values: list[str], args, env: dict, threads: list[str], extra=()) -> dict:
    cmd = [sys.executable, __file__, flag, *values, "--weights", args.weights, *threads, *extra]
    code, out, err, _, _ = measured(cmd, env)
    if code != 0:
        raise SystemExit(f"{flag} failed: {failure(err, code)}")
    return json.loads(out.strip().splitlines()[-1])


def end_to_end(args, env: dict, threads: list[str]) -> int:
    """Each stage of one restore alone, then the command end to end; ratio to the network."""
    import statistics

    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix="bench_restore_"))
    image = Path(args.image) if args.image else tmp / "big.jpg"
    if not args.image:
        Image.fromarray(photo_like(6000, 4000)).save(image, quality=30)
    ratios = []
    for _ in range(max(1, args.repeat)):
        res = _child_json("--split-child", [str(image)], args, env, threads, ["--compare-png"] * args.compare_png)
        wall, rss, cpu, line = _cli([image], tmp / "cli.png", args, env, threads)
        ratios.append(restore_stages.print_split(res, (wall, rss, cpu), line))
        print(f"load average now {os.getloadavg()[0]:.1f}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(f"end_to_end_over_network: {statistics.median(ratios):.3f}")
    return 0


def folder(args, env: dict, threads: list[str]) -> int:
    """A folder of photos: the network alone, `restorer restore` overlapped and sequential, in rounds.

    The three runs of a round follow each other (the order reversed every other round), and each
    rate is taken against the network-only time of its own round: this 2-core machine's speed drifts
    5-10% over minutes, as much as the difference being measured.
    """
    import statistics

    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix="bench_restore_"))
    w, h = (int(v) for v in args.folder_size.split("x"))
    src = tmp / "in"
    src.mkdir()
    images = []
    for i in range(args.folder):
        images.append(src / f"p{i}.jpg")
        Image.fromarray(photo_like(w, h, seed=i)).save(images[-1], quality=30 + 5 * (i % 4))
    cases = {"network only": None, "restore overlapped": [], "restore sequential": ["--sequential"]}
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
    mp = 0.0
    for r in range(max(1, args.repeat)):
        for name in list(cases)[:: 1 if r % 2 == 0 else -1]:
            if cases[name] is None:
                net = _child_json("--network-child", [str(p) for p in images], args, env, threads)
                runs[name].append((sum(net["seconds"]), 0.0, net["cpu"]))
                mp = net["megapixels"]
            else:
                runs[name].append(_cli([src], tmp / name.split()[-1], args, env, threads, cases[name])[:3])
    print(f"# {args.folder} JPEGs of {w}x{h} ({mp:.0f} MP), weights {args.weights}; end to end = process start to exit")
    print(f"# {len(runs['network only'])} round(s) of the three runs back to back; rate = that round's network time")
    print(f"{'case':<20} {'round':>5} {'seconds':>8} {'Mpix/s':>7} {'x network':>10} {'peak RSS MiB':>13} {'CPU s':>7}")
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for r, (network, _, _) in enumerate(runs["network only"]):
        for name in cases:
            wall, rss, cpu = runs[name][r]
            rates[name].append(network / wall)
            rss_text = f"{rss:.0f}" if rss else ""
            rate = network / wall
            print(f"{name:<20} {r + 1:>5} {wall:>8.1f} {mp / wall:>7.3f} {rate:>10.3f} {rss_text:>13} {cpu:>7.1f}")
    print("(network only: Restorer.restore on the decoded photos, its CPU seconds; restore: the whole process)")
    for name in list(cases)[1:]:
        print(f"{name}: median rate {statistics.median(rates[name]):.3f} of the network's ({len(rates[name])} rounds)")
    print(f"load average now {os.getloadavg()[0]:.1f}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(f"folder_rate_over_network: {statistics.median(rates['restore overlapped']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
