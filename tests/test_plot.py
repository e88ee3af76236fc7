import json

import numpy as np
from PIL import Image

from restorer.cli import main as cli_main
from restorer.plot import read_metrics


def _write_run(run_dir):
    run_dir.mkdir()
    rows = [{"step": s, "train/loss": 0.01 / (s + 1), "lr": 1e-3} for s in range(0, 50, 5)]
    rows += [{"step": s, "val/psnr_q10": 26 + s / 50, "val/gain_q10": s / 50} for s in (10, 30, 50)]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 55, "train/lo'  # killed mid-line
    (run_dir / "metrics.jsonl").write_text(text)


def test_read_metrics_skips_partial_line(tmp_path):
    _write_run(tmp_path / "run")
    series = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(series["train/loss"]) == 10
    assert series["val/psnr_q10"] == [(10, 26.2), (30, 26.6), (50, 27.0)]


def test_plot_writes_png(tmp_path):
    _write_run(tmp_path / "run")
    assert cli_main(["plot", str(tmp_path / "run")]) == 0
    png = tmp_path / "run" / "curves.png"
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 600
    assert img.std() > 10  # curves and text drawn, not a blank canvas
    assert sorted(p.name for p in png.parent.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temporary


def test_plot_missing_metrics_is_one_line(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metrics.jsonl" in err and str(tmp_path) in err
