import dataclasses

import pytest
import yaml

from restorer.config import dump_config, parse_config
from restorer.errors import UserError


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
