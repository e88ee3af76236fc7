"""Batches as they leave the workers and reach the device: uint8 NHWC memory seen as [B,C,P,P].

Workers collate their own batches with one ``np.stack`` into NHWC memory, handed out as a
[B,C,P,P] view with channels_last strides (no transposing copy in the worker). Batches stay uint8
until :func:`to_device_float` on the device (4x fewer bytes through pinned memory and PCIe), which
converts dtype and memory layout in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def stack_patches(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """HxW or HxWxC uint8 arrays -> uint8 [B,C,H,W] tensor: one ``np.stack`` into NHWC memory,
    returned as a view with channels_last strides (pinning and ``.to()`` keep them)."""
    arr = np.stack(arrays)
    if arr.ndim == 3:
        arr = arr[..., None]
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def collate(items: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(degraded, clean, quality)] -> (degraded uint8 [B,C,P,P], clean uint8 [B,C,P,P], quality int64 [B])."""
    return (
        stack_patches([it[0] for it in items]),
        stack_patches([it[1] for it in items]),
        torch.tensor([it[2] for it in items], dtype=torch.int64),
    )


def to_device_float(t: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B,C,H,W] -> float32 in [0, 1] on ``device``, in channels_last memory format when
    ``channels_last``, else contiguous NCHW. The copy to the device moves bytes, not floats, and
    keeps the batch's strides; the dtype conversion writes the asked layout in the same pass (for
    the loader's channels_last batches with ``channels_last=True`` nothing is re-laid out)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t.to(device, non_blocking=True).to(torch.float32, memory_format=fmt).div_(255.0)
