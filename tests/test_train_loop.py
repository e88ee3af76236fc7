"""The training loop's parts IN-PROCESS (one CPU process, tiny model, tiny shards): the composed
config, TrainState, one optimizer step (accumulation, non-finite skip, EMA), the validation pass,
save / resume / export, the speed choices (auto precision per CPU, compile falling back to eager,
a compiled model's checkpoints), and a whole ``train()`` run."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import math
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, write_shards

from restorer.config import config_dict, dump_config, parse_config
from restorer.errors import AgreedError, UserError
from restorer.train.config import TrainConfig
from restorer.train.context import TrainContext, with_faults
from restorer.train.faults import Faults
from restorer.train.state import TrainState, Window

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [
    "--preset",
    "tiny",
    "--patch-size",
    "32",
    "--batch-size",
    "2",
    "--patches-per-image",
    "1",
    "--rescale-p",
    "0",
    "--rotate-p",
    "0",
    "--quality",
    "10",
    "--val-qualities",
    "10",
    "20",
    "--val-crop",
    "48",
    "--num-workers",
    "0",
    "--warmup-steps",
    "2",
    "--tracker",
    "none",
    "--mixed-precision",
    "no",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(
        tmp_path_factory.mktemp("loop") / "shards", splits={"train": 4, "val": 2}, samples_per_shard=2, tile=48
    )


def fresh_accelerator():
    """A new single-process CPU Accelerator (Accelerate keeps its state in singletons: reset them)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=True, mixed_precision="no")


@pytest.fixture
def accelerator():
    yield fresh_accelerator()
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def cfg_for(shards: Path, run_dir: Path, *extra: str) -> TrainConfig:
    return parse_config(TrainConfig, ["--shards", str(shards), "--run-dir", str(run_dir), *TINY, *extra])


# --- config -------------------------------------------------------------------------------------


def test_config_is_composed_and_flat(tmp_path):
    from restorer.data.config import StreamConfig
    from restorer.model import ModelConfig

    cfg = parse_config(
        TrainConfig,
        [
            "--quality",
            "20-30",
            "--train-splits",
            "train",
            "val",
            "--preset",
            "small",
            "--channels-last",
            "--epoch-patches",
            "64",
            "--grayscale",
        ],
    )
    assert cfg.data.quality == "20-30" and cfg.data.splits == ["train", "val"] and cfg.model.preset == "small"
    assert cfg.channels_last == "true" and cfg.epoch_patches == 64 and cfg.model.in_channels == 1
    # one definition: the defaults are the stream's and the model's own
    default = TrainConfig()
    assert default.data == StreamConfig() and default.model == ModelConfig()
    assert (default.data.shards, default.data.quality) == ("data/shards", "10-90")
    assert (default.mixed_precision, default.channels_last, default.compile) == ("auto", "auto", "auto")
    flat = config_dict(cfg)
    assert flat["train_splits"] == ["train", "val"] and flat["preset"] == "small" and "data" not in flat
    assert "splits" not in flat and "in_channels" not in flat
    # the dumped config is flat and reads back to the same config
    path = dump_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load(path.read_text())["quality"] == "20-30"
    assert parse_config(TrainConfig, ["--config", str(path)]) == cfg


def test_every_recipe_parses_and_says_auto():
    recipes = sorted((REPO / "launch" / "configs").glob("*.yaml"))
    estimator = REPO / "launch" / "configs" / "release_estimator.yaml"  # launch/train_estimator.py's config
    assert estimator in recipes
    spec = importlib.util.spec_from_file_location("train_estimator", REPO / "launch" / "train_estimator.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_estimator"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert parse_config(module.EstimatorConfig, ["--config", str(estimator)]).steps > 0
    for recipe in (r for r in recipes if r != estimator):
        cfg = parse_config(TrainConfig, ["--config", str(recipe)])
        assert (cfg.mixed_precision, cfg.channels_last, cfg.compile) == ("auto", "auto", "auto"), recipe.name
    bsds = parse_config(TrainConfig, ["--config", str(REPO / "launch/configs/bsds_cpu.yaml")])
    assert bsds.data.splits == ["train", "val"] and bsds.model.condition_on_quality


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--patch-size", "0"], "patch"),
        (["--quality", "0"], "quality"),
        (["--val-qualities", "101"], "quality"),
        (["--preset", "huge"], "preset"),
        (["--ema-decay", "1"], "--ema-decay"),
        (["--epoch-patches", "0"], "--epoch-patches"),
        (["--train-splits"], None),  # argparse: needs a value
    ],
)
def test_config_checks_are_one_line(argv, message):
    if message is None:
        with pytest.raises(SystemExit):
            parse_config(TrainConfig, argv)
        return
    with pytest.raises(UserError, match=message) as err:
        parse_config(TrainConfig, argv)
    assert "\n" not in str(err.value)


