"""`restorer plot RUN_DIR`: loss and PSNR curves of a training run, drawn from its metrics.jsonl.

For people who trained offline (or without W&B at all): every run writes ``metrics.jsonl``, one
JSON object per logged event with a ``step``. Keys containing ``loss`` go in the left panel, keys
containing ``psnr`` in the middle one (JPEG references dashed, one colour per quality), and the
gains over JPEG per quality in the right one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path

from restorer.config import option, options_parser, parse_config
from restorer.errors import UserError, cli_entry
from restorer.fsutil import atomic_write

PROG = "restorer plot"
EPILOG = """examples:
  restorer plot runs/demo                      # writes runs/demo/curves.png
  restorer plot runs/demo -o curves.png --log-loss
"""


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Series name -> [(step, value)], skipping non-numeric values and lines cut short by a kill."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a run killed mid-write leaves at most one partial last line
            step = row.get("step")
            if not isinstance(step, int):
                continue
            for key, value in row.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                ):
                    series[key].append((step, float(value)))
    return dict(series)


def _style(key: str, palette: dict[str, str]) -> dict[str, object]:
    """Same colour for the same quality (``..._q10``); JPEG references dashed."""
    tail = key.rsplit("_", 1)[-1] if "_q" in key else key.split("/")[-1]
    if tail not in palette:
        palette[tail] = f"C{len(palette) % 10}"
    return {"color": palette[tail], "linestyle": "--" if "jpeg" in key else "-"}


def _panel(ax, series: dict[str, list[tuple[int, float]]], keys: list[str], title: str, ylabel: str) -> None:
    palette: dict[str, str] = {}
    for key in keys:
        steps, values = zip(*series[key])
        ax.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None, markersize=3, **_style(key, palette))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=7)


def plot_run(run_dir: Path, out: Path, log_loss: bool = False) -> Path:
    metrics = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not metrics.is_file():
        raise UserError(f"{metrics}: no metrics.jsonl here (pass a run directory made by launch/train.py)")
    series = read_metrics(metrics)
    loss_keys = sorted(k for k in series if "loss" in k and "scale" not in k)
    psnr_keys = sorted(k for k in series if "psnr" in k and "loss" not in k and "gain" not in k)
    gain_keys = sorted(k for k in series if "gain" in k)
    if not loss_keys and not psnr_keys:
        raise UserError(f"{metrics}: holds no loss or PSNR values yet")

    import matplotlib  # here, not at the top: 1.3 s to import (measured), and only this command needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(16, 4.5))
    _panel(left, series, loss_keys, "training loss", "MSE")
    if log_loss:
        left.set_yscale("log")
    _panel(mid, series, psnr_keys, "PSNR (RGB; JPEG dashed)", "dB")
    _panel(right, series, gain_keys, "gain over JPEG (restored - JPEG)", "dB")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


@dataclasses.dataclass(kw_only=True)
class PlotOptions:
    """``restorer plot``'s options."""

    run_dir: str = option(
        help="run directory holding metrics.jsonl (or the file itself)", positional=True, metavar="RUN_DIR"
    )
    out: str | None = option(None, "PNG to write (default RUN_DIR/curves.png)", short="-o", metavar="PNG")
    log_loss: bool = option(False, "log scale for the loss panel", switch=True)


def build_parser() -> argparse.ArgumentParser:
    """The command line parser (for --help and the option checks of tests/test_options.py)."""
    return options_parser(PlotOptions, PROG, __doc__, EPILOG)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_config(PlotOptions, argv, prog=PROG, description=__doc__, epilog=EPILOG)
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else (run_dir if run_dir.is_dir() else run_dir.parent) / "curves.png"
    print(plot_run(run_dir, out, args.log_loss))
    return 0
