"""The options restore / eval / compare share: one definition, one check each, the same precision rule."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from restorer import hardware
from restorer.infer import options
from restorer.infer.compare import main as compare_main
from restorer.infer.evaluate import main as eval_main
from restorer.infer.restore import main as restore_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def inputs(tmp_path):
    Image.fromarray(data.astronaut()[:64, :64]).save(tmp_path / "ref.png")
    Image.fromarray(data.astronaut()[:64, :64]).save(tmp_path / "photo.jpg", quality=30)
    return tmp_path


def _commands(d):
    return {
        "restore": (restore_main, [str(d / "photo.jpg"), "-o", str(d / "out")]),
        "eval": (eval_main, ["--images", str(d), "--quality", "10", "--metrics", "psnr"]),
        "compare": (compare_main, [str(d / "ref.png"), "-o", str(d / "panel.png")]),
    }


@pytest.mark.parametrize("command", ["restore", "eval", "compare"])
@pytest.mark.parametrize(
    "bad, words",
    [
        (["--tile", "-1"], "--tile must be >= 0"),
        (["--tile-overlap", "-2"], "--tile-overlap must be >= 0"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--max-pixels", "0"], "--max-pixels must be positive"),
        (["--bf16", "--precision", "fp32"], "contradicts --precision fp32"),
    ],
)
def test_every_command_checks_the_shared_flags_the_same_way(inputs, capsys, command, bad, words):
    main, argv = _commands(inputs)[command]
    code = main(argv + ["--weights", "none", "--no-progress"] + bad)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err


@pytest.mark.parametrize("command", ["restore", "eval", "compare"])
def test_every_command_takes_the_shared_flags(inputs, capsys, command):
    main, argv = _commands(inputs)[command]
    code = main(
        argv
        + [
            "--weights",
            "none",
            "--no-progress",
            "--precision",
            "fp32",
            "--tile",
            "32",
            "--tile-overlap",
            "4",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--max-pixels",
            "100000",
        ]
    )
    assert code == 0, capsys.readouterr().err


def test_precision_auto_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: (False, "CPU lacks AVX512-BF16 and AMX"))
    choice = options.resolve_precision("auto", cpu)
    assert choice.value == "fp32" and "lacks" in choice.reason
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: (True, "CPU has AMX (native bf16)"))
    assert options.resolve_precision("auto", cpu).value == "bf16"
    assert options.resolve_precision("fp32", cpu).value == "fp32"  # explicit wins
    assert options.resolve_precision("bf16", cpu).reason == "set explicitly"


def test_bf16_flag_is_precision_bf16_and_the_choice_is_logged_once(inputs, capsys, caplog, monkeypatch):
    from restorer.infer import engine

    seen = []
    real = engine.Restorer.__post_init__

    def spy(self):
        seen.append(self.precision)
        real(self)

    monkeypatch.setattr(engine.Restorer, "__post_init__", spy)
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: (False, "CPU lacks AVX512-BF16 and AMX"))
    from restorer.model import ModelConfig, build_model
    from restorer.modelfile import export_weights

    cfg = ModelConfig(preset="tiny")
    w = export_weights(build_model(cfg), cfg, inputs / "w", facts={"quality_range": [10, 90]})
    with caplog.at_level(logging.INFO, logger="restorer.infer"):
        for flags in (["--bf16"], ["--precision", "bf16"], []):
            caplog.clear()
            out = inputs / f"o{len(seen)}"
            assert (
                restore_main(
                    [str(inputs / "photo.jpg"), "-o", str(out), "--weights", str(w), "--device", "cpu", "--no-progress"]
                    + flags
                )
                == 0
            )
            lines = [r.getMessage() for r in caplog.records if "precision" in r.getMessage()]
            assert len(lines) == 1
    assert seen == ["bf16", "bf16", "fp32"]
    assert "precision fp32 (CPU lacks AVX512-BF16 and AMX)" in lines[0]


def test_bf16_output_is_close_to_fp32():
    from pathlib import Path

    from restorer.data.degrade import jpeg_roundtrip
    from restorer.infer.engine import Restorer
    from restorer.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    img = jpeg_roundtrip(data.astronaut()[:96, :96], 20)
    meta = {"model": {"in_channels": 3}}
    out = {
        prec: Restorer(model.eval(), meta, Path("m"), torch.device("cpu"), 0, None, prec).restore(img, 20)
        for prec in ("fp32", "bf16")
    }
    diff = np.abs(out["fp32"].astype(int) - out["bf16"].astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.5
