"""Weights that ship inside the package: ``restorer/weights/<name>.safetensors`` + ``<name>.json``.

``--weights fast`` and ``--weights quality`` (in ``restore``, ``eval`` and ``compare``) name these
files; with no ``--weights`` at all, :func:`default_name` picks ``quality`` on a GPU (where it is
installed) and ``fast`` otherwise. The files are installed as package data (``pyproject.toml``,
``[tool.setuptools.package-data]``), so a wheel or an editable install finds them beside this
module. A name whose file is absent raises one :class:`~restorer.errors.UserError` line saying it
is not installed; the names always mean these files, so a local file or folder called ``fast``
is given as ``./fast``.
"""

from __future__ import annotations

from pathlib import Path

from restorer.errors import UserError

FOLDER = Path(__file__).resolve().parent
NAMES = ("fast", "quality")


def installed(name: str) -> bool:
    path = FOLDER / f"{name}.safetensors"
    return path.is_file() and path.with_suffix(".json").is_file()


def default_name(device_type: str) -> str:
    """The packaged model used when no ``--weights`` is given: ``quality`` on CUDA where it is
    installed, else ``fast``."""
    return "quality" if device_type == "cuda" and installed("quality") else "fast"


def packaged_path(name: str) -> Path:
    """``fast`` / ``quality`` -> its ``.safetensors`` file in this folder; UserError if absent."""
    if name not in NAMES:
        raise ValueError(f"not a packaged model name: {name!r} (one of {', '.join(NAMES)})")
    path = FOLDER / f"{name}.safetensors"
    if not installed(name):
        raise UserError(
            f"--weights {name}: the packaged '{name}' model is not installed ({path} + .json "
            f"missing); give --weights PATH to a model.safetensors you trained"
        )
    return path
