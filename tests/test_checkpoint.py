import os
import pickle

import pytest
import torch

from restorer.checkpoint import export_weights, load_weights, read_meta, safe_torch_load
from restorer.errors import UserError
from restorer.model import ModelConfig, build_model


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


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
    bad.write_bytes(pickle.dumps({"w": _Evil()}))
    (tmp_path / "model.json").write_text('{"model": {"preset": "tiny"}}')
    with pytest.raises(UserError, match="not a safetensors file"):
        load_weights(bad)
    evil_pt = tmp_path / "ckpt.pt"
    torch.save({"w": _Evil()}, evil_pt)
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
