"""``--init-weights``: start a run from trained weights instead of a fresh initialisation (a
fine-tune). The weights file must describe the same architecture as the run's config; it is read
with safetensors (:func:`restorer.modelfile.load_weights`), never unpickled. A run that resumes
from a checkpoint loads the checkpoint over these weights, so resuming a fine-tune is exact.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from restorer import weights as packaged
from restorer.errors import UserError
from restorer.model import ModelConfig
from restorer.modelfile import load_weights


def init_path(spec: str) -> Path:
    """``fast`` / ``quality`` -> the packaged file; anything else a weights file or run folder."""
    return packaged.packaged_path(spec) if spec in packaged.NAMES else Path(spec)


def init_from_weights(model: nn.Module, model_cfg: ModelConfig, spec: str) -> None:
    """Copy the weights named by ``spec`` into ``model`` (UserError when they are another network)."""
    net, meta = load_weights(init_path(spec), "cpu")
    want, have = dataclasses.asdict(model_cfg.resolved()), ModelConfig(**meta["model"]).resolved()
    if dataclasses.asdict(have) != want:
        raise UserError(f"--init-weights {spec}: its architecture {dataclasses.asdict(have)} is not the run's {want}")
    model.load_state_dict(net.state_dict(), strict=True)
