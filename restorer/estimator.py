"""The effective-quality estimator: which single-JPEG quality an image's damage matches, from pixels.

It predicts the *effective quality* that the training stream labels chains with
(:func:`restorer.data.degrade.effective_quality`: the single-save quality of equal PSNR; a single
save's own quality) from the decoded pixels, in two small steps:

1. :func:`features` of a crop (770 numbers): the 8x8 grid is found where the luma steps between
   neighbouring pixels are largest (the JPEG block borders; any phase, so a cropped screenshot
   works too), and the next-largest grid too (an earlier save's, on a shifted grid); on each, the
   8x8 DCT of luma and of both chroma planes, per frequency the log of the mean magnitude (how much
   of each frequency survived the quantisation) and, for luma, the shares of coefficients below 1,
   2 and 4 (how many were quantised away); plus the block borders' step against the mean step.
2. :class:`QualityNet`: a two-hidden-layer MLP (about 54k parameters, its input standardisation
   kept as buffers) from the features to quality / 100.

A first attempt, a 27k-parameter strided CNN on the raw crops, stayed at the constant predictor's
error (MAE 21 quality steps after 400 steps of 32 patches, against 22 for the median) while DCT
features with this MLP, fitted in seconds, reached 7.2 on held-out 96 px patches (chains
included; 11k patches to fit) with one grid and 6.5 with the second grid and the 2 and 4
thresholds added (the measurements are in the README notes of issue 19).

On a photo, :func:`Estimator.estimate` averages the predictions of up to ``MAX_CROPS`` crops of
``CROP`` px spread over the image (the whole image if smaller), so its cost is bounded (about
0.1 s on a CPU core) whatever the photo's size. A gray image has zero chroma.

The weights file is safetensors whose metadata ``restorer_estimator`` holds the architecture and
the training facts (JSON); it is never unpickled. The packaged one is
``restorer/weights/estimator.safetensors`` (:func:`load_estimator` with no path). It is trained by
``launch/train_estimator.py`` on the restoration models' own stream (real-world chains included),
so it sees the true effective quality of every chain.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from restorer.errors import UserError, first_line
from restorer.fsutil import atomic_write

CROP, MAX_CROPS = 128, 16  # 16 crops of 128 px: about 0.1 s of features on a CPU core
META_KEY = "restorer_estimator"
PACKAGED = Path(__file__).resolve().parent / "weights" / "estimator.safetensors"


ZERO_THRESHOLDS = (1.0, 2.0, 4.0)  # |DCT| below these counts as quantised away
N_FEATURES = 2 * 64 * (3 + len(ZERO_THRESHOLDS)) + 2
_k, _n = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
_scale = np.full((8, 8), np.sqrt(2 / 8))
_scale[0] = np.sqrt(1 / 8)  # the k = 0 row (indexing="ij": k runs down the rows)
DCT8 = _scale * np.cos(np.pi * (2 * _n + 1) * _k / 16)


def ycbcr_planes(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, Cb, Cr (JPEG's full-range BT.601, Cb/Cr centred on 0) of a uint8 crop; gray: zero chroma."""
    x = img.astype(np.float64)
    if x.ndim == 2:
        return x, np.zeros_like(x), np.zeros_like(x)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    return (
        0.299 * r + 0.587 * g + 0.114 * b,
        -0.168736 * r - 0.331264 * g + 0.5 * b,
        0.5 * r - 0.418688 * g - 0.081312 * b,
    )


def block_dct(plane: np.ndarray, oy: int, ox: int) -> np.ndarray:
    """The JPEG (orthonormal) DCT of the whole 8x8 blocks of ``plane`` on the grid starting at
    (oy, ox): [blocks, 64], natural order (row * 8 + column), in the plane's float type."""
    p = plane[oy:, ox:]
    h, w = p.shape[0] // 8 * 8, p.shape[1] // 8 * 8
    blocks = p[:h, :w].reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 8, 8)
    d = DCT8.astype(plane.dtype, copy=False)
    return (d @ blocks @ d.T).reshape(-1, 64)


