"""One option system: every command's options are typed dataclass fields of restorer.config (one
default, one help, one check each), and the options several commands share are one definition."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

from restorer import hardware, model_info, plot
from restorer.config import options_parser, parse_config
from restorer.errors import UserError
from restorer.infer import compare, evaluate, options, restore
from restorer.train import step
from restorer.train.config import TrainConfig
from shard_tools.config import BuildConfig

REPO = Path(__file__).resolve().parents[1]

PARSERS = {
    "restore": restore.build_parser,
    "eval": evaluate.build_parser,
    "compare": compare.build_parser,
    "plot": plot.build_parser,
    "model-info": model_info.build_parser,
    "train": lambda: options_parser(TrainConfig, "launch/train.py"),
    "shard_tools build": lambda: options_parser(BuildConfig, "python -m shard_tools build"),
}
INFER = {"restore": restore.RestoreOptions, "eval": evaluate.EvalOptions, "compare": compare.CompareOptions}


def _actions(name: str) -> list[argparse.Action]:
    return [a for a in PARSERS[name]()._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_option_has_help_and_a_type(name):
    for action in _actions(name):
        label = action.option_strings or action.dest
        assert action.help and action.help.strip(), f"{name}: {label} has no help"
        assert action.type is not None or action.choices or action.nargs == 0, f"{name}: {label} has no type"


@pytest.mark.parametrize("name", list(PARSERS))
def test_help_has_examples(name, capsys):
    if name in ("train", "shard_tools build"):
        pytest.skip("their epilogs are given by their entry points")
    with pytest.raises(SystemExit):
        PARSERS[name]().parse_args(["--help"])
    assert "examples:" in capsys.readouterr().out


def test_shared_options_are_one_field_in_every_command():
    """restore, eval and compare inherit ModelOptions and RuleOptions: the same Field objects."""
    shared = {f.name: f for f in dataclasses.fields(options.InferOptions)}
    assert {"weights", "device", "tile", "precision", "quality_rule", "no_projection", "max_pixels"} <= set(shared)
    for cls in INFER.values():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, field in shared.items():
            assert fields[name] is field, f"{cls.__name__}.{name} is a second definition"


def test_overwrite_is_one_field():
    fields = [{f.name: f for f in dataclasses.fields(cls)}["overwrite"] for cls in (INFER["restore"], INFER["compare"])]
    assert fields[0] is fields[1] is {f.name: f for f in dataclasses.fields(options.OverwriteOptions)}["overwrite"]


def test_quality_is_checked_in_one_place():
    quality = {name: {f.name: f for f in dataclasses.fields(cls)}["quality"] for name, cls in INFER.items()}
    assert quality["restore"] is quality["compare"]  # QualityOptions' field, auto|Q
    assert all(f.metadata["check"] is options.QUALITY_CHECK for f in quality.values())
    for path in ("restorer/infer/restore.py", "restorer/infer/evaluate.py", "restorer/infer/compare.py"):
        text = (REPO / path).read_text()
        assert "<= 100" not in text and "within(1, 100)" not in text, f"{path} checks --quality again"


@pytest.mark.parametrize("name", list(PARSERS))
def test_precision_has_one_vocabulary(name):
    for action in _actions(name):
        if "precision" in action.dest:
            assert action.choices is hardware.PRECISIONS and action.type is hardware.canonical_precision


def test_precision_aliases_are_accepted_everywhere():
    assert restore.parse(["x.jpg", "--precision", "no"]).precision == "fp32"
    assert parse_config(TrainConfig, ["--mixed-precision", "no"]).mixed_precision == "fp32"
    with pytest.raises(UserError, match="inference runs in"):
        restore.parse(["x.jpg", "--precision", "fp16"])


def _literal_tuples_with(word: str) -> list[str]:
    """Places in restorer/ where a tuple, list or set literal holds the string ``word``."""
    found = []
    for path in sorted((REPO / "restorer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(
                isinstance(e, ast.Constant) and e.value == word for e in node.elts
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_loss_choices_are_defined_once():
    loss = {f.name: f for f in dataclasses.fields(TrainConfig)}["loss"]
    assert loss.metadata["choices"] is step.LOSSES
    assert [p.split(":")[0] for p in _literal_tuples_with("charbonnier")] == ["restorer/train/losses.py"]
    assert [p.split(":")[0] for p in _literal_tuples_with("fp16")] == ["restorer/hardware.py"]  # PRECISIONS


def test_yaml_values_get_the_same_checks_as_flags(tmp_path, capsys):
    recipe = tmp_path / "restore.yaml"
    recipe.write_text("quality: 0\n")
    assert restore.main(["x.jpg", "--config", str(recipe)]) == 2
    assert "--quality must be 1..100, got 0" in capsys.readouterr().err
    recipe.write_text("quality: auto\nprecision: 'no'\nsequential: true\n")
    opts = restore.parse(["x.jpg", "--config", str(recipe)])
    assert (opts.quality, opts.precision, opts.sequential) == (None, "fp32", True)


def test_required_options_and_positionals():
    with pytest.raises(UserError, match="--images required"):
        evaluate.parse([])
    with pytest.raises(SystemExit):
        restore.parse([])  # INPUT... is argparse's own positional
    opts = compare.parse(["img.png", "-o", "panel.png", "--quality", "auto"])
    assert (opts.image, opts.output, opts.quality, opts.zoom) == ("img.png", "panel.png", None, 3)


def test_option_spellings(capsys):
    """positional, short, switch and a '%' in a help text (argparse formats help with %)."""

    from restorer.config import option

    @dataclasses.dataclass(kw_only=True)
    class Spelled:
        inputs: list[str] = option(help="files", positional=True, metavar="INPUT")
        out: str | None = option(None, "where (cosine to 5%)", short="-o")
        force: bool = option(False, "do it", switch=True)

    cfg = parse_config(Spelled, ["a", "b", "-o", "x", "--force"])
    assert (cfg.inputs, cfg.out, cfg.force) == (["a", "b"], "x", True)
    assert parse_config(Spelled, ["--force", "a"]).inputs == ["a"]  # a switch takes no value
    with pytest.raises(SystemExit):
        parse_config(Spelled, ["--help"])
    assert "cosine to 5%" in capsys.readouterr().out
    with pytest.raises(TypeError, match="unknown metadata"):
        option(1, "x", chioces=(1, 2))
