"""The throughput path of `restorer restore`: with decoding and writing overlapping the network
(the default for several photos), the files are byte for byte those of --sequential; the stages
really overlap; at most two photos are held at once; a failure stays with its photo."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms
from skimage import data

from restorer.infer.pipeline import run_photos
from restorer.infer.restore import main as restore_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def folder_of_photos(src: Path) -> None:
    """Photos of every kind restore handles: colour and gray JPEGs, EXIF rotation with an ICC
    profile, 4:4:4 and 4:2:0, a PNG with alpha, and one truncated file."""
    src.mkdir()
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(data.astronaut()[:200, :264]).save(src / "a.jpg", quality=10)
    Image.fromarray(data.coffee()[:150]).save(src / "b.jpg", quality=10, exif=exif.tobytes(), icc_profile=icc)
    Image.fromarray(data.camera()[:123, :77]).save(src / "c.jpg", quality=10)
    Image.fromarray(data.chelsea()).save(src / "d.jpg", quality=10, subsampling=0)
    rgba = np.dstack([data.astronaut()[:64, :80], np.full((64, 80), 200, np.uint8)])
    Image.fromarray(rgba).save(src / "e.png")
    blob = (src / "a.jpg").read_bytes()
    (src / "f.jpg").write_bytes(blob[: len(blob) // 2])


def restore(args, capsys) -> tuple[int, list[str], list[str]]:
    code = restore_main([str(a) for a in args] + ["--no-progress"])
    cap = capsys.readouterr()
    timing = re.compile(r" \[\d+\.\ds\]$")
    return code, sorted(timing.sub("", line) for line in cap.out.splitlines()), cap.err.splitlines()


def test_overlapped_output_is_byte_identical_to_sequential(tmp_path, capsys, small_q10_weights):
    src = tmp_path / "in"
    folder_of_photos(src)
    runs = {}
    for name, extra in (("overlap", []), ("sequential", ["--sequential"])):
        out = tmp_path / name
        code, lines, err = restore([src, "-o", out, "--weights", small_q10_weights, "--quality", "10", *extra], capsys)
        files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        runs[name] = (
            code,
            [line.replace(str(out), "OUT") for line in lines],
            sorted(e for e in err if "error" in e),
            files,
        )
    assert runs["overlap"] == runs["sequential"]
    code, lines, errors, files = runs["overlap"]
    assert code == 1 and len(errors) == 2 and any("f.jpg: unreadable" in e for e in errors)  # + the summary
    assert sorted(files) == ["a.png", "b.png", "c.png", "d.png", "e.png"] and len(lines) == 5
    with Image.open(tmp_path / "overlap" / "e.png") as im:
        assert im.mode == "RGBA"
    with Image.open(tmp_path / "overlap" / "b.png") as im:
        assert im.info.get("icc_profile") and im.size == (150, 600)  # upright, profile kept
    sources = {p.name: p.read_bytes() for p in src.iterdir()}
    assert len(sources) == 6 and not [p for p in (tmp_path / "overlap").iterdir() if p.name.startswith(".")]


def stages(events: list, alive: set, peak: list, lock: threading.Lock, fail: set):
    """load/process/finish that record what runs when and how many photos are held."""

    def load(i):
        with lock:
            events.append(("load", i))
            alive.add(i)
            peak[0] = max(peak[0], len(alive))
        if ("load", i) in fail:
            alive.discard(i)
            raise ValueError(f"cannot load {i}")
        return i

    def process(i):
        events.append(("process", i))
        if ("process", i) in fail:
            alive.discard(i)
            raise ValueError(f"cannot process {i}")
        return i

    def finish(i):
        with lock:
            events.append(("finish", i))
            alive.discard(i)

    return load, process, finish


@pytest.mark.parametrize("overlap", [True, False])
def test_every_photo_once_in_order_at_most_two_held(overlap):
    events, alive, peak, lock = [], set(), [0], threading.Lock()
    fail = {("load", 2), ("process", 4)}
    load, process, finish = stages(events, alive, peak, lock, fail)
    failures = []
    run_photos(list(range(7)), load, process, finish, lambda i, exc: failures.append((i, str(exc))), overlap)
    assert failures == [(2, "cannot load 2"), (4, "cannot process 4")]
    assert [i for kind, i in events if kind == "finish"] == [0, 1, 3, 5, 6]
    assert [i for kind, i in events if kind == "process"] == [0, 1, 3, 4, 5, 6]
    assert peak[0] <= (2 if overlap else 1) and not alive


def test_loading_and_writing_overlap_the_network():
    """While photo 1 is in process(), photo 0 is written and photo 2 is read (on another thread)."""
    seen = {"finish 0": threading.Event(), "load 2": threading.Event()}
    during = {}

    def load(i):
        if i == 2:
            seen["load 2"].set()
        return i

    def process(i):
        if i == 1:  # the "network" of photo 1 waits to see its neighbours handled beside it
            during["finish 0"] = seen["finish 0"].wait(30)
            during["load 2"] = seen["load 2"].wait(30)
        return i

    def finish(i):
        if i == 0:
            seen["finish 0"].set()

    run_photos([0, 1, 2], load, process, finish, lambda i, exc: pytest.fail(str(exc)), True)
    assert during == {"finish 0": True, "load 2": True}
