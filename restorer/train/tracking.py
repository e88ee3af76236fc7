"""Experiment tracking: W&B through Accelerate's trackers, plus a local ``metrics.jsonl``.

Only the main process logs. ``metrics.jsonl`` is always written (one JSON object per log event,
with ``"step"``), so a run can be plotted (``restorer plot RUN``) without W&B.

W&B without credentials: wandb 0.31 raises ``UsageError: No API key configured`` in ``init``
unless ``WANDB_MODE`` is set. :func:`prepare_wandb` looks for credentials the way wandb does
(``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, a ``.netrc`` entry for the W&B host, an
``api_key`` in wandb's settings file) and, if there are none and ``WANDB_MODE`` is unset, sets
``WANDB_MODE=offline``; the run is then kept under ``RUN/wandb/`` and can be uploaded later with
``wandb sync RUN/wandb/offline-run-*``.
"""

from __future__ import annotations

import configparser
import json
import netrc
import os
import resource
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from restorer.errors import describe
from restorer.fsutil import atomic_write_text, jsonable


def _netrc_path() -> Path:
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        p = Path(name).expanduser()
        if p.exists():
            return p
    return Path("~/.netrc").expanduser()


def wandb_credentials_present() -> bool:
    """True when wandb would find an API key without asking (env, .netrc or settings file)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        auth = netrc.netrc(str(_netrc_path())).authenticators(host)
        if auth and auth[2]:
            return True
    except (OSError, netrc.NetrcParseError):
        pass
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", "~/.config/wandb")).expanduser()
    parser = configparser.ConfigParser()
    try:
        parser.read(config_dir / "settings")
        return bool(parser.get("default", "api_key", fallback=""))
    except configparser.Error:
        return False


def prepare_wandb(run_dir: Path) -> str | None:
    """Point W&B at ``run_dir`` and go offline when there are no credentials; return a note for
    the user (how to sync) when it went offline, else None. Call before ``init_trackers``."""
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    if os.environ.get("WANDB_MODE") or wandb_credentials_present():
        if os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
            return (
                f"W&B is offline (WANDB_MODE={os.environ['WANDB_MODE']}); upload later with: "
                f"wandb sync {run_dir}/wandb/offline-run-*"
            )
        return None
    os.environ["WANDB_MODE"] = "offline"
    return (
        f"W&B: no API key found (WANDB_API_KEY, ~/.netrc, `wandb login`), logging offline to "
        f"{run_dir}/wandb; upload later with: wandb sync {run_dir}/wandb/offline-run-*"
    )


class MetricsLog:
    """Append-only ``metrics.jsonl``; each line is flushed so a killed run loses at most one line.

    ``start_step`` (the step a run starts or resumes at): rows of a later step, logged by an earlier
    attempt after its last checkpoint, are dropped first (the file is rewritten atomically), so a
    resumed run does not log those steps twice; a line that is not JSON (cut short by a kill) is
    dropped too."""

    def __init__(self, path: Path, start_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if start_step is not None and path.is_file():
            self._truncate(int(start_step))
        self._fh = open(path, "a", buffering=1)

    def _truncate(self, start_step: int) -> None:
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue  # a partial line: the earlier attempt was killed while writing it
            if int(step) <= start_step:
                kept.append(line + "\n")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def write(self, values: dict[str, Any], step: int) -> None:
        row = {"step": int(step), **{k: jsonable(v) for k, v in values.items()}}
        self._fh.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._fh.close()


class Tracker:
    """Logs scalars to ``metrics.jsonl`` and the Accelerate trackers, images to W&B and PNGs;
    every method is a no-op on non-main processes. W&B never stops training: when a call to it fails
    (its service process was killed, e.g. by a SIGTERM sent to every process of a job), one warning
    is printed and the run goes on with ``metrics.jsonl`` alone."""

    def __init__(self, accelerator, run_dir: Path, use_wandb: bool, start_step: int | None = None):
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.use_wandb = use_wandb
        self.main = accelerator.is_main_process
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", start_step) if self.main else None

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.metrics is None:  # not the main process
            return
        self.metrics.write(values, step)
        if self.use_wandb:
            scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
            self._wandb(lambda: self.accelerator.log(scalars, step=step))

    def log_panel(self, panel: np.ndarray, step: int, caption: str) -> Path | None:
        """Save a uint8 HxWx3 panel as ``RUN/panels/step-XXXXXXX.png`` and send it to W&B."""
        if not self.main:
            return None
        out = self.run_dir / "panels" / f"step-{step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(panel).save(out)
        if self.use_wandb:
            import wandb  # lazy: ~1.8 s to import (python -X importtime, torch already loaded); --tracker wandb only

            run = self.accelerator.get_tracker("wandb")
            self._wandb(lambda: run.log({"val/panel": wandb.Image(panel, caption=caption)}, step=step))
        return out

    def _wandb(self, call) -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 -- whatever W&B raises, training goes on
            self.use_wandb = False
            print(f"warning: W&B stopped working ({describe(exc)}); logging to metrics.jsonl only", flush=True)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        # every rank reaches this line; tear the process group down together (a rank that
        # destroyed it while its peer was still writing was seen to abort in gloo's threads)
        self.accelerator.wait_for_everyone()
        if self.main and not self.use_wandb:  # W&B off, or failed during the run: nothing to finish
            self.accelerator.trackers = []
        self._wandb(self.accelerator.end_training)


# --- reading a .wandb file (offline runs keep everything there; used by tests and debugging) ---

_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version 0
_BLOCK = 32768
_REC = struct.Struct("<IHB")  # crc32, length, type (1 full, 2 first, 3 middle, 4 last)


def read_wandb_records(path: str | os.PathLike) -> Iterator[Any]:
    """Yield the ``wandb_internal_pb2.Record`` messages of a ``run-<id>.wandb`` file (a LevelDB-style
    log of 32 KiB blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2  # lazy: imports wandb (~1.8 s); tests and debugging only

    data = Path(path).read_bytes()
    ident, magic, version = _HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a .wandb transaction log")
    pos, pending = _HEADER.size, b""
    while pos + _REC.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _REC.size:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = _REC.unpack_from(data, pos)
        pos += _REC.size
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]  # generated protobuf: no stubs
            record.ParseFromString(pending)
            yield record
            pending = b""


def wandb_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``history`` rows of a .wandb file as dicts of key -> decoded JSON value."""
    rows = []
    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


# --- what the trainer prints and records ---------------------------------------------------------


def say(accelerator, msg: str) -> None:
    """Print ``msg`` once (main process), flushed."""
    if accelerator.is_main_process:
        print(msg, flush=True)


def peak_memory_gb(device) -> dict[str, float]:
    """Peak GPU memory of this process, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return {"perf/peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"perf/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def write_json(path: Path, obj: Any) -> None:
    """Write ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def code_version() -> str | None:
    """The git commit of the restorer checkout that runs (``+dirty`` with uncommitted changes to
    tracked files), for run_info.json and model cards; None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0 or not (root / ".git").exists():
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")
