#!/usr/bin/env python
"""One-command GPU check: every speed and quality figure of the pipeline on this machine, side by side.

Stages (each a child process with its own time cap; a stage that fails or runs out of time is
reported in the table and the others still run):

1. shards   ``python -m shard_tools build --bsds PATH`` -> BSDS500 shards (train, val, test)
2. model    training step alone (forward + backward + AdamW, synthetic batch) per model preset,
            eager and ``torch.compile``, with the precision and memory format ``restorer.hardware``
            picks (bf16 + channels_last on a recent GPU); MFU = 3 x forward FLOPs x pixels/s over
            the card's dense bf16 peak (bench/train_step.py's table)
3. loader   ``restorer.data.make_train_loader`` alone (the gpu recipe's patches, resampled shards)
            at 1, 6 and 12 workers, patches/s
4. train    ``accelerate launch launch/train.py --config launch/configs/gpu.yaml`` on the BSDS500
            shards (train+val; validation on test), sized to ``--train-seconds`` from the two stages
            above; patches/s and data-wait fraction from RUN/metrics.jsonl, final val gain per quality
5. eval     ``restorer eval`` of that model on the BSDS500 test split at q10/20/30/40 (RGB PSNR)
6. restore  ``restorer restore`` of a synthetic 6000x4000 JPEG: seconds end to end, peak GPU memory;
            then the same with each packaged model (restorer/weights: fast, quality where installed)

No network and no W&B (``--tracker none``); besides the project's own modules it needs only torch,
accelerate, numpy, Pillow, webdataset (+ braceexpand), jpeglib, safetensors, PyYAML and tqdm
(never wandb, scikit-image or matplotlib). Without CUDA (or with ``--tiny``) the same stages run
with tiny sizes in a minute or two on a CPU -- what ``tests/test_gpu_check.py`` runs so this
script cannot rot.

The last line is ``gpu_check_train_patches_per_s: <value>`` (``nan`` if training failed); all figures
go to ``--json``. The exit status is 1 when any stage failed.

examples:
  python bench/gpu_check.py               # one GPU: meant to take <= 8 min (stage caps: CAPS); not yet timed on one
  python bench/gpu_check.py --bsds data/BSR --work-dir runs/gpu_check --json runs/gpu_check.json
  python bench/gpu_check.py --tiny        # the CPU smoke version: 1.5 min on 2 busy cores
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(REPO), str(BENCH)):  # restorer, and bench/train_step.py as `train_step`
    if _p not in sys.path:
        sys.path.insert(0, _p)

import yaml  # noqa: E402

from benchcli import parser  # noqa: E402
from gpu_check_children import child_env, records, run_child, why_failed  # noqa: E402
from restorer import weights as packaged_weights  # noqa: E402
from restorer.errors import first_line  # noqa: E402

CHILD_SCRIPT = BENCH / "gpu_check_children.py"
GPU_RECIPE = REPO / "launch" / "configs" / "gpu.yaml"
DEFAULT_BSDS = REPO.parent / "shared" / "datasets" / "BSR"
QUALITIES = (10, 20, 30, 40)
SUMMARY = "gpu_check_train_patches_per_s"
# wall-clock cap of each stage, seconds (GPU mode; tiny mode uses TINY_CAPS)
CAPS = {"shards": 90, "model": 150, "loader": 75, "train": 150, "eval": 90, "restore": 90}  # train: + --train-seconds
TINY_CAPS = {"shards": 60, "model": 60, "loader": 60, "train": 120, "eval": 60, "restore": 60}


@dataclasses.dataclass
class Sizes:
    """Everything that differs between the real check and the tiny CPU version."""

    tiny: bool
    presets: tuple[str, ...]  # model stage, in this order (eager for all first, then compiled)
    compile_models: bool
    model_patch: int
    model_batch: int
    model_seconds: float  # timed seconds per (preset, variant)
    loader_workers: tuple[int, ...]
    loader_seconds: float
    patch: int  # loader and training patches
    batch: int
    patches_per_image: int
    shuffle_buffer: int
    train_workers: int
    train_seconds: float  # the training run is sized to take about this long
    restore_size: tuple[int, int]
    image_limit: int | None  # images per split for shards and eval (None = all)

    @classmethod
    def for_mode(cls, tiny: bool, recipe: dict, train_seconds: float) -> Sizes:
        if tiny:
            return cls(True, ("tiny",), False, 32, 4, 0.3, (1,), 1.0, 32, 4, 2, 8, 1, 0.0, (480, 320), 3)
        return cls(
            False,
            ("default", "tiny", "small", "large", "seed"),
            True,
            int(recipe["patch_size"]),
            int(recipe["batch_size"]),
            2.0,
            (1, 6, 12),
            8.0,
            int(recipe["patch_size"]),
            int(recipe["batch_size"]),
            int(recipe["patches_per_image"]),
            int(recipe["shuffle_buffer"]),
            int(recipe["num_workers"]),
            train_seconds,
            (6000, 4000),
            None,
        )


@dataclasses.dataclass
class Stage:
    name: str
    status: str = ""  # ok | failed | timed out | not run
    seconds: float = 0.0
    note: str = ""
    figures: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------ the stages


class Check:
    """The stages, run in order by :meth:`run`; each records its status, seconds, note and figures
    in ``self.stages``, and a later stage reads earlier figures (training steps, weights)."""

    def __init__(self, args, sizes: Sizes, device: str, gpu_name: str | None, recipe: dict):
        self.args, self.sizes, self.device, self.gpu_name, self.recipe = args, sizes, device, gpu_name, recipe
        self.work = args.work_dir.resolve()
        self.shards = self.work / "shards"
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.caps = TINY_CAPS if sizes.tiny else {**CAPS, "train": CAPS["train"] + sizes.train_seconds}
        self.stages: dict[str, Stage] = {}
        import torch

        from restorer import hardware

        dev = torch.device(device)
        self.precision = hardware.choose_precision("auto", dev)
        self.channels_last = hardware.choose_channels_last("auto", dev, str(self.precision.value))
        self.compile = hardware.choose_compile("auto", dev)

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def child(self, name: str, spec: dict) -> tuple[int | None, list[dict]]:
        code, out = run_child(
            self.python(str(CHILD_SCRIPT), name, json.dumps(spec)), self.caps[name], self.logs / name, child_env()
        )
        return code, records(out)

    def run(self, name: str, fn) -> Stage:
        stage = Stage(name)
        self.stages[name] = stage
        print(f"[gpu-check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            fn(stage)
            stage.status = stage.status or "ok"
        except Exception as exc:  # noqa: BLE001 (a bug in one stage must not stop the others)
            stage.status, stage.note = "failed", f"{type(exc).__name__}: {first_line(exc, 160)}"
        stage.seconds = time.perf_counter() - t0
        print(f"[gpu-check] {name}: {stage.status} in {stage.seconds:.0f} s {stage.note}".rstrip(), flush=True)
        return stage

    def no_shards(self, stage: Stage) -> bool:
        """True (and the stage marked not run) when the shards stage failed."""
        if self.stages["shards"].status == "ok":
            return False
        stage.status, stage.note = "not run", "no shards (see the shards stage)"
        return True

    def fail(self, stage: Stage, name: str, code: int | None) -> None:
        stage.status = "timed out" if code is None else "failed"
        stage.note = why_failed(self.logs / name, code, self.caps[name])

    # 1 ---------------------------------------------------------------------------------------
    def stage_shards(self, stage: Stage) -> None:
        cmd = self.python(
            "-m",
            "shard_tools",
            "build",
            "--bsds",
            str(self.args.bsds),
            "--out",
            str(self.shards),
            "--max-samples",
            "16",
            "--workers",
            str(min(8, os.cpu_count() or 1)),
            "--progress",
            "false",
        )
        if self.sizes.image_limit:
            cmd += ["--max-images", str(self.sizes.image_limit)]
        code, _ = run_child(cmd, self.caps["shards"], self.logs / "shards", child_env())
        manifest = self.shards / "manifest.json"
        if code != 0 or not manifest.is_file():
            return self.fail(stage, "shards", code)
        splits = json.loads(manifest.read_text())["splits"]
        stage.figures = {s: int(v["samples"]) for s, v in splits.items()}
        missing = {"train", "val", "test"} - set(splits)
        if missing:
            stage.status, stage.note = "failed", f"{self.shards}: no {', '.join(sorted(missing))} split (not BSDS500?)"

    # 2 ---------------------------------------------------------------------------------------
    def stage_model(self, stage: Stage) -> None:
        s = self.sizes
        spec = {
            "device": self.device,
            "presets": list(s.presets),
            "compile": s.compile_models,
            "condition_on_quality": bool(self.recipe.get("condition_on_quality", False)),
            "bf16": self.precision.value == "bf16",
            "channels_last": bool(self.channels_last.value),
            "patch": s.model_patch,
            "batch": s.model_batch,
            "seconds": s.model_seconds,
        }
        code, recs = self.child("model", spec)
        peak = gpu_peak_flops(self.gpu_name)
        rows = {}
        for r in recs:
            if "patches_per_s" in r:
                achieved = r["patches_per_s"] * 3 * r["flops_per_pixel"] * s.model_patch**2
                r["train_tflops"] = achieved / 1e12
                r["mfu"] = achieved / peak if peak else None
            rows[f"{r['preset']}/{r['variant']}"] = r
        stage.figures = {
            "rows": rows,
            "peak_bf16_flops": peak,
            "bf16": spec["bf16"],
            "channels_last": spec["channels_last"],
            "patch": s.model_patch,
            "batch": s.model_batch,
        }
        expected = len(s.presets) * (2 if s.compile_models else 1)
        errors = [k for k, r in rows.items() if "error" in r]
        if code != 0:
            self.fail(stage, "model", code)
            stage.note += f"; {len(rows)} of {expected} rows measured"
        elif errors:
            stage.status, stage.note = "failed", f"{', '.join(errors)}: {rows[errors[0]]['error']}"
        if not s.compile_models:
            skipped = "compiled rows skipped (tiny mode: compiling takes ~30 s on CPU)"
            stage.note = f"{stage.note}; {skipped}" if stage.note else skipped

    # 3 ---------------------------------------------------------------------------------------
    def stage_loader(self, stage: Stage) -> None:
        if self.no_shards(stage):
            return
        s = self.sizes
        spec = {
            "shards": str(self.shards),
            "splits": ["train", "val"],
            "patch": s.patch,
            "batch": s.batch,
            "patches_per_image": s.patches_per_image,
            "quality": str(self.recipe["quality"]),
            "shuffle_buffer": s.shuffle_buffer,
            "workers": list(s.loader_workers),
            "seconds": s.loader_seconds,
        }
        code, recs = self.child("loader", spec)
        stage.figures = {"rows": {str(r["workers"]): r for r in recs}}
        errors = [r for r in recs if "error" in r]
        if code != 0:
            self.fail(stage, "loader", code)
        elif errors or len(recs) < len(s.loader_workers):
            stage.status = "failed"
            stage.note = errors[0]["error"] if errors else "not every worker count was measured"

    # 4 ---------------------------------------------------------------------------------------
    def train_steps(self) -> int:
        """Optimizer steps that fill --train-seconds at the slower of the model's and the loader's rate."""
        s = self.sizes
        if s.tiny:
            return 12
        rates = []
        model_rows = self.stages.get("model", Stage("model")).figures.get("rows", {})
        variant = "compiled" if self.compile.value else "eager"
        rate = model_rows.get(f"{self.recipe.get('preset', 'default')}/{variant}", {}).get("patches_per_s")
        if rate:
            rates.append(rate)
        loader = self.stages.get("loader", Stage("loader")).figures.get("rows", {})
        rate = loader.get(str(s.train_workers), {}).get("patches_per_s")
        if rate:
            rates.append(rate)
        expected = 0.85 * min(rates) if rates else 1000.0
        return max(200, min(100_000, int(s.train_seconds * expected / s.batch)))

    def accelerate_config(self) -> Path:
        """One process on this machine's device, precision left to launch/train.py."""
        acc_cfg = self.work / "accelerate_1proc.yaml"
        acc_cfg.write_text(
            yaml.safe_dump(
                {
                    "compute_environment": "LOCAL_MACHINE",
                    "distributed_type": "NO",
                    "num_machines": 1,
                    "num_processes": 1,
                    "machine_rank": 0,
                    "mixed_precision": "no",
                    "use_cpu": self.device == "cpu",
                }
            )
        )
        return acc_cfg

    def train_flags(self, run_dir: Path, steps: int, val_crop: int) -> list[str]:
        """launch/train.py's flags: the GPU recipe for ``steps`` steps, the tiny sizes on a smoke run."""
        s = self.sizes
        flags = [
            "--config",
            str(GPU_RECIPE),
            "--shards",
            str(self.shards),
            "--train-splits",
            "train",
            "val",
            "--val-split",
            "test",
            "--run-dir",
            str(run_dir),
            "--tracker",
            "none",
            "--resampled",
            "--resume",
            "none",
            "--max-steps",
            str(steps),
            "--warmup-steps",
            str(max(1, min(2000, steps // 10))),
            "--val-every",
            str(steps),
            "--save-every",
            str(steps),
            "--keep-checkpoints",
            "1",
            "--log-every",
            str(max(1, steps // 20)),
            "--val-qualities",
            *map(str, QUALITIES),
            "--mixed-precision",
            str(self.precision.value),
            "--channels-last",
            str(bool(self.channels_last.value)).lower(),
            "--compile",
            str(bool(self.compile.value)).lower(),
            "--num-workers",
            str(s.train_workers),
        ]
        if s.tiny:
            flags += [
                "--preset",
                "tiny",
                "--patch-size",
                str(s.patch),
                "--batch-size",
                str(s.batch),
                "--patches-per-image",
                str(s.patches_per_image),
                "--shuffle-buffer",
                str(s.shuffle_buffer),
                "--val-crop",
                str(val_crop),
                "--val-batch-size",
                "4",
                "--panel-images",
                "0",
            ]
        return flags

    def stage_train(self, stage: Stage) -> None:
        if self.no_shards(stage):
            return
        s = self.sizes
        run_dir = self.work / time.strftime("train-%Y%m%d-%H%M%S")
        steps = self.train_steps()
        val_crop = 64 if s.tiny else int(self.recipe["val_crop"])
        acc_cfg = self.accelerate_config()
        flags = self.train_flags(run_dir, steps, val_crop)
        cmd = self.python(
            "-m", "accelerate.commands.launch", "--config_file", str(acc_cfg), str(REPO / "launch" / "train.py"), *flags
        )
        env = {**child_env(), "WANDB_MODE": "disabled"}
        if self.device == "cpu":
            env["ACCELERATE_USE_CPU"] = "true"
        code, _ = run_child(cmd, self.caps["train"], self.logs / "train", env)
        stage.figures = {
            "run_dir": str(run_dir),
            "steps": steps,
            "batch": s.batch,
            "val_crop": val_crop,
            "precision": self.precision.value,
            "channels_last": bool(self.channels_last.value),
            "compile": bool(self.compile.value),
            **train_figures(run_dir / "metrics.jsonl"),
        }
        weights = run_dir / "model.safetensors"
        stage.figures["weights"] = str(weights) if weights.is_file() else None
        if code != 0:
            self.fail(stage, "train", code)
        elif "val_gain" not in stage.figures:
            stage.status, stage.note = "failed", f"no final validation in {run_dir / 'metrics.jsonl'}"

    # 5 ---------------------------------------------------------------------------------------
    def stage_eval(self, stage: Stage) -> None:
        weights = self.stages["train"].figures.get("weights")
        if not weights:
            stage.status, stage.note = "not run", "no trained weights (training failed)"
            return
        out = self.work / "eval.json"
        cmd = self.python(
            "-m",
            "restorer.cli",
            "eval",
            "--weights",
            weights,
            "--images",
            str(self.args.bsds),
            "--split",
            "test",
            "--quality",
            *map(str, QUALITIES),
            "--metrics",
            "psnr",
            "--json",
            str(out),
            "--device",
            self.device,
            "--no-progress",
        )
        if self.sizes.image_limit:
            cmd += ["--limit", str(self.sizes.image_limit)]
        code, _ = run_child(cmd, self.caps["eval"], self.logs / "eval", child_env())
        if code != 0 or not out.is_file():
            return self.fail(stage, "eval", code)
        means = json.loads(out.read_text())["mean"]
        stage.figures = {
            "rows": {
                str(m["quality"]): {
                    "images": m["images"],
                    "jpeg_psnr": m["jpeg_psnr_rgb"],
                    "restored_psnr": m["restored_psnr_rgb"],
                    "gain": m["gain_psnr_rgb"],
                }
                for m in means
            }
        }

    # 6 ---------------------------------------------------------------------------------------
    def stage_restore(self, stage: Stage) -> None:
        work = self.work / "restore"
        work.mkdir(exist_ok=True)
        spec = {
            "size": list(self.sizes.restore_size),
            "work": str(work),
            "bsds": str(self.args.bsds),
            "weights": self.stages["train"].figures.get("weights"),
            "device": self.device,
            "preset": "tiny" if self.sizes.tiny else self.recipe.get("preset", "default"),
            "packaged": [n for n in packaged_weights.NAMES if packaged_weights.installed(n)],
        }
        code, recs = self.child("restore", spec)
        if code != 0 or not recs or recs[0].get("exit") != 0:
            return self.fail(stage, "restore", code if code != 0 or not recs else recs[0].get("exit"))
        stage.figures = {**recs[0], "packaged": {r["weights"]: r for r in recs[1:]}}
        if not spec["weights"]:
            stage.note = "untrained weights of the same preset (training failed; speed only)"


def gpu_peak_flops(name: str | None) -> float | None:
    """The card's dense bf16 peak from bench/train_step.py's table, or None (unknown card, CPU)."""
    from train_step import GPU_PEAK_BF16

    return next((v for k, v in GPU_PEAK_BF16.items() if name and k in name), None)


def train_figures(metrics: Path) -> dict:
    """patches/s (median over log windows after the first, which includes compiling and the
    loader's start), data-wait fraction (mean of the same windows), final val PSNR gains."""
    if not metrics.is_file():
        return {}
    rows = records(metrics.read_text(errors="replace"))
    perf = [r for r in rows if "perf/patches_per_s" in r]
    steady = perf[1:] or perf
    out: dict = {}
    if steady:
        out["patches_per_s"] = statistics.median(r["perf/patches_per_s"] for r in steady)
        out["data_wait_frac"] = statistics.fmean(r["perf/data_wait_frac"] for r in steady)
        out["log_windows"] = len(steady)
        out["peak_gpu_mem_gb"] = steady[-1].get("perf/peak_gpu_mem_gb")
    vals = [r for r in rows if "val/gain" in r]
    if vals:
        last = vals[-1]
        out["val_step"] = last["step"]
        out["val_gain"] = {str(q): last[f"val/gain_q{q}"] for q in QUALITIES if f"val/gain_q{q}" in last}
        out["val_psnr"] = {str(q): last[f"val/psnr_q{q}"] for q in QUALITIES if f"val/psnr_q{q}" in last}
    return out


# ------------------------------------------------------------------------------------- the table


def fmt(v, spec: str = ",.0f", missing: str = "-") -> str:
    return missing if v is None else format(v, spec)


def model_lines(check: Check) -> list[str]:
    """The model-only training step table (empty when that stage measured nothing)."""
    m, s = check.stages.get("model", Stage("model")).figures, check.sizes
    if not m.get("rows"):
        return []
    lines: list[str] = []
    peak = m["peak_bf16_flops"]
    lines.append(
        f"\n## model-only training step, batch {m['batch']} x {m['patch']} px, "
        f"{'bf16' if m['bf16'] else 'fp32'}{' + channels_last' if m['channels_last'] else ''}"
        + (f"; MFU over {peak / 1e12:,.0f} TFLOP/s dense bf16" if peak else "; MFU n/a (no known GPU peak)")
    )
    lines.append(
        f"{'preset':<8} {'C':>4} {'N':>3} {'GFLOP/patch':>11} {'eager p/s':>10} {'MFU':>6} "
        f"{'compiled p/s':>12} {'MFU':>6} {'compile s':>9} {'speedup':>7}"
    )
    for preset in s.presets:
        e, c = m["rows"].get(f"{preset}/eager", {}), m["rows"].get(f"{preset}/compiled", {})
        base = e or c
        if not base:
            lines.append(f"{preset:<8} not reached")
            continue
        ep, cp = e.get("patches_per_s"), c.get("patches_per_s")
        lines.append(
            f"{preset:<8} {base['channels']:>4} {base['units']:>3} "
            f"{3 * base['flops_per_pixel'] * m['patch'] ** 2 / 1e9:>11.2f} "
            f"{fmt(ep, ',.1f', 'error' if 'error' in e else '-'):>10} {fmt(e.get('mfu'), '.1%'):>6} "
            f"{fmt(cp, ',.1f', 'error' if 'error' in c else '-'):>12} {fmt(c.get('mfu'), '.1%'):>6} "
            f"{fmt(c.get('first_step_s'), '.0f'):>9} {f'{cp / ep:.2f}x' if ep and cp else '-':>7}"
        )
    return lines


def report(check: Check, total_s: float) -> list[str]:
    st, s = check.stages, check.sizes
    import torch

    lines = [
        f"== gpu check: {check.gpu_name or 'no GPU (CPU)'}; mode {'tiny' if s.tiny else 'full'}; "
        f"torch {torch.__version__}; {os.cpu_count()} CPUs; total {total_s / 60:.1f} min",
        f"   precision {check.precision.value} ({check.precision.reason}); channels_last "
        f"{check.channels_last.value}; compile in training {check.compile.value} ({check.compile.reason})",
    ]
    lines += model_lines(check)
    lo = st.get("loader", Stage("loader")).figures.get("rows", {})
    if lo:
        lines.append(
            f"\n## loader alone: {s.patch} px patches, {s.patches_per_image} per tile, quality "
            f"{check.recipe['quality']}, batch {s.batch}, resampled BSDS500 shards (train+val)"
        )
        lines.append(f"{'workers':>7} {'patches/s':>10} {'per worker':>10} {'first batch s':>13}")
        for w, r in lo.items():
            p = r.get("patches_per_s")
            lines.append(
                f"{w:>7} {fmt(p, ',.0f', 'error'):>10} {fmt(p and p / int(w), ',.0f'):>10} "
                f"{fmt(r.get('first_batch_s'), '.1f'):>13}"
            )
    t = st.get("train", Stage("train")).figures
    if t:
        gains = " ".join(f"q{q} {v:+.2f}" for q, v in t.get("val_gain", {}).items())
        lines.append(
            f"\n## training: launch/configs/gpu.yaml on BSDS500 train+val (val: test), {t.get('steps')} steps "
            f"x {t.get('batch')} patches, {t.get('precision')}, compile {t.get('compile')}, resampled"
        )
        lines.append(
            f"patches/s {fmt(t.get('patches_per_s'))}  data wait {fmt(t.get('data_wait_frac'), '.0%')}  "
            f"peak GPU mem {fmt(t.get('peak_gpu_mem_gb'), '.1f')} GB  "
            f"val gain (dB, {t.get('val_crop')} px crops) {gains or '-'}"
        )
    ev = st.get("eval", Stage("eval")).figures.get("rows", {})
    if ev:
        n = next(iter(ev.values()))["images"]
        lines.append(f"\n## restorer eval: BSDS500 test ({n} images), RGB PSNR dB, no border crop")
        lines.append("quality  JPEG dB  restored dB  gain")
        for q, r in ev.items():
            lines.append(f"q{q:<6} {r['jpeg_psnr']:>8.2f} {r['restored_psnr']:>12.2f} {r['gain']:>+5.2f}")
    r = st.get("restore", Stage("restore")).figures
    if r:
        w, h = s.restore_size
        lines.append(f"\n## restorer restore {w}x{h} ({r['megapixels']:.1f} MP) JPEG, end to end (decode, tiles, PNG)")
        lines.append(
            f"seconds {r['seconds']:.1f}  Mpix/s {r['megapixels'] / r['seconds']:.2f}  peak GPU mem "
            f"{fmt(r.get('peak_gpu_mib'), ',.0f')} MiB  peak RSS {r['peak_rss_mib']:,.0f} MiB"
        )
        for name, p in r.get("packaged", {}).items():  # restorer/weights/: the models that ship
            lines.append(
                f"packaged '{name}': seconds {p['seconds']:.1f}  exit {p['exit']}  peak GPU mem "
                f"{fmt(p.get('peak_gpu_mib'), ',.0f')} MiB"
            )
    lines.append(f"\n## stages\n{'stage':<8} {'status':<10} {'seconds':>7}  note")
    for stage in st.values():
        lines.append(f"{stage.name:<8} {stage.status:<10} {stage.seconds:>7.0f}  {stage.note}")
    return lines


def summary_value(check: Check) -> float | None:
    return check.stages.get("train", Stage("train")).figures.get("patches_per_s")


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument(
        "--bsds", type=Path, default=DEFAULT_BSDS, help=f"BSR folder or BSR_bsds500.tgz (default {DEFAULT_BSDS})"
    )
    ap.add_argument("--work-dir", type=Path, default=REPO / "runs" / "gpu_check", help="shards, runs and logs go here")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here (default WORK_DIR/gpu_check.json)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (automatic without CUDA): a CPU smoke run")
    ap.add_argument(
        "--train-seconds",
        type=float,
        default=120.0,
        help="size the training run's steps to about this long (plus start-up, compiling, validation)",
    )
    args = ap.parse_args(argv)

    import torch

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    device = "cpu" if tiny and not cuda else "cuda"
    if not args.bsds.exists():
        print(f"error: {args.bsds}: BSDS500 not found (pass --bsds: a BSR folder or BSR_bsds500.tgz)", file=sys.stderr)
        return 2
    recipe = yaml.safe_load(GPU_RECIPE.read_text())
    sizes = Sizes.for_mode(tiny, recipe, args.train_seconds)
    check = Check(args, sizes, device, torch.cuda.get_device_name(0) if cuda else None, recipe)
    print(
        f"[gpu-check] {'tiny (CPU smoke) ' if tiny else ''}check on {check.gpu_name or 'CPU'}; work dir "
        f"{check.work}; logs in {check.logs}",
        flush=True,
    )
    for name in ("shards", "model", "loader", "train", "eval", "restore"):
        check.run(name, getattr(check, f"stage_{name}"))
    total = time.perf_counter() - t0
    lines = report(check, total)
    print("\n".join(lines))
    doc = {
        "device": check.gpu_name or "cpu",
        "mode": "tiny" if tiny else "full",
        "total_seconds": total,
        "precision": check.precision.as_dict(),
        "channels_last": check.channels_last.as_dict(),
        "compile": check.compile.as_dict(),
        "stage_caps_s": check.caps,
        "stages": {k: dataclasses.asdict(v) for k, v in check.stages.items()},
        SUMMARY: summary_value(check),
    }
    from restorer.fsutil import atomic_write_text

    json_path = args.json or check.work / "gpu_check.json"
    atomic_write_text(json_path, json.dumps(doc, indent=1, default=str) + "\n")
    print(f"figures: {json_path}")
    value = summary_value(check)
    print(f"{SUMMARY}: {fmt(value, '.0f', 'nan')}")
    return 0 if all(st.status == "ok" for st in check.stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
