"""Helpers for the shard builder tests: small datasets in each real download layout, seeded with
real photographs (scikit-image's shipped photos, BSDS500 where present), plus broken files."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BSR = Path(__file__).parents[1].parent / "shared/datasets/BSR"
BSR_IMAGES = BSR / "BSDS500" / "data" / "images"
PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "retina.jpg",
    "ihc.png",
)
_CACHE: list[np.ndarray] = []


def photo_crops(n: int, h: int = 150, w: int = 200, seed: int = 0) -> list[np.ndarray]:
    """``n`` different real-photo crops (uint8 RGB, h x w)."""
    from shard_tools.sources import skimage_data_dir

    if not _CACHE:
        _CACHE.extend(np.asarray(Image.open(skimage_data_dir() / n).convert("RGB")) for n in PHOTOS)
    photos = _CACHE
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        y = int(rng.integers(0, p.shape[0] - h + 1))
        x = int(rng.integers(0, p.shape[1] - w + 1))
        out.append(np.ascontiguousarray(p[y : y + h, x : x + w, :3]))
    return out


def png_bytes(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", **save)
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray, quality: int = 92, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, **save)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a huge RGB image."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


BROKEN = {  # name -> bytes; none of them is a usable image
    "empty.png": b"",
    "random.jpg": np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes(),
    "text.jpg": b"this is not a JPEG, just a text file with the wrong extension\n" * 10,
    "bomb.png": png_bomb(),
}


def truncated_jpeg() -> bytes:
    data = jpeg_bytes(photo_crops(1, seed=7)[0])
    return data[: len(data) // 2]


def decode_bytes(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def read_shards(out: Path) -> dict[str, dict]:
    """key -> {"pixels", "meta", "shard", "split", "ext"} for every sample in the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict] = {}
    dup = []
    for split, info in manifest["splits"].items():
        for s in info["shards"]:
            with tarfile.open(out / s["path"]) as tf:
                members = {}
                for m in tf:
                    key, ext = m.name.split("/")[-1].split(".", 1)
                    full = "/".join(m.name.split("/")[:-1] + [key])
                    members.setdefault(full, {})[ext] = tf.extractfile(m).read()
            for key, parts in members.items():
                ext = next(e for e in parts if e != "json")
                if key in samples:
                    dup.append(key)
                samples[key] = {
                    "pixels": decode_bytes(parts[ext]),
                    "meta": json.loads(parts["json"]),
                    "shard": s["path"],
                    "split": split,
                    "ext": ext,
                }
    assert not dup, f"samples in more than one shard: {dup[:5]}"
    return samples


def expected_tiles(arr: np.ndarray, tile: int, min_size: int) -> dict[str, np.ndarray]:
    """'<y>_<x>' -> the tile the builder must store for an upright RGB image."""
    h, w = arr.shape[:2]
    out = {}
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            th, tw = min(tile, h - y), min(tile, w - x)
            if th >= min_size and tw >= min_size:
                out[f"{y}_{x}"] = arr[y : y + th, x : x + tw]
    return out


def make_div2k(root: Path, train: list[np.ndarray], val: list[np.ndarray], zipped: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, arrs, start in (("DIV2K_train_HR", train, 1), ("DIV2K_valid_HR", val, 801)):
        files = {f"{name}/{start + i:04d}.png": png_bytes(a) for i, a in enumerate(arrs)}
        if zipped:
            with zipfile.ZipFile(root / f"{name}.zip", "w") as zf:
                zf.writestr(f"{name}/", b"")
                for member, data in files.items():
                    zf.writestr(member, data)
        else:
            for member, data in files.items():
                (root / member).parent.mkdir(parents=True, exist_ok=True)
                (root / member).write_bytes(data)
    return root


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def make_bsr_tgz(path: Path, files: dict[str, dict[str, bytes]]) -> Path:
    """``files``: split -> {name: bytes}, written as BSR/BSDS500/data/images/<split>/<name>."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for split, named in files.items():
            for name, data in named.items():
                _add(tf, f"BSR/BSDS500/data/images/{split}/{name}", data)
            _add(tf, f"BSR/BSDS500/data/images/{split}/Thumbs.db", b"\x00thumbs" * 50)
        _add(tf, "BSR/BSDS500/data/groundTruth/train/1.mat", b"MATLAB")
    return path
