"""`restorer model-info`: parameters and FLOPs of a model preset (or all of them), as a table.

FLOPs count 2 x the multiply-accumulates of every convolution (see ``restorer.model.flops_per_pixel``);
a training step is taken as 3 x the forward pass (forward, gradients w.r.t. activations and weights).
"""

from __future__ import annotations

import argparse
import dataclasses

from restorer.config import option, options_parser, parse_config
from restorer.errors import UserError, cli_entry
from restorer.model import PRESETS, ModelConfig, model_summary

PROG = "restorer model-info"
DESCRIPTION = __doc__.split("\n\n")[0]
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


@dataclasses.dataclass(kw_only=True)
class ModelInfoOptions:
    """``restorer model-info``'s options: the model's own (restorer.model.ModelConfig, the fields
    the trainer takes too) and these."""

    model: ModelConfig = dataclasses.field(
        default_factory=ModelConfig, metadata={"flatten": True, "hide": ("in_channels",)}
    )
    grayscale: bool = option(False, "1 input channel instead of 3", switch=True)
    all: bool = option(False, "one row per preset", switch=True)


def build_parser() -> argparse.ArgumentParser:
    """The command line parser (for --help and the option checks of tests/test_options.py)."""
    return options_parser(ModelInfoOptions, PROG, DESCRIPTION, EPILOG)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_config(ModelInfoOptions, argv, prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    presets = list(PRESETS) if args.all else [args.model.preset]
    rows = []
    for preset in presets:
        cfg = dataclasses.replace(args.model, preset=preset, in_channels=1 if args.grayscale else 3)
        try:
            rows.append(model_summary(cfg))
        except ValueError as exc:
            raise UserError(str(exc)) from None
    print(table(rows))
    if any(r["preset"] == "seed" for r in rows) and (args.model.channels or args.model.units):
        print("note: the seed preset has a fixed architecture; --channels/--units do not change it")
    return 0
