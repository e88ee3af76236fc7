"""bench/gpu_check.py: its tiny CPU mode runs every stage end to end (so the GPU check cannot rot),
with wandb, scikit-image and matplotlib made unimportable (the check must run without them);
a failing stage is reported and the others still run; the stage runner's time cap stops a whole
process group; training figures are read from metrics.jsonl as documented."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
STAGES = ("shards", "model", "loader", "train", "eval", "restore")
SUMMARY = re.compile(r"^gpu_check_train_patches_per_s: (nan|\d+)$")
# What "only torch, accelerate, Pillow and the project's own wheels" means for a test on a full
# venv: these import as if they were not installed (None in sys.modules) in every process.
ABSENT = ("wandb", "skimage", "matplotlib")


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_check(tmp_path: Path, bsds: Path) -> tuple[subprocess.CompletedProcess, dict]:
    blocker = tmp_path / "absent_modules"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT)
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--tiny",
            "--bsds",
            str(bsds),
            "--work-dir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, (json.loads(out.read_text()) if out.is_file() else {})


def stage_rows(stdout: str) -> dict[str, str]:
    """stage -> status, from the table's ``## stages`` section."""
    section = stdout.split("## stages", 1)[1]
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w+)\s+(ok|failed|timed out|not run)\s", section, re.M)}


@pytest.mark.slow
def test_tiny_mode_runs_every_stage_end_to_end_without_wandb(tmp_path, bsr_root):
    proc, doc = run_check(tmp_path, bsr_root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert stage_rows(proc.stdout) == dict.fromkeys(STAGES, "ok")
    for header in (
        "## model-only training step",
        "## loader alone",
        "## training:",
        "## restorer eval",
        "## restorer restore",
    ):
        assert header in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    m = SUMMARY.match(last)
    assert m and m.group(1) != "nan" and int(m.group(1)) >= 0, last

    st = doc["stages"]
    assert doc["mode"] == "tiny" and doc["device"] == "cpu"
    assert doc["gpu_check_train_patches_per_s"] > 0
    model = st["model"]["figures"]["rows"]["tiny/eager"]
    assert model["patches_per_s"] > 0 and model["flops_per_pixel"] > 0
    assert st["loader"]["figures"]["rows"]["1"]["patches_per_s"] > 0
    train = st["train"]["figures"]
    assert train["patches_per_s"] > 0 and 0.0 <= train["data_wait_frac"] <= 1.0
    assert set(train["val_gain"]) == {"10", "20", "30", "40"}
    assert all(abs(g) < 3.0 for g in train["val_gain"].values())  # a few steps from the identity
    assert not (Path(train["run_dir"]) / "wandb").exists()  # --tracker none: nothing of W&B
    evals = st["eval"]["figures"]["rows"]
    assert set(evals) == {"10", "20", "30", "40"}
    for row in evals.values():
        assert row["images"] == 3
        assert 20.0 < row["jpeg_psnr"] < 40.0 and 20.0 < row["restored_psnr"] < 40.0
        assert abs(row["gain"] - (row["restored_psnr"] - row["jpeg_psnr"])) < 1e-6
    jpeg = [evals[q]["jpeg_psnr"] for q in ("10", "20", "30", "40")]
    assert jpeg == sorted(jpeg)  # a higher quality JPEG is closer to the reference
    restore = st["restore"]["figures"]
    assert restore["exit"] == 0 and restore["seconds"] > 0 and restore["peak_rss_mib"] > 0
    assert Path(restore["weights"]) == Path(train["weights"])  # the model just trained
    assert restore["packaged"]["fast"]["exit"] == 0 and restore["packaged"]["fast"]["seconds"] > 0  # what ships
    assert "packaged 'fast': seconds" in proc.stdout


@pytest.mark.slow
def test_a_failing_stage_is_reported_and_the_others_still_run(tmp_path):
    empty = tmp_path / "not_bsds"
    empty.mkdir()
    proc, doc = run_check(tmp_path, empty)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = stage_rows(proc.stdout)
    assert rows["shards"] == "failed"
    assert rows["model"] == "ok" and rows["restore"] == "ok"  # need no data: still measured
    assert rows["loader"] == rows["train"] == rows["eval"] == "not run"
    assert "shards.err" in doc["stages"]["shards"]["note"]  # says where to look
    assert doc["stages"]["restore"]["figures"]["seconds"] > 0
    assert proc.stdout.strip().splitlines()[-1] == "gpu_check_train_patches_per_s: nan"


def test_stage_cap_stops_the_whole_process_group(tmp_path):
    gc = load_module()
    marker = tmp_path / "grandchild.pid"
    code = (  # child and grandchild would run an hour: returning at all means the cap stopped them
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])\n"
        f"open({str(marker)!r}, 'w').write(str(p.pid))\n"
        "print('{\"started\": 1}', flush=True)\n"
        "time.sleep(3600)\n"
    )
    t0 = time.perf_counter()
    rc, out = gc.run_child([sys.executable, "-c", code], 3.0, tmp_path / "capped")
    # 3 s cap + at most 30 s of SIGTERM/SIGKILL grace; the bound is 10x that and far below the hour
    assert rc is None and time.perf_counter() - t0 < 330
    assert gc.records(out) == [{"started": 1}]  # what it printed before the cap survives
    pid = int(marker.read_text())
    try:
        deadline = time.time() + 120  # gone at once normally; the wait only bounds a loaded machine
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"grandchild {pid} outlived the stage cap")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert "cap" in gc.why_failed(tmp_path / "capped", rc, 3.0)