def test_old_epoch_samples_key_is_an_unknown_option(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("epoch_samples: 100\n")
    with pytest.raises(UserError, match="unknown option.*epoch_samples"):
        parse_config(TrainConfig, ["--config", str(recipe)])


# --- state --------------------------------------------------------------------------------------


def test_train_state_checkpoint_round_trip():
    state = TrainState(step=7, batches_taken=11, nonfinite_total=1, wandb_id="abcd")
    data = {"epoch": 4, "batch_in_epoch": 3, "data": {"epoch": 4, "done": 3}, "quarantine": [[2, 9]]}
    saved = {**state.to_checkpoint(data, world_size=2, global_batch=8, seed=0), "step": 7}
    assert saved["epoch"] == 4 and saved["batch_in_epoch"] == 3 and saved["global_batch"] == 8
    again = TrainState.from_checkpoint(saved)
    assert (again.step, again.batches_taken, again.nonfinite_total, again.wandb_id) == (7, 0, 1, "abcd")
    assert again.saved["data"] == {"epoch": 4, "done": 3} and again.saved["quarantine"] == [[2, 9]]


def test_window_figures():
    window = Window(t0=0.0)
    window.add_step(0.01, 2.0)
    window.add_step(0.03, 4.0)
    figures = window.figures(patches_per_step=8)
    assert figures["train/loss"] == pytest.approx(0.02) and figures["train/grad_norm"] == pytest.approx(3.0)
    assert figures["train/psnr"] == pytest.approx(10 * torch.log10(torch.tensor(50.0)).item())
    assert figures["perf/patches_per_s"] > 0 and 0 <= figures["perf/data_wait_frac"] <= 1


# --- one optimizer step -------------------------------------------------------------------------


def _setup(cfg, accelerator, faults=None) -> TrainContext:
    from restorer.data.loader import SharedEpoch
    from restorer.train.loop import make_loader, prepare_training

    model, ema, optimizer = prepare_training(cfg, accelerator, channels_last=False)
    loader = make_loader(cfg, accelerator, SharedEpoch(0))
    ctx = TrainContext(accelerator, cfg, Path(cfg.run_dir).resolve(), model, ema, optimizer, loader, False)
    return with_faults(ctx, faults)


def test_optimizer_step_accumulates_skips_nonfinite_and_updates_ema(shards, tmp_path, accelerator):
    from restorer.train.step import optimizer_step

    cfg = cfg_for(shards, tmp_path / "run", "--grad-accum", "2", "--max-nonfinite", "2")
    poison = Faults(nan_step=1, nan_forever=True)
    ctx = _setup(cfg, accelerator, poison)
    model, ema, state, bpe = ctx.model, ctx.ema, ctx.state, ctx.batches_per_epoch
    before = [p.detach().clone() for p in model.parameters()]
    result = optimizer_step(ctx)  # step 0: not poisoned yet
    assert result.taken and state.step == 1 and state.batches_taken == 2  # two micro-batches
    assert result.loss > 0 and result.grad_norm > 0 and ema.updates == 1 and result.wait >= 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    weights = [p.detach().clone() for p in model.parameters()]
    result = optimizer_step(ctx)
    assert not result.taken and state.step == 1 and state.nonfinite_total == 1 and state.consecutive_bad == 1
    assert math.isnan(result.loss) and math.isnan(result.mse)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters())) and ema.updates == 1
    with pytest.raises(AgreedError, match="2 non-finite losses in a row at step 1"):
        optimizer_step(ctx)
    # endless: batches keep coming across epoch boundaries
    assert state.batches_taken == 6 and ctx.loader.epoch == (6 - 1) // bpe


def test_idle_faults_leave_the_context_alone(shards, tmp_path, accelerator):
    ctx = _setup(cfg_for(shards, tmp_path / "run"), accelerator)
    assert with_faults(ctx, Faults()) is ctx and with_faults(ctx, None) is ctx and ctx.faults is None
    slow = with_faults(ctx, Faults(slow_rank=0, slow_seconds=0.01))
    assert slow.faults is not None and slow.forward is ctx.model and slow.state is ctx.state


