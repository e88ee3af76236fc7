"""`restorer model-info`: parameters and FLOPs of a model preset (or all of them), as a table.

FLOPs count 2 x the multiply-accumulates of every convolution (see ``restorer.model.flops_per_pixel``);
a training step is taken as 3 x the forward pass (forward, gradients w.r.t. activations and weights).
"""

from __future__ import annotations

import argparse

from restorer.errors import UserError, cli_entry
from restorer.model import PRESETS, ModelConfig, model_summary

EPILOG = """examples:
  restorer model-info --preset default
  restorer model-info --preset default --channels 96 --units 12 --condition-on-quality
  restorer model-info --all
"""

COLUMNS = (
    ("preset", "preset", "{}"),
    ("C", "channels", "{}"),
    ("N", "units", "{}"),
    ("cond", "condition_on_quality", "{}"),
    ("params", "parameters", "{:,}"),
    ("GFLOPs/MP", "gflops_per_megapixel", "{:.1f}"),
    ("train GFLOPs/128px patch", "train_gflops_per_128px_patch", "{:.2f}"),
)


def table(rows: list[dict]) -> str:
    cells = [[h for h, _, _ in COLUMNS]] + [[fmt.format(r[key]) for _, key, fmt in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="restorer model-info",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="default", help=f"one of {', '.join(PRESETS)} (default: default)")
    parser.add_argument("--all", action="store_true", help="one row per preset")
    parser.add_argument("--channels", type=int, default=None, help="override C (residual presets)")
    parser.add_argument("--units", type=int, default=None, help="override N (residual presets)")
    parser.add_argument("--condition-on-quality", action="store_true", help="add the quality input plane")
    parser.add_argument("--grayscale", action="store_true", help="1 input channel instead of 3")
    args = parser.parse_args(argv)
    for name in ("channels", "units"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    presets = list(PRESETS) if args.all else [args.preset]
    rows = []
    for preset in presets:
        try:
            rows.append(
                model_summary(
                    ModelConfig(
                        preset=preset,
                        channels=args.channels,
                        units=args.units,
                        in_channels=1 if args.grayscale else 3,
                        condition_on_quality=args.condition_on_quality,
                    )
                )
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
    print(table(rows))
    if any(r["preset"] == "seed" for r in rows) and (args.channels or args.units):
        print("note: the seed preset has a fixed architecture; --channels/--units do not change it")
    return 0
