"""Shared fixtures: tiny shards in the shard builder's format, made from real photos that
scikit-image ships, so loader and training tests do not depend on the builder's speed."""

from __future__ import annotations

import faulthandler
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from restorer.data.degrade import jpeg_roundtrip
from restorer.model import ModelConfig, build_model
from restorer.modelfile import export_weights

REPO = Path(__file__).resolve().parents[1]
SHARED_BSR = REPO.parent / "shared" / "datasets" / "BSR"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


def pytest_unconfigure(config):
    """CI once timed out after the summary line: something kept pytest from exiting. Should that happen
    again, print every thread's stack and exit non-zero after 120 s instead of waiting out CI's limit."""
    import multiprocessing

    for proc in multiprocessing.active_children():
        target = getattr(proc, "_target", None)
        print(
            f"\nconftest: child process still running at exit: {proc.name} pid {proc.pid} daemon {proc.daemon} "
            f"target {getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}",
            flush=True,
        )
    faulthandler.dump_traceback_later(120, exit=True)


def real_photos() -> list[np.ndarray]:
    """Colour photographs shipped inside scikit-image (no download)."""
    from skimage import data

    return [getattr(data, name)() for name in PHOTOS]


def write_shards(
    out: Path, *, splits: dict[str, int] | None = None, samples_per_shard: int = 4, tile: int = 192, seed: int = 0
) -> Path:
    """Write ``out/<split>/shard-%06d.tar`` + ``out/manifest.json`` + ``sizes.json`` with PNG tiles
    of the real photos, in the builder's contract format. ``splits`` maps split -> sample count."""
    import webdataset as wds

    splits = splits or {"train": 12, "val": 4}
    rng = np.random.default_rng(seed)
    photos = real_photos()
    manifest = {
        "format": 1,
        "encoding": "png",
        "splits": {},
        "sources": {"default": {}},
        "skipped": [],
        "config": {"fixture": True},
    }
    for split, count in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        shards, sizes = [], {}
        for first in range(0, count, samples_per_shard):
            name = f"shard-{first // samples_per_shard:06d}.tar"
            path = out / split / name
            n = min(samples_per_shard, count - first)
            with wds.TarWriter(str(path)) as sink:
                for i in range(first, first + n):
                    photo = photos[i % len(photos)]
                    y = int(rng.integers(0, photo.shape[0] - tile + 1))
                    x = int(rng.integers(0, photo.shape[1] - tile + 1))
                    crop = np.ascontiguousarray(photo[y : y + tile, x : x + tile])
                    if crop.ndim == 2:
                        crop = np.stack([crop] * 3, axis=-1)
                    buf = io.BytesIO()
                    Image.fromarray(crop).save(buf, format="PNG", compress_level=1)
                    meta = {
                        "source": "default",
                        "source_id": f"{PHOTOS[i % len(PHOTOS)]}_{i}",
                        "split": split,
                        "orig_size": [photo.shape[1], photo.shape[0]],
                        "tile": {"y": y, "x": x, "h": tile, "w": tile},
                        "sha256": "",
                    }
                    sink.write(
                        {
                            "__key__": f"default/{split}_{i}/{y}_{x}",
                            "png": buf.getvalue(),
                            "json": json.dumps(meta).encode(),
                        }
                    )
            data = path.read_bytes()
            shards.append(
                {
                    "path": f"{split}/{name}",
                    "samples": n,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
            sizes[name] = n
        (out / split / "sizes.json").write_text(json.dumps(sizes))
        manifest["splits"][split] = {"samples": count, "shards": shards}
        manifest["sources"]["default"][split] = count
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture
def tiny_shards(tmp_path: Path) -> Path:
    """12 train samples in 3 shards, 4 val samples in 1 shard, 192 px PNG tiles of real photos."""
    return write_shards(tmp_path / "shards")


@pytest.fixture
def bsr_root() -> Path:
    if not (SHARED_BSR / "BSDS500" / "data" / "images").is_dir():
        pytest.skip(f"real BSDS500 not found at {SHARED_BSR} (CI and developers have it in ../shared)")
    return SHARED_BSR


@pytest.fixture(scope="module")
def one_torch_thread():
    """The test machines are shared: one torch thread avoids OpenMP spin-waiting (seen: 10x slower
    with 2 threads while other processes run). Use with ``pytest.mark.usefixtures``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- training: real launches of launch/train.py (test_train.py, test_train_faults.py) -------------

TRAIN = REPO / "launch" / "train.py"
CPU2 = REPO / "launch" / "accelerate" / "cpu2.yaml"

# Overfitting setup: patch = whole 48 px tile, no augmentation, one quality: identical batches.
FIT_ARGS = [
    "--preset",
    "tiny",
    "--patch-size",
    "48",
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
    "--lr",
    "3e-3",
    "--warmup-steps",
    "3",
    "--log-every",
    "1",
    "--seed",
    "0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """No W&B credentials anywhere (so train.py must go offline by itself), CPU DDP."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WANDB_", "RESTORER_FAULTS", "ACCELERATE_")) and k not in ("RANK", "WORLD_SIZE")
    }
    env.update(
        NETRC=str(tmp / "no-netrc"),
        WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
        ACCELERATE_USE_CPU="true",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def launch(
    args: list[str], tmp: Path, *, processes: int = 2, faults: str | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file launch/accelerate/cpu2.yaml launch/train.py ARGS``."""
    env = clean_env(tmp, **({"RESTORER_FAULTS": faults} if faults else {}))
    if processes == 1:
        cmd = [sys.executable, str(TRAIN), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CPU2),
            "--num_processes",
            str(processes),
            "--main_process_port",
            str(free_port()),
            str(TRAIN),
            *args,
        ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_rows(run: Path) -> dict[int, dict]:
    """step -> the last train row logged at that step (a resumed run re-logs steps after its checkpoint)."""
    return {r["step"]: r for r in metrics(run) if "train/loss" in r}


def assert_same_weights(a: Path, b: Path) -> None:
    """The model and EMA weights of two checkpoint directories are bit-identical."""
    from safetensors.torch import load_file

    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys(), name
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{name}: weights differ"


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="session")
def fit_shards(tmp_path_factory) -> Path:
    """2 shards of 2 tiles of 48 px (one shard, two tiles, one batch per rank), 2 val tiles."""
    return write_shards(
        tmp_path_factory.mktemp("fit") / "shards", splits={"train": 4, "val": 2}, samples_per_shard=2, tile=48
    )


# --- hostile files -------------------------------------------------------------------------------


class EvilPickle:
    """A pickle whose loading would run ``touch MARK``: every loader must refuse it, so ``mark``
    must never appear."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


def rewrite_tar(path: Path, change) -> None:
    """Rewrite a tar shard, passing each (name, bytes) through ``change`` (None drops it)."""
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            out = change(name, payload)
            if out is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(out)
            tar.addfile(info, io.BytesIO(out))


# --- a small model trained in-test (restore, eval, compare, infer tests) ---------------------------

# A deliberately small network (16 channels, 1 unit) trained in-test, so it really improves JPEG.
SMALL = ModelConfig(preset="tiny", channels=16, units=1)
TRAIN_STEPS = 150


def photos() -> dict[str, np.ndarray]:
    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}


def train_small_q10(steps: int = TRAIN_STEPS, seed: int = 0) -> torch.nn.Module:
    """~150 Adam steps on 48 px patches from the LEFT halves of three photos at JPEG quality 10
    (whole photo compressed once, patches on the 8x8 grid); the right halves stay unseen."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pairs = []
    for ref in photos().values():
        half = ref[:, : (ref.shape[1] // 2) // 8 * 8]
        pairs.append((half, jpeg_roundtrip(ref, 10)[:, : half.shape[1]]))
    model = build_model(SMALL)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    size = 48
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(8):
            ref, jp = pairs[rng.integers(len(pairs))]
            y = int(rng.integers(0, (ref.shape[0] - size) // 8)) * 8
            x = int(rng.integers(0, (ref.shape[1] - size) // 8)) * 8
            xs.append(jp[y : y + size, x : x + size])
            ys.append(ref[y : y + size, x : x + size])
        x_t = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
        y_t = torch.from_numpy(np.stack(ys)).permute(0, 3, 1, 2).float() / 255
        loss = (model(x_t) - y_t).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


_TRAINED: dict[str, Path] = {}


@pytest.fixture(scope="session")
def small_q10_weights(tmp_path_factory) -> Path:
    """model.safetensors of the in-test trained model (facts quality "10"), trained once per session."""
    if "q10" not in _TRAINED:
        out = tmp_path_factory.mktemp("small_q10")
        _TRAINED["q10"] = export_weights(train_small_q10(), SMALL, out, facts={"quality": "10", "steps": TRAIN_STEPS})
    return _TRAINED["q10"]


from objstore import http_faults, s3_bucket, s3_server  # noqa: E402,F401 (fixtures: local S3 and HTTP servers)
