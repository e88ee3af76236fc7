"""python -m shard_tools build/verify/merge on small datasets in each real download layout."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_fixtures import (
    BROKEN,
    REPO,
    decode_bytes,
    expected_tiles,
    jpeg_bytes,
    make_bsr_tgz,
    make_div2k,
    photo_crops,
    png_bytes,
    read_shards,
    truncated_jpeg,
)

from restorer.errors import UserError
from shard_tools.__main__ import main
from shard_tools.build import build
from shard_tools.config import BuildConfig
from shard_tools.verify import verify

TILE, MIN = 64, 32
SMALL = dict(tile=TILE, min_size=MIN, workers=1, progress=False, max_samples=5)


def run(out: Path, **kw) -> dict:
    return build(BuildConfig(out=str(out), **{**SMALL, **kw}))


def check_image(samples: dict, key: str, upright: np.ndarray, split: str) -> None:
    want = expected_tiles(upright, TILE, MIN)
    got = {k.rsplit("/", 1)[1]: v for k, v in samples.items() if k.rsplit("/", 1)[0] == key}
    assert sorted(got) == sorted(want), key
    for pos, arr in want.items():
        s = got[pos]
        assert s["split"] == split and s["meta"]["split"] == split
        assert np.array_equal(s["pixels"], arr), f"{key}/{pos} pixels differ"
        y, x = map(int, pos.split("_"))
        assert s["meta"]["tile"] == {"y": y, "x": x, "h": arr.shape[0], "w": arr.shape[1]}
        assert s["meta"]["orig_size"] == [upright.shape[1], upright.shape[0]]


def check_counts(out: Path, manifest: dict, samples: dict) -> None:
    for split, info in manifest["splits"].items():
        assert info["samples"] == sum(1 for s in samples.values() if s["split"] == split)
        sizes = json.loads((out / split / "sizes.json").read_text())
        assert sizes == {Path(s["path"]).name: s["samples"] for s in info["shards"]}
        assert all(s["samples"] <= SMALL["max_samples"] for s in info["shards"])


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    """DIV2K zips, BSR tgz, Open Images folders + CSV with rotations, a generic folder."""
    root = tmp_path_factory.mktemp("inputs")
    crops = photo_crops(24, h=100, w=140, seed=11)
    d = {"root": root, "crops": crops}
    # DIV2K as the distributed zips, and as folders
    d["div2k_zip"] = make_div2k(root / "div2k_zip", crops[0:3], crops[3:5], zipped=True)
    d["div2k_dir"] = make_div2k(root / "div2k_dir", crops[0:2], crops[3:4], zipped=False)
    # BSR tgz: JPEGs (real BSDS crops when present), broken members, Thumbs.db
    bsr = {
        "train": {
            "100075.jpg": jpeg_bytes(crops[5]),
            "100080.jpg": jpeg_bytes(crops[6]),
            "empty.jpg": b"",
            "bad.jpg": truncated_jpeg(),
        },
        "val": {"3096.jpg": jpeg_bytes(crops[7])},
        "test": {"2018.jpg": jpeg_bytes(crops[8]), "bomb.jpg": BROKEN["bomb.png"]},
    }
    d["bsr_files"] = bsr
    d["bsr_tgz"] = make_bsr_tgz(root / "dl" / "BSR_bsds500.tgz", bsr)
    # Open Images: train_0/ and validation/ with the ids CSV (rotation in CCW degrees)
    oi = root / "openimages"
    ids = {
        "train": ["000a1249af2bc5f0", "000d1b6fe1fe8fe9", "0011ac1c7a5ce5f4"],
        "val": ["0001eeaf4aed83f9", "0004886b7d043cfd"],
    }
    rot = {
        "000a1249af2bc5f0": "90",
        "000d1b6fe1fe8fe9": "",
        "0011ac1c7a5ce5f4": "270",
        "0001eeaf4aed83f9": "180",
        "0004886b7d043cfd": "0.0",
    }
    uprights = {}
    for split, folder, base in (("train", "train_0", 9), ("val", "validation", 12)):
        (oi / folder).mkdir(parents=True)
        for i, image_id in enumerate(ids[split]):
            upright = crops[base + i]
            r = int(float(rot[image_id] or 0))
            stored = np.ascontiguousarray(np.rot90(upright, k=-r // 90))  # rotated CW by r
            data = jpeg_bytes(stored, quality=95)
            (oi / folder / f"{image_id}.jpg").write_bytes(data)
            # what the builder must produce: the decoded JPEG rotated r degrees CCW
            uprights[image_id] = (split, np.rot90(decode_bytes(data), k=r // 90))
    with open(oi / "validation-images-with-rotation.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ImageID", "Subset", "OriginalURL", "Rotation"])
        for image_id, r in rot.items():
            w.writerow([image_id, "x", "https://example.invalid/x.jpg", r])
    d["openimages"], d["oi_uprights"] = oi, uprights
    # generic folder: nested PNG/JPEG, EXIF-rotated JPEG, grayscale, RGBA, broken files, a .txt
    f = root / "photos"
    (f / "trip" / "day1").mkdir(parents=True)
    files = {}
    for i in range(6):
        files[f"trip/day1/img.{i}.png"] = crops[14 + i]
        (f / f"trip/day1/img.{i}.png").write_bytes(png_bytes(crops[14 + i]))
    gray = crops[20][..., 0]
    (f / "gray.png").write_bytes(png_bytes(gray))
    files["gray.png"] = np.stack([gray] * 3, -1)
    exif = Image.Exif()
    exif[0x0112] = 3  # upside down
    buf = io.BytesIO()
    upside_down = np.ascontiguousarray(crops[21][::-1, ::-1])
    Image.fromarray(upside_down).save(buf, "PNG", exif=exif.tobytes())
    (f / "rotated.png").write_bytes(buf.getvalue())
    files["rotated.png"] = crops[21]
    for name, data in BROKEN.items():
        (f / "broken").mkdir(exist_ok=True)
        (f / "broken" / name).write_bytes(data)
    (f / "broken" / "truncated.jpg").write_bytes(truncated_jpeg())
    (f / "notes.txt").write_text("not an image, ignored")
    (f / "Thumbs.db").write_bytes(b"\0" * 100)
    d["folder"], d["folder_files"] = f, files
    return d


def test_all_layouts_together(tmp_path, layouts):
    out = tmp_path / "shards"
    m = run(
        out,
        div2k=[str(layouts["div2k_zip"])],
        bsds=[str(layouts["bsr_tgz"])],
        openimages=[str(layouts["openimages"])],
        folder=[str(layouts["folder"])],
        downscale_lossy=1.0,
        val_fraction=0.3,
    )
    samples = read_shards(out)
    check_counts(out, m, samples)
    crops = layouts["crops"]
    # DIV2K zips: train 0001..0003, valid 0801..0802
    for i in range(3):
        check_image(samples, f"div2k/{i + 1:04d}", crops[i], "train")
    for i in range(2):
        check_image(samples, f"div2k/{801 + i:04d}", crops[3 + i], "val")
    # BSDS tgz: JPEG decoded exactly as Pillow decodes the file
    for split, named in layouts["bsr_files"].items():
        for name, data in named.items():
            if name in ("empty.jpg", "bad.jpg", "bomb.jpg"):
                continue
            check_image(samples, f"bsds/{name[:-4]}", decode_bytes(data), split)
    # Open Images: rotation from the CSV applied (counter-clockwise)
    for image_id, (split, upright) in layouts["oi_uprights"].items():
        check_image(samples, f"openimages/{image_id}", upright, split)
    # folder: split by path hash, EXIF orientation, gray -> RGB, dots in ids replaced
    folder_keys = {k.rsplit("/", 1)[0] for k in samples if k.startswith("folder/")}
    for rel, upright in layouts["folder_files"].items():
        key = "folder/photos/" + rel.rsplit(".", 1)[0].replace(".", "_")
        assert key in folder_keys, key
        split = samples[next(k for k in samples if k.startswith(key + "/"))]["split"]
        check_image(samples, key, upright, split)
    assert {s["split"] for k, s in samples.items() if k.startswith("folder/")} == {"train", "val"}
    # counts per source/split equal what is in the shards
    images = {}
    for k, s in samples.items():
        images.setdefault(s["meta"]["source"], {}).setdefault(s["split"], set()).add(k.rsplit("/", 1)[0])
    assert m["sources"] == {src: {sp: len(v) for sp, v in per.items()} for src, per in images.items()}
    assert m["sources"]["bsds"] == {"train": 2, "val": 1, "test": 1}
    # skipped: every broken file listed once with a reason; Thumbs.db / .txt ignored silently
    reasons = {Path(s["path"].split(":")[-1]).name: s["reason"] for s in m["skipped"]}
    assert len(reasons) == len(m["skipped"])
    assert set(reasons) == {
        "empty.jpg",
        "bad.jpg",
        "bomb.jpg",
        "empty.png",
        "random.jpg",
        "text.jpg",
        "bomb.png",
        "truncated.jpg",
    }
    assert "empty" in reasons["empty.png"] and "bomb" in reasons["bomb.png"]
    assert "not an image" in reasons["text.jpg"] and "truncated" in reasons["truncated.jpg"]
    # shards mix sources (seeded interleave), keys follow the contract
    train_shards = {}
    for k, s in samples.items():
        assert k.split("/")[0] == s["meta"]["source"] and "." not in k
        if s["split"] == "train":
            train_shards.setdefault(s["shard"], set()).add(s["meta"]["source"])
    first_half = sorted(train_shards)[: len(train_shards) // 2]
    assert len(set().union(*(train_shards[p] for p in first_half))) >= 3
    assert m["encoding"] == "webp" and all(s["ext"] == "webp" for s in samples.values())
    assert m["config"]["tile"] == TILE and m["format"] == 1


def test_div2k_folders_default_and_downscale(tmp_path, layouts):
    out = tmp_path / "a"
    run(out, div2k=[str(layouts["div2k_dir"])], openimages=[str(layouts["openimages"] / "train_0")], encoding="png")
    samples = read_shards(out)
    check_image(samples, "div2k/0001", layouts["crops"][0], "train")
    check_image(samples, "div2k/0801", layouts["crops"][3], "val")
    oi = [s for k, s in samples.items() if k.startswith("openimages/")]
    assert oi and all(s["meta"]["size"] == [70, 50] for s in oi)  # 0.5 x upright 140x100
    assert all(s["ext"] == "png" for s in samples.values())


def test_default_photos_split(tmp_path):
    out = tmp_path / "d"
    m = run(out, tile=512, min_size=128)
    assert m["sources"]["default"]["train"] >= 5 and m["sources"]["default"]["val"] >= 2
    samples = read_shards(out)
    ids = {s["split"]: set() for s in samples.values()}
    for s in samples.values():
        ids[s["split"]].add(s["meta"]["source_id"])
    assert not (ids["train"] & ids["val"]) and len(ids["val"]) >= 2


def test_rerun_rewrites_nothing_and_verify(tmp_path, layouts):
    out = tmp_path / "s"
    kw = dict(div2k=[str(layouts["div2k_zip"])], folder=[str(layouts["folder"])])
    m1 = run(out, **kw)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    m2 = run(out, **kw)
    assert m2 == m1
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == before
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert main(["verify", str(out)]) == 0
    shard = out / m1["splits"]["train"]["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify(out)
    assert len(problems) == 1 and str(shard) in problems[0] and "sha256" in problems[0]
    assert main(["verify", str(out)]) == 1
    # a changed setting is another build: refused with one line, nothing touched; --overwrite rebuilds
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    with pytest.raises(UserError, match=r"holds shards of another build \(train: .*--overwrite") as err:
        run(out, **kw, seed=1)
    assert "\n" not in str(err.value)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == before
    m3 = run(out, **kw, seed=1, overwrite=True)
    assert m3["splits"]["train"]["samples"] == m1["splits"]["train"]["samples"]
    assert verify(out) == []


def test_jobs_and_merge(tmp_path, layouts):
    kw = dict(div2k=[str(layouts["div2k_zip"])], bsds=[str(layouts["bsr_tgz"])])
    whole = run(tmp_path / "whole", **kw)
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, p in enumerate(parts):  # --verify, --progress, --workers differ: not the content
        run(p, **kw, num_jobs=2, job_index=i, verify=bool(i), progress=bool(i), workers=1 + i)
    a, b = read_shards(parts[0]), read_shards(parts[1])
    assert a and b and not set(a) & set(b)
    assert main(["merge", str(tmp_path / "merged"), *map(str, parts)]) == 0
    merged = read_shards(tmp_path / "merged")
    assert set(merged) == set(read_shards(tmp_path / "whole"))
    assert main(["verify", str(tmp_path / "merged")]) == 0
    mm = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert mm["sources"] == whole["sources"]
    assert sorted(s["path"] for s in mm["skipped"]) == sorted(s["path"] for s in whole["skipped"])


def test_user_errors_in_process(tmp_path, layouts):
    with pytest.raises(UserError, match="unknown DIV2K layout"):
        run(tmp_path / "o", div2k=[str(layouts["folder"])])
    with pytest.raises(UserError, match="unknown Open Images layout"):
        run(tmp_path / "o", openimages=[str(layouts["folder"])])
    with pytest.raises(UserError, match="unknown BSDS500 layout"):
        run(tmp_path / "o", bsds=[str(layouts["folder"])])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shard_tools", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_cli_missing_input_and_unwritable_output(tmp_path, layouts):
    missing = tmp_path / "no" / "such" / "BSR"
    r = _cli("build", "--out", str(tmp_path / "o"), "--bsds", str(missing))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {missing}: --bsds input not found"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli("build", "--out", str(blocker / "shards"), "--folder", str(layouts["folder"]))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(blocker / "shards") in lines[0] and "not writable" in lines[0]
    assert not (tmp_path / "o").exists()
    for cmd in ("build", "verify", "merge"):
        h = _cli(cmd, "--help")
        assert h.returncode == 0 and "examples:" in h.stdout


def test_openimages_tar_bsr_parent_folder_and_max_images(tmp_path, layouts):
    import tarfile

    oi = tmp_path / "oi"
    oi.mkdir()
    src = layouts["openimages"]
    with tarfile.open(oi / "validation.tar.gz", "w:gz") as tf:
        tf.add(src / "validation", arcname="validation")
    (oi / "validation-images-with-rotation.csv").write_bytes((src / "validation-images-with-rotation.csv").read_bytes())
    bsr_parent = tmp_path / "datasets"
    for split, named in layouts["bsr_files"].items():
        d = bsr_parent / "BSR" / "BSDS500" / "data" / "images" / split
        d.mkdir(parents=True)
        for name, data in named.items():
            (d / name).write_bytes(data)
        (d / "Thumbs.db").write_bytes(b"\0" * 64)
    out = tmp_path / "o"
    m = run(out, openimages=[str(oi)], bsds=[str(bsr_parent)], downscale_lossy=1.0)
    samples = read_shards(out)
    for image_id, (split, upright) in layouts["oi_uprights"].items():
        if split == "val":
            check_image(samples, f"openimages/{image_id}", upright, split)
    assert m["sources"]["bsds"] == {"train": 2, "val": 1, "test": 1}
    m2 = run(tmp_path / "cap", bsds=[str(bsr_parent)], folder=[str(layouts["folder"])], max_images=1)
    assert all(n <= 1 for per in m2["sources"].values() for n in per.values())


def test_same_file_twice_is_written_once_across_splits(tmp_path):
    """A photo reachable twice (here: in DIV2K train and valid, and twice within train) is
    written once: its repeats are skipped as 'duplicate of <first path>', also with --workers,
    after a resume mid-train, and when val is rebuilt on its own."""
    c = photo_crops(3, h=100, w=140, seed=21)
    root = make_div2k(tmp_path / "div2k", [c[0], c[1], c[2], c[0], c[1], c[2]], [c[0], c[2]], zipped=False)
    kw = dict(div2k=[str(root)])
    m = run(tmp_path / "a", **kw)
    dups = [s for s in m["skipped"] if s["reason"].startswith("duplicate of ")]
    assert sorted(s["split"] for s in dups) == ["train"] * 3 + ["val"] * 2
    train_written = {v["meta"]["file"] for v in read_shards(tmp_path / "a").values()}
    assert len(train_written) == 3 and m["splits"].get("val", {"samples": 0})["samples"] == 0
    assert all(s["reason"].removeprefix("duplicate of ") in train_written for s in dups)
    assert run(tmp_path / "b", **kw, workers=2) == {
        **m,
        "config": m["config"] | {"out": str(tmp_path / "b"), "workers": 2},
    }
    # resume: keep only train's first journalled shard (its first image), drop the rest
    out = tmp_path / "a"
    journal = out / "train" / ".journal.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:2]) + "\n")
    for p in sorted((out / "train").glob("shard-*.tar"))[1:]:
        p.unlink()
    shutil.rmtree(out / "val")
    assert run(out, **kw) == m