@pytest.mark.parametrize("loss", ["l1", "charbonnier"])
def test_loss_option_trains_and_train_psnr_stays_the_mse_psnr(shards, tmp_path, accelerator, loss):
    from restorer.train.step import optimizer_step

    cfg = cfg_for(shards, tmp_path / "run", "--loss", loss)
    ctx = _setup(cfg, accelerator)
    result = optimizer_step(ctx)
    assert result.taken and result.loss > 0
    window = Window()
    window.add(result)  # the one way per-step figures travel
    figures = window.figures(cfg.batch_size)
    # an untrained model is the identity: its MSE is the JPEG's, far below its L1 (errors < 1)
    assert window.mse < window.loss and figures["train/psnr"] == pytest.approx(10 * math.log10(1 / window.mse))


def test_pixel_losses():
    from restorer.train.step import CHARBONNIER_EPS, pixel_loss

    out, target = torch.tensor([0.5, 0.1]), torch.tensor([0.3, 0.1])
    assert float(pixel_loss("mse", out, target)) == pytest.approx(0.02)
    assert float(pixel_loss("l1", out, target)) == pytest.approx(0.1)
    assert float(pixel_loss("charbonnier", out, target)) == pytest.approx(
        (math.sqrt(0.04 + CHARBONNIER_EPS**2) + CHARBONNIER_EPS) / 2
    )
    with pytest.raises(ValueError, match="unknown loss"):
        pixel_loss("ssim", out, target)


# --- validation, checkpoints, resume ------------------------------------------------------------


def test_val_pass_figures_are_consistent(shards, tmp_path, accelerator):
    from restorer.model import build_model
    from restorer.train.validation import val_pass

    cfg = cfg_for(shards, tmp_path / "run")
    ctx = _setup(cfg, accelerator)
    net = build_model(cfg.model_config())  # untrained residual model: the identity
    results, picture = val_pass(ctx, net, with_ssim=True)
    assert results["val/images"] == 4  # 2 tiles x 2 qualities
    for q in (10, 20):
        assert results[f"val/gain_q{q}"] == pytest.approx(0.0, abs=1e-9)  # identity = JPEG itself
        assert results[f"val/ssim_q{q}"] == pytest.approx(results[f"val/jpeg_ssim_q{q}"])
    assert picture.dtype.name == "uint8" and picture.shape[1] == 3 * 48
    empty = write_shards(tmp_path / "empty", splits={"train": 2, "val": 1}, samples_per_shard=1, tile=48)
    (empty / "val" / "shard-000000.tar").write_bytes(b"broken")
    with pytest.raises(UserError, match="no readable validation samples"):  # one line, never empty figures
        val_pass(dataclasses.replace(ctx, cfg=cfg_for(empty, tmp_path / "run")), net, with_ssim=False)


def test_save_resume_export_and_finished(shards, tmp_path, accelerator):
    from restorer.modelfile import load_weights
    from restorer.train.checkpoint import find_resume, finished_at, resume_state, save_and_export
    from restorer.train.step import optimizer_step

    run = tmp_path / "run"
    cfg = cfg_for(shards, run, "--max-steps", "1")
    ctx = _setup(cfg, accelerator)
    ctx.state = TrainState(wandb_id="w1", last_val={"val/psnr_q10": 30.0, "val/gain_q10": 0.5})
    model, ema = ctx.model, ctx.ema
    optimizer_step(ctx)
    path = save_and_export(ctx)
    assert find_resume("auto", run / "checkpoints") == path and finished_at(path, run, 1) == 1
    assert finished_at(path, run, 2) is None  # more steps asked: not finished
    with pytest.raises(UserError, match="--resume auto"):
        find_resume("none", run / "checkpoints")
    exported, meta = load_weights(run / "model.safetensors")
    assert meta["facts"]["steps"] == 1 and meta["facts"]["val_psnr"] == {"10": 30.0}
    assert all(torch.equal(a, b) for a, b in zip(exported.parameters(), ema.model.parameters()))

    accelerator = fresh_accelerator()  # a new process, as a resumed run is
    again_ctx = _setup(cfg, accelerator)
    model2, ema2 = again_ctx.model, again_ctx.ema
    again = resume_state(accelerator, path, ema2)
    assert (again.step, again.wandb_id, again.last_val["val/psnr_q10"]) == (1, "w1", 30.0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), ema2.model.parameters()))


