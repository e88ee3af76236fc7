import pytest

from restorer.cli import main as cli_main
from restorer.model import PRESETS, ModelConfig, build_model, count_parameters, flops_per_pixel


def _rows(text: str) -> dict[str, list[str]]:
    lines = text.strip().splitlines()
    assert lines[0].split()[:4] == ["preset", "C", "N", "cond"]
    return {line.split()[0]: line.split() for line in lines[2:] if line.split()[0] in PRESETS}


def test_all_presets_table(capsys):
    assert cli_main(["model-info", "--all"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == list(PRESETS)
    assert rows["seed"][4] == "313,066"
    model = build_model(ModelConfig(preset="default"))
    assert rows["default"][4] == f"{count_parameters(model):,}"
    assert float(rows["default"][5]) == pytest.approx(flops_per_pixel(model) / 1e3, abs=0.05)
    assert float(rows["default"][6]) == pytest.approx(3 * flops_per_pixel(model) * 128 * 128 / 1e9, abs=0.005)


def test_overrides_and_conditioning(capsys):
    assert (
        cli_main(["model-info", "--preset", "default", "--channels", "96", "--units", "12", "--condition-on-quality"])
        == 0
    )
    row = _rows(capsys.readouterr().out)["default"]
    model = build_model(ModelConfig(preset="default", channels=96, units=12, condition_on_quality=True))
    assert row[1:4] == ["96", "12", "True"] and row[4] == f"{count_parameters(model):,}"


def test_unknown_preset_is_one_line(capsys):
    assert cli_main(["model-info", "--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model preset 'huge'") and err.count("\n") == 1
