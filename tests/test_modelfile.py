import os
import pickle

import pytest
import torch
from conftest import EvilPickle

from restorer.errors import UserError
from restorer.model import ModelConfig, build_model
from restorer.modelfile import export_weights, load_weights, read_meta, safe_torch_load


def test_export_load_roundtrip(tmp_path):
    cfg = ModelConfig(preset="tiny", condition_on_quality=True)
    model = build_model(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = export_weights(model, cfg, tmp_path, facts={"quality": "10-90", "step": 3})
    loaded, meta = load_weights(path)
    assert meta["facts"]["quality"] == "10-90" and meta["model"]["channels"] == 32
    x, q = torch.rand(2, 3, 16, 16), torch.tensor([10, 90])
    assert torch.equal(loaded(x, q), model(x, q))
    # the header alone also describes the model when model.json is lost
    (tmp_path / "model.json").unlink()
    assert read_meta(path)["model"]["preset"] == "tiny"


def test_pickle_weights_are_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(pickle.dumps({"w": EvilPickle(tmp_path / "PWNED_BY_PICKLE")}))
    (tmp_path / "model.json").write_text('{"model": {"preset": "tiny"}}')
    with pytest.raises(UserError, match="not a safetensors file"):
        load_weights(bad)
    evil_pt = tmp_path / "ckpt.pt"
    torch.save({"w": EvilPickle(tmp_path / "PWNED_BY_PICKLE")}, evil_pt)
    with pytest.raises(UserError, match="refused to load"):
        safe_torch_load(evil_pt)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_mismatched_and_missing(tmp_path):
    path = export_weights(build_model(ModelConfig(preset="tiny")), ModelConfig(preset="tiny"), tmp_path)
    (tmp_path / "model.json").write_text('{"model": {"preset": "small"}}')
    with pytest.raises(UserError, match="do not match"):
        load_weights(path)
    with pytest.raises(UserError, match="not found"):
        load_weights(tmp_path / "nope.safetensors")


def test_atomic_write_helpers(tmp_path):
    """restorer.fsutil: the one atomic writer (weights, eval tables, images, plots, configs,
    shard manifests): no temporary file left, OSError -> one-line UserError, no-clobber mode."""
    from restorer.fsutil import atomic_write, atomic_write_text

    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two" and os.listdir(target.parent) == ["a.txt"]

    def broken(tmp):
        tmp.write_text("partial")
        raise ValueError("encoder failed")

    with pytest.raises(ValueError, match="encoder failed"):
        atomic_write(target, broken)
    assert target.read_text() == "two" and os.listdir(target.parent) == ["a.txt"]
    with pytest.raises(FileExistsError):
        atomic_write(target, lambda tmp: tmp.write_text("three"), replace=False)
    assert target.read_text() == "two" and os.listdir(target.parent) == ["a.txt"]
    atomic_write(target.with_name("b.txt"), lambda tmp: tmp.write_text("b"), replace=False)
    assert target.with_name("b.txt").read_text() == "b"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"^{blocker / 'w.safetensors'}: cannot write \\("):
        atomic_write_text(blocker / "w.safetensors", "x")


def test_first_line():
    from restorer.errors import describe, first_line

    assert first_line(RuntimeError("\n  shape mismatch  \nsecond line")) == "shape mismatch"
    assert first_line(RuntimeError()) == "RuntimeError" and describe(MemoryError()) == "MemoryError"
    assert describe(OSError("x" * 500)) == "OSError: " + "x" * 200


def test_export_into_an_unwritable_place_is_one_line(tmp_path):
    cfg = ModelConfig(preset="tiny")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot"):
        export_weights(build_model(cfg), cfg, blocker / "w")