def test_train_figures_skip_the_first_window_and_read_the_final_validation(tmp_path):
    gc = load_module()
    rows = [
        {"step": 10, "perf/patches_per_s": 50.0, "perf/data_wait_frac": 0.9},  # compiling, loader start
        {"step": 20, "perf/patches_per_s": 1000.0, "perf/data_wait_frac": 0.1},
        {"step": 30, "perf/patches_per_s": 1200.0, "perf/data_wait_frac": 0.0},
        {
            "step": 30,
            "val/gain": 1.0,
            "val/gain_q10": 1.2,
            "val/psnr_q10": 27.0,
            "val/gain_q20": 0.9,
            "val/psnr_q20": 29.0,
        },
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 31, "perf/pat')  # a torn last line
    fig = gc.train_figures(path)
    assert fig["patches_per_s"] == 1100.0 and fig["data_wait_frac"] == pytest.approx(0.05)
    assert fig["log_windows"] == 2 and fig["val_step"] == 30
    assert fig["val_gain"] == {"10": 1.2, "20": 0.9} and fig["val_psnr"] == {"10": 27.0, "20": 29.0}
    assert gc.train_figures(tmp_path / "missing.jsonl") == {}


def test_mfu_uses_the_peak_table_of_bench_train_step():
    gc = load_module()
    assert gc.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gc.gpu_peak_flops("Some Future GPU") is None and gc.gpu_peak_flops(None) is None


class Parsed(Exception):
    """Raised with the built config (or namespace) right after a successful parse: nothing runs."""


def fields(obj) -> dict:
    """The flat {option: value} of a config, as flags and YAML name them (the trainer's config is composed)."""
    from restorer.config import config_dict

    return config_dict(obj)


def test_full_mode_commands_parse_with_the_real_parsers(tmp_path, monkeypatch):
    """The GPU-mode commands (shard build, gpu-recipe training sized from the measured rates, eval,
    restore) are accepted by the real programs' parsers: a flag renamed there fails here, on CPU."""
    import argparse

    import yaml

    import restorer.cli
    import restorer.config
    from restorer.hardware import Choice
    from shard_tools.__main__ import main as shards_main

    gc = load_module()
    recipe = yaml.safe_load(gc.GPU_RECIPE.read_text())
    sizes = gc.Sizes.for_mode(False, recipe, 150.0)
    args = argparse.Namespace(bsds=tmp_path / "BSR", work_dir=tmp_path / "work", json=None, tiny=False)
    check = gc.Check(args, sizes, "cpu", "NVIDIA H100 80GB HBM3", recipe)
    check.precision, check.channels_last, check.compile = Choice("bf16", "t"), Choice(True, "t"), Choice(True, "t")
    commands = []
    monkeypatch.setattr(gc, "run_child", lambda cmd, cap, log, env=None: (commands.append(cmd), (1, ""))[1])
    check.run("shards", check.stage_shards)
    check.stages["shards"].status = "ok"
    check.stages["model"] = gc.Stage("model", "ok", figures={"rows": {"default/compiled": {"patches_per_s": 3000.0}}})
    check.stages["loader"] = gc.Stage("loader", "ok", figures={"rows": {"12": {"patches_per_s": 8000.0}}})
    check.run("train", check.stage_train)
    check.stages["train"].figures["weights"] = str(tmp_path / "model.safetensors")
    check.run("eval", check.stage_eval)
    shards_cmd, train_cmd, eval_cmd = commands
    assert check.stages["train"].status == "failed" and check.stages["train"].figures["steps"] == int(
        150 * 0.85 * 3000 / 64
    )  # the slower of model and loader, 85%, fills --train-seconds

    built = {}

    def build_then_stop(cls, overrides, source="config"):
        built[cls.__name__] = cfg = real_build(cls, overrides, source)
        raise Parsed(cfg)

    real_build = restorer.config.build_config
    monkeypatch.setattr(restorer.config, "build_config", build_then_stop)
    assert shards_cmd[1:4] == ["-m", "shard_tools", "build"]
    with pytest.raises(Parsed) as got:
        shards_main(shards_cmd[3:])
    assert fields(got.value.args[0])["bsds"] == [str(tmp_path / "BSR")]

    marker = train_cmd.index(str(REPO / "launch" / "train.py"))
    assert train_cmd[1:3] == ["-m", "accelerate.commands.launch"]
    spec = importlib.util.spec_from_file_location("gpu_check_train", REPO / "launch" / "train.py")
    train = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check_train"] = train
    spec.loader.exec_module(train)
    with pytest.raises(Parsed) as got:
        train.main(train_cmd[marker + 1 :])
    cfg = fields(got.value.args[0])
    assert cfg["preset"] == recipe["preset"] and cfg["batch_size"] == 64 and cfg["num_workers"] == 12
    assert cfg["train_splits"] == ["train", "val"] and cfg["val_split"] == "test" and cfg["tracker"] == "none"
    assert cfg["resampled"] is True and cfg["max_steps"] == 5976 and cfg["val_every"] == 5976
    assert str(cfg["mixed_precision"]) == "bf16" and str(cfg["compile"]).lower() == "true"

    real_parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, a=None, namespace=None):
        raise Parsed(real_parse(self, a, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    assert eval_cmd[1:4] == ["-m", "restorer.cli", "eval"]
    with pytest.raises(Parsed) as got:
        restorer.cli.main(eval_cmd[3:])
    assert got.value.args[0].quality == [10, 20, 30, 40] and got.value.args[0].split == "test"
    with pytest.raises(Parsed) as got:
        restorer.cli.main(
            sys.modules["gpu_check_children"].restore_argv(
                tmp_path / "a.jpg", tmp_path / "a.png", "w.safetensors", "cuda"
            )
        )
    assert got.value.args[0].device == "cuda"
