"""Shared fixtures: tiny shards in the shard builder's format, made from real photos that
scikit-image ships, so loader and training tests do not depend on the builder's speed."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_BSR = REPO.parent / "shared" / "datasets" / "BSR"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


def real_photos() -> list[np.ndarray]:
    """Colour photographs shipped inside scikit-image (no download)."""
    from skimage import data

    return [getattr(data, name)() for name in PHOTOS]


def write_shards(out: Path, *, splits: dict[str, int] | None = None, samples_per_shard: int = 4,
                 tile: int = 192, seed: int = 0) -> Path:
    """Write ``out/<split>/shard-%06d.tar`` + ``out/manifest.json`` + ``sizes.json`` with PNG tiles
    of the real photos, in the builder's contract format. ``splits`` maps split -> sample count."""
    import webdataset as wds

    splits = splits or {"train": 12, "val": 4}
    rng = np.random.default_rng(seed)
    photos = real_photos()
    manifest = {"format": 1, "encoding": "png", "splits": {}, "sources": {"default": {}},
                "skipped": [], "config": {"fixture": True}}
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
                    crop = np.ascontiguousarray(photo[y:y + tile, x:x + tile])
                    if crop.ndim == 2:
                        crop = np.stack([crop] * 3, axis=-1)
                    buf = io.BytesIO()
                    Image.fromarray(crop).save(buf, format="PNG", compress_level=1)
                    meta = {"source": "default", "source_id": f"{PHOTOS[i % len(PHOTOS)]}_{i}", "split": split,
                            "orig_size": [photo.shape[1], photo.shape[0]],
                            "tile": {"y": y, "x": x, "h": tile, "w": tile}, "sha256": ""}
                    sink.write({"__key__": f"default/{split}_{i}/{y}_{x}", "png": buf.getvalue(),
                                "json": json.dumps(meta).encode()})
            data = path.read_bytes()
            shards.append({"path": f"{split}/{name}", "samples": n, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
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


from objstore import http_faults, s3_bucket, s3_server  # noqa: E402,F401 (fixtures: local S3 and HTTP servers)
