"""Inference weights: ``model.safetensors`` + ``model.json``, loaded without unpickling anything.

``model.json`` holds the architecture (a :class:`~restorer.model.ModelConfig`) and training facts
(qualities trained on, steps, metrics), so a weights file is self-describing. Training state
(optimizer, EMA, RNG) lives in Accelerate checkpoints and is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from restorer.errors import UserError, first_line
from restorer.fsutil import atomic_write, atomic_write_text
from restorer.model import ModelConfig, build_model

WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"
FORMAT_VERSION = 1


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, torch.nn.Module):
                model = inner
                break
        else:
            return model


def export_weights(
    model: torch.nn.Module, model_cfg: ModelConfig, out_dir: str | os.PathLike, facts: dict[str, Any] | None = None
) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/model.json`` atomically; return the weights path.

    ``facts`` is free-form training information (e.g. ``{"quality": "10-90", "step": 5000,
    "val_psnr": {...}}``); ``quality`` is used by ``restorer restore`` to pick among several weights.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the weights folder ({exc.strerror or exc})") from None
    model = unwrap(model)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    meta = {"format_version": FORMAT_VERSION, "model": dataclasses.asdict(model_cfg.resolved()), "facts": facts or {}}
    weights_path, meta_path = out / WEIGHTS_NAME, out / META_NAME
    atomic_write(weights_path, lambda p: save_file(state, str(p), metadata={"restorer": json.dumps(meta)}))
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return weights_path


def read_meta(weights: str | os.PathLike) -> dict[str, Any]:
    """Architecture + facts of a weights file: ``model.json`` beside it, else the safetensors header."""
    path = Path(weights)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    side = path.with_name(META_NAME) if path.name == WEIGHTS_NAME else path.with_suffix(".json")
    try:
        if side.is_file():
            return json.loads(side.read_text())

        with safe_open(str(path), framework="pt") as fh:
            header = (fh.metadata() or {}).get("restorer")
        if header is None:
            raise UserError(f"{path}: no model.json beside it and no restorer metadata inside")
        return json.loads(header)
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a restorer weights file ({first_line(exc)})") from None


def load_weights(
    weights: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model that ``model.json`` describes and load ``model.safetensors`` into it.

    Never unpickles: a file that is not safetensors (a pickle, say) is refused with one line.
    """
    path = Path(weights)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    meta = read_meta(path)
    try:
        model_cfg = ModelConfig(**meta["model"])
        model = build_model(model_cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: model description is malformed ({exc})") from None
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a safetensors file ({first_line(exc)})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(
            f"{path}: weights do not match the {model_cfg.preset} architecture ({first_line(exc)})"
        ) from None
    return model.to(device).eval(), meta


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers; a pickle that would run code
    is refused with a one-line :class:`UserError`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint file not found") from None
    except Exception as exc:  # UnpicklingError, RuntimeError for a zip that is not a checkpoint
        raise UserError(f"{path}: refused to load (not a plain-tensor checkpoint: {first_line(exc)})") from None
