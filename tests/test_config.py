import dataclasses

import pytest
import yaml

from restorer.config import dump_config, flat_fields, parse_config
from restorer.errors import UserError
from restorer.model import PRESETS, ModelConfig


@dataclasses.dataclass
class Demo:
    shards: str = "data/shards"
    lr: float = 5e-4
    steps: int = 10
    compile: bool = False
    qualities: list[int] = dataclasses.field(default_factory=lambda: [10, 20])
    note: str | None = None


def test_defaults_yaml_then_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.001\nsteps: 5\nqualities: [30]\n")
    cfg = parse_config(Demo, ["--config", str(cfg_file), "--steps", "7", "--compile"])
    assert cfg == Demo(lr=0.001, steps=7, compile=True, qualities=[30])
    assert parse_config(Demo, []) == Demo()
    assert parse_config(Demo, ["--compile", "false", "--qualities", "10", "40"]).qualities == [10, 40]


def test_unknown_yaml_key_is_one_line_error(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("learning_rate: 1\n")
    with pytest.raises(UserError, match="unknown option.*learning_rate"):
        parse_config(Demo, ["--config", str(cfg_file)])
    with pytest.raises(UserError, match="not found"):
        parse_config(Demo, ["--config", str(tmp_path / "missing.yaml")])


def test_dump_roundtrip(tmp_path):
    cfg = Demo(lr=0.01, note="x")
    path = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["lr"] == 0.01
    assert parse_config(Demo, ["--config", str(path)]) == cfg


def test_dump_is_atomic_and_leaves_no_temporary(tmp_path):
    path = dump_config(Demo(lr=0.5), tmp_path / "config.yaml")
    dump_config(Demo(lr=0.25), path)
    assert yaml.safe_load(path.read_text())["lr"] == 0.25
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


@dataclasses.dataclass
class Renamed:
    epoch_patches: int | None = dataclasses.field(default=None, metadata={"help": "patches per epoch"})


@pytest.mark.parametrize("argv", [["--epoch-samples", "100"], ["--epoch-samples=100"]])
def test_a_renamed_flag_says_its_new_name(argv, capsys):
    with pytest.raises(UserError) as err:
        parse_config(Renamed, argv)
    assert str(err.value) == "--epoch-samples was renamed --epoch-patches (it always counted patches)"
    with pytest.raises(SystemExit):  # a config without the new option: argparse's own error
        parse_config(Demo, argv)
    assert "unrecognized arguments: --epoch-samples" in capsys.readouterr().err


def test_a_renamed_yaml_key_says_its_new_name(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("epoch_samples: 100\n")
    with pytest.raises(
        UserError, match=r"unknown option\(s\) epoch_samples .*; epoch_samples was renamed epoch_patches"
    ):
        parse_config(Renamed, ["--config", str(recipe)])


def test_preset_help_lists_every_preset():
    help_text = next(f.field.metadata["help"] for f in flat_fields(ModelConfig) if f.name == "preset")
    assert f"network: {', '.join(PRESETS)} " in help_text and {"unet-tiny", "unet"} <= set(PRESETS)