# --- speed choices ------------------------------------------------------------------------------


@pytest.mark.parametrize("native, expected", [(False, ("fp32", False, False)), (True, ("bf16", True, False))])
def test_auto_precision_follows_the_cpu(monkeypatch, native, expected):
    from restorer import hardware
    from restorer.train.speed import choose_speed

    why = "simulated CPU " + ("with" if native else "without") + " native bf16"
    monkeypatch.setattr(hardware, "cpu_bf16_capability", lambda: (native, why))
    speed = choose_speed("auto", "auto", "auto", "cpu")
    assert (speed.precision.value, speed.channels_last.value, speed.compile.value) == expected
    assert speed.precision.reason == why and why in speed.summary()
    assert speed.record()["precision"] == {"value": expected[0], "reason": why}
    # an explicit setting wins over the machine's rule
    explicit = choose_speed("bf16", "false", "true", "cpu")
    assert (explicit.precision.value, explicit.channels_last.value, explicit.compile.value) == ("bf16", False, True)
    assert explicit.precision.reason == "set explicitly"
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        choose_speed("fp16", "auto", "auto", "cpu")


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog, shards, tmp_path, accelerator):
    from restorer.train.speed import compiled_forward, smoke_step

    class Broken(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            raise RuntimeError("backend compiler failed\nlong traceback line")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken(model))
    cfg = cfg_for(shards, tmp_path / "run")
    ctx = _setup(cfg, accelerator)
    model, smoke = ctx.model, smoke_step(ctx)
    with caplog.at_level(logging.WARNING):
        forward, why = compiled_forward(model, smoke, wanted=True)
    assert forward is model and "torch.compile failed" in why and "running eager" in why and "\n" not in why
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "torch.compile failed" in warnings[0].getMessage()
    assert compiled_forward(model, smoke, wanted=False) == (model, None)


def test_compiled_model_checkpoint_resumes_and_exports_loadable_weights(monkeypatch, shards, tmp_path, accelerator):
    """torch.compile with the 'eager' backend (works on any CPU, no C compiler needed): the wrapper
    is a real OptimizedModule; what is saved and exported must be the module under it."""
    from safetensors.torch import load_file

    from restorer.modelfile import load_weights
    from restorer.train.checkpoint import resume_state, save_and_export
    from restorer.train.speed import compiled_forward, smoke_step
    from restorer.train.step import optimizer_step

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    run = tmp_path / "run"
    cfg = cfg_for(shards, run, "--max-steps", "2")
    ctx = _setup(cfg, accelerator)
    model = ctx.model
    forward, why = compiled_forward(model, smoke_step(ctx), wanted=True)
    assert why is None and forward is not model and hasattr(forward, "_orig_mod")
    assert all(p.grad is None for p in model.parameters())  # the smoke step left no gradient behind
    ctx.forward = forward
    for _ in range(2):
        assert optimizer_step(ctx).taken
    path = save_and_export(ctx)
    for name in ("model.safetensors", "ema.safetensors"):
        assert not [k for k in load_file(str(path / name)) if "_orig_mod" in k], name
    exported, meta = load_weights(run / "model.safetensors")  # strict load into a fresh model
    assert meta["facts"]["steps"] == 2
    accelerator = fresh_accelerator()
    again = _setup(cfg, accelerator)
    model2, ema2 = again.model, again.ema
    assert resume_state(accelerator, path, ema2).step == 2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(exported(x), ema2.model(x))


# --- the whole run, in-process ------------------------------------------------------------------


def test_train_runs_in_process_and_records_speed_choices(shards, tmp_path, accelerator, capsys):
    from restorer.train.loop import train

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    run = tmp_path / "run"
    cfg = cfg_for(shards, run, "--max-steps", "3", "--save-every", "2", "--val-every", "2", "--log-every", "1")
    try:
        assert train(cfg) == 0
        out = capsys.readouterr().out
        assert "speed: precision fp32 (set explicitly)" in out and "done: 3 steps" in out
        info = json.loads((run / "run_info.json").read_text())
        assert (info["mixed_precision"], info["mixed_precision_reason"]) == ("no", "set explicitly")
        assert info["channels_last"] is False and info["compiled"] is False and info["end_step"] == 3
        assert "CPU" in info["channels_last_reason"] and "CPU" in info["compile_reason"]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
        assert train(cfg) == 0 and "nothing to do" in capsys.readouterr().out  # finished: a second run does nothing
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
