"""The end-to-end cases of bench/restore.py (``--end-to-end``, ``--folder``): where a restore's time
goes, stage by stage, against the network's own time. A module of that script, not a script.

* :func:`split_child` (one child process): the stages of ``restorer restore`` one after another,
  each timed alone (wall and CPU seconds), with the same settings as the command (``load_models``
  from its own parser): decode (``open_image``), quality (``choose_quality``: the tables and the
  lattice test of ``--quality auto``), coefficients (``read_coefficients``), network
  (``Restorer.restore``, after a warm-up), projection (``project_upright``), encode
  (``save_image``, PNG). ``--compare-png`` adds Pillow's PNG writer at its levels 6 and 1 (time,
  size) for the size cost of ours.
* :func:`network_child` (one child process): ``Restorer.restore`` alone on each of several photos,
  decoded beforehand: the network-only rate of a folder.
* The end-to-end figures are ``restorer restore`` itself in a child process (wall time from start
  to exit, torch import and model loading included; peak RSS from ``os.wait4``).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn):
    """(result, wall s, CPU s of the whole process)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _models(image: Path, weights: str, threads: int | None):
    """The restorer ``restorer restore IMAGE --weights W`` would use, set up the way it does."""
    from restorer.infer.engine import choose_restorer
    from restorer.infer.options import load_models
    from restorer.infer.restore import parse

    argv = [str(image), "--weights", weights, "--no-progress"] + (["--threads", str(threads)] if threads else [])
    args = parse(argv)
    return args, load_models(args), choose_restorer


def split_child(image: Path, weights: str, threads: int | None, compare_png: bool) -> None:
    """Time each stage of one restore (see the module docstring); print one JSON line."""
    from restorer.imageio import SaveOptions, open_image, save_image
    from restorer.infer.options import choose_quality
    from restorer.infer.projection import project_upright, read_coefficients

    args, models, choose = _models(image, weights, threads)
    img, t_dec, c_dec = _timed(lambda: open_image(image, args.max_pixels))
    _, t_q, c_q = _timed(lambda: choose_quality(img.pixels, img.quality, img.is_jpeg, None, models, args))
    restorer = choose(models.restorers, img.quality)
    restorer.restore(img.pixels[:256, :256], img.quality)  # warm-up (kernel selection, allocator)
    coefs, t_coef, c_coef = _timed(lambda: read_coefficients(img.data, decoded=(str(image), img.orientation)))
    out, t_net, c_net = _timed(lambda: restorer.restore(img.pixels, img.quality))
    proj, t_proj, c_proj = _timed(lambda: project_upright(out, coefs, restorer.device))
    tmp = Path(tempfile.mkdtemp(prefix="bench_split_"))
    how = SaveOptions(fmt="png", icc_profile=img.icc_profile, exif=img.exif, overwrite=True)
    _, t_enc, c_enc = _timed(lambda: save_image(proj, img.alpha, tmp / "out.png", how))
    res = {
        "size": list(img.size),
        "device": str(restorer.device),
        "precision": restorer.precision,
        "threads": __import__("torch").get_num_threads(),
        "stages": {
            "decode": [t_dec, c_dec],
            "quality": [t_q, c_q],
            "coefficients": [t_coef, c_coef],
            "network": [t_net, c_net],
            "projection": [t_proj, c_proj],
            "encode": [t_enc, c_enc],
        },
        "png_bytes": (tmp / "out.png").stat().st_size,
        "raw_bytes": int(proj.nbytes),
    }
    if compare_png:
        res["pillow_png"] = _pillow_png(proj, tmp)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def _pillow_png(pixels: np.ndarray, tmp: Path) -> dict:
    """Pillow's PNG writer at level 6 (the writer before restorer.pngio) and 1: (wall, CPU, bytes)."""
    from PIL import Image

    out = {}
    for level in (6, 1):
        path = tmp / f"pillow{level}.png"
        _, wall, cpu = _timed(lambda lv=level, p=path: Image.fromarray(pixels).save(p, compress_level=lv))
        out[str(level)] = [wall, cpu, path.stat().st_size]
    return out


def network_child(images: list[Path], weights: str, threads: int | None) -> None:
    """The network alone on each photo (decoded first, untimed); print one JSON line."""
    from restorer.imageio import open_image

    args, models, choose = _models(images[0], weights, threads)
    decoded = [open_image(p, args.max_pixels) for p in images]
    restorer = choose(models.restorers, decoded[0].quality)
    restorer.restore(decoded[0].pixels[:256, :256], decoded[0].quality)  # warm-up
    seconds, cpu = [], 0.0
    for img in decoded:
        _, wall, c = _timed(lambda im=img: restorer.restore(im.pixels, im.quality))
        seconds.append(wall)
        cpu += c
    pixels = sum(img.size[0] * img.size[1] for img in decoded)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "megapixels": pixels / 1e6}))


def print_split(res: dict, e2e: tuple[float, float, float], cli_line: str) -> float:
    """The split table; ``e2e``: the command's (wall s, peak RSS MiB, CPU s). Returns end to end /
    network."""
    e2e_wall, e2e_rss, e2e_cpu = e2e
    net = res["stages"]["network"][0]
    w, h = res["size"]
    print(
        f"# {w}x{h} JPEG, device {res['device']}, precision {res['precision']}, {res['threads']} torch threads; "
        "each stage alone, in one process"
    )
    print(f"{'stage':<13} {'wall s':>8} {'CPU s':>8} {'x network':>10}")
    for name, (wall, cpu) in res["stages"].items():
        print(f"{name:<13} {wall:>8.2f} {cpu:>8.2f} {wall / net:>10.3f}")
    total = sum(wall for wall, _ in res["stages"].values())
    print(f"{'sum':<13} {total:>8.2f} {'':>8} {total / net:>10.3f}")
    png = res["png_bytes"]
    print(f"PNG: {png / 1e6:.1f} MB ({png / res['raw_bytes']:.3f} of the raw pixels)")
    for level, (wall, cpu, size) in res.get("pillow_png", {}).items():
        print(
            f"  Pillow level {level}: {wall:.2f} s wall, {cpu:.2f} s CPU, {size / 1e6:.1f} MB "
            f"(ours is {png / size - 1:+.1%} in size)"
        )
    print(
        f"restorer restore, end to end (process start to exit, torch import and model load included): "
        f"{e2e_wall:.2f} s ({e2e_cpu:.1f} s CPU), peak RSS {e2e_rss:.0f} MiB; its own line: {cli_line}"
    )
    print(f"split child peak RSS {res['peak_rss_mib']:.0f} MiB")
    return e2e_wall / net


if __name__ == "__main__":
    sys.exit("a module of bench/restore.py: run `python bench/restore.py --end-to-end` or `--folder`")
