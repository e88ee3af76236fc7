"""The effective-quality estimator: which single-JPEG quality an image's damage matches, from pixels.

A small CNN (:class:`QualityNet`: a full-resolution 3x3 conv, three stride-2 3x3 convs, one more
3x3 conv, a global mean and a two-layer head; about 60k parameters, ~3 kMAC per input pixel) reads
RGB crops of the decoded image and predicts the *effective quality* that the training stream
labels chains with (:func:`restorer.data.degrade.effective_quality`: the single-save quality of
equal PSNR; a single save's own quality). It is trained on the same stream as the restoration
models (``launch/train_estimator.py``, real-world chains included), so it sees the true effective
quality of every chain.

On a photo, :func:`estimate` averages the predictions of up to ``MAX_CROPS`` crops of ``CROP`` px
spread over the image on the 8 px grid (the whole image if smaller), so its cost is bounded
(a few tens of ms on a CPU) whatever the photo's size. A gray image is read as R = G = B.

The weights file is safetensors whose metadata ``restorer_estimator`` holds the architecture and
the training facts (JSON); it is never unpickled. The packaged one is
``restorer/weights/estimator.safetensors`` (:func:`load_estimator` with no path).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from restorer.errors import UserError, first_line

CROP, MAX_CROPS = 128, 16
META_KEY = "restorer_estimator"
PACKAGED = Path(__file__).resolve().parent / "weights" / "estimator.safetensors"


class QualityNet(nn.Module):
    """uint8-derived RGB in [0, 1], [B, 3, H, W] (H, W >= 8) -> effective quality / 100, [B]."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = int(width)
        self.width = w
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Linear(2 * w, 2 * w), nn.ReLU(inplace=True), nn.Linear(2 * w, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3))).squeeze(1)


def crop_boxes(height: int, width: int, size: int = CROP, max_crops: int = MAX_CROPS) -> list[tuple[int, int, int]]:
    """(y, x, side) of up to ``max_crops`` square crops spread evenly over the image, their
    corners on the 8 px grid; one crop of the whole short side when the image is smaller."""
    side = min(size, height, width)
    per_axis = max(1, int(np.sqrt(max_crops)))
    ys = np.linspace(0, height - side, per_axis) // 8 * 8 if height > side else np.zeros(1)
    xs = np.linspace(0, width - side, per_axis) // 8 * 8 if width > side else np.zeros(1)
    return sorted({(int(y), int(x), side) for y in ys for x in xs})


def to_batch(pixels: np.ndarray, boxes: list[tuple[int, int, int]]) -> torch.Tensor:
    """The crops of a uint8 [H, W] or [H, W, 3] image as one float batch [N, 3, s, s] in [0, 1]."""
    rgb = np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels
    crops = np.stack([rgb[y : y + s, x : x + s] for y, x, s in boxes])
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255)


class Estimator:
    """A loaded :class:`QualityNet` with its facts; :meth:`estimate` reads one photo."""

    def __init__(self, net: QualityNet, meta: dict, path: Path, device: torch.device | str = "cpu"):
        self.net, self.meta, self.path = net.to(device).eval(), meta, path
        self.device = torch.device(device)

    def describe(self) -> str:
        return f"{self.path.name} ({self.meta.get('facts', {}).get('steps', '?')} steps)"

    def estimate(self, pixels: np.ndarray) -> float:
        """The effective quality (1..100, not rounded) of a decoded uint8 image."""
        boxes = crop_boxes(pixels.shape[0], pixels.shape[1])
        with torch.inference_mode():
            pred = self.net(to_batch(pixels, boxes).to(self.device)).float().mean().item()
        return float(min(100.0, max(1.0, 100.0 * pred)))


def save_estimator(net: QualityNet, path: str | Path, facts: dict) -> Path:
    """Write the weights and their metadata (architecture + ``facts``) as one safetensors file,
    atomically (a temporary name, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": 1, "model": {"width": net.width}, "facts": facts}
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path


def load_estimator(path: str | Path | None = None, device: torch.device | str = "cpu") -> Estimator:
    """The estimator in ``path`` (default: the packaged one); UserError with one line when the
    file is missing or is not an estimator."""
    path = Path(path) if path is not None else PACKAGED
    if not path.is_file():
        raise UserError(f"{path}: quality estimator not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            header = (fh.metadata() or {}).get(META_KEY)
        if header is None:
            raise UserError(f"{path}: not a quality estimator (no {META_KEY} metadata)")
        meta = json.loads(header)
        net = QualityNet(int(meta["model"]["width"]))
        net.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{path}: unusable quality estimator ({first_line(exc)})") from None
    return Estimator(net, meta, path, device)