def features(crop: np.ndarray) -> np.ndarray:
    """The 770 features of one uint8 crop (at least 16 x 16): see the module docstring."""
    y, cb, cr = ycbcr_planes(crop)
    across = np.abs(np.diff(y, axis=1)).mean(axis=0)
    down = np.abs(np.diff(y, axis=0)).mean(axis=1)
    px = np.array([across[k::8].mean() for k in range(8)])
    py = np.array([down[k::8].mean() for k in range(8)])
    order_x, order_y = np.argsort(-px, kind="stable"), np.argsort(-py, kind="stable")
    parts = []
    for rank in (0, 1):  # the blockiest grid, then the next one (an earlier save's, or none)
        oy, ox = (int(order_y[rank]) + 1) % 8, (int(order_x[rank]) + 1) % 8  # a border lies after column bx
        luma = np.abs(block_dct(y, oy, ox))
        parts += [np.log1p(luma.mean(axis=0))] + [(luma < t).mean(axis=0) for t in ZERO_THRESHOLDS]
        parts += [np.log1p(np.abs(block_dct(c, oy, ox)).mean(axis=0)) for c in (cb, cr)]
    bx, by = int(order_x[0]), int(order_y[0])
    parts.append(np.array([px[bx] / (px.mean() + 1e-6), py[by] / (py.mean() + 1e-6)]))
    return np.concatenate(parts).astype(np.float32)


class QualityNet(nn.Module):
    """:func:`features` [B, 258] -> effective quality / 100 [B]; standardises its input with the
    training set's mean and spread (buffers, saved with the weights)."""

    mean: torch.Tensor  # buffers (torch types module attributes as Tensor | Module)
    std: torch.Tensor

    def __init__(self, width: int = 64):
        super().__init__()
        self.width = int(width)
        self.register_buffer("mean", torch.zeros(N_FEATURES))
        self.register_buffer("std", torch.ones(N_FEATURES))
        w = self.width
        self.mlp = nn.Sequential(nn.Linear(N_FEATURES, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.mlp((f - self.mean) / self.std).squeeze(1)


def crop_boxes(height: int, width: int, size: int = CROP, max_crops: int = MAX_CROPS) -> list[tuple[int, int, int]]:
    """(y, x, side) of up to ``max_crops`` square crops spread evenly over the image, their
    corners on the 8 px grid; crops of the whole short side when the image is smaller."""
    side = min(size, height, width)
    per_axis = max(1, int(np.sqrt(max_crops)))
    ys = np.linspace(0, height - side, per_axis) // 8 * 8 if height > side else np.zeros(1)
    xs = np.linspace(0, width - side, per_axis) // 8 * 8 if width > side else np.zeros(1)
    return sorted({(int(y), int(x), side) for y in ys for x in xs})


def crop_features(pixels: np.ndarray, boxes: list[tuple[int, int, int]]) -> torch.Tensor:
    """:func:`features` of each crop of a uint8 [H, W] or [H, W, 3] image: [N, 258]."""
    return torch.from_numpy(np.stack([features(pixels[y : y + s, x : x + s]) for y, x, s in boxes]))


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
            pred = self.net(crop_features(pixels, boxes).to(self.device)).float().mean().item()
        return float(min(100.0, max(1.0, 100.0 * pred)))


def save_estimator(net: QualityNet, path: str | Path, facts: dict) -> Path:
    """Write the weights and their metadata (architecture + ``facts``) as one safetensors file,
    atomically (restorer.fsutil.atomic_write)."""
    meta = {"format_version": 1, "model": {"width": net.width}, "facts": facts}
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta)}))


def load_estimator(path: str | Path | None = None, device: torch.device | str = "cpu") -> Estimator:
    """The estimator in ``path`` (default: the packaged one); UserError with one line when the
    file is missing or is not an estimator."""
    path = Path(path) if path is not None else PACKAGED
    if not path.is_file():
        raise UserError(f"{path}: quality estimator not found")
    try:
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
