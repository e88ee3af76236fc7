"""The validation pass: PSNR (and SSIM) of restored and JPEG images against clean, per quality.

Figures are exact over the whole split: each process sums over its own images, the sums are
all-reduced, and an empty split is an error every process raises together. Outputs are rounded
to 8 bits first (what a saved image holds). PSNR = RGB, 8-bit peak 255, no border crop.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from restorer.errors import AgreedError
from restorer.train.tracking import say


def panel(deg: torch.Tensor, out: torch.Tensor, clean: torch.Tensor, n: int) -> np.ndarray:
    """Rows of JPEG | restored | clean, uint8 HxWx3."""
    rows = [torch.cat([deg[i], out[i], clean[i]], dim=-1) for i in range(min(n, deg.shape[0]))]  # C,H,3W
    grid = torch.cat(rows, dim=-2).float().clamp(0, 1).mul(255).round().byte().cpu()
    if grid.shape[0] == 1:
        grid = grid.expand(3, -1, -1)
    return grid.permute(1, 2, 0).contiguous().numpy()


@torch.no_grad()
def val_pass(
    net, cfg, accelerator, faults, *, channels_last: bool, with_ssim: bool
) -> tuple[dict[str, float], np.ndarray | None]:
    """Run ``net`` over the validation images of ``cfg.val_source()``; return the figures
    (``val/psnr_qQ``, ``val/jpeg_psnr_qQ``, ``val/gain_qQ`` [, ``val/ssim_qQ``, ``val/jpeg_ssim_qQ``],
    ``val/psnr``, ``val/gain``, ``val/images``) and, on the main process, a panel."""
    from restorer.data import make_val_loader, to_device_float
    from restorer.metrics import psnr, ssim

    device = accelerator.device
    qualities = [int(q) for q in cfg.val_qualities]
    spec, split = cfg.val_source()
    loader = make_val_loader(
        spec,
        split=split,
        qualities=tuple(qualities),
        crop=cfg.val_crop,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        batch_size=cfg.val_batch_size,
        num_workers=0,
        grayscale=cfg.data.grayscale,
        chroma_subsampling=cfg.data.chroma_subsampling,
    )
    slot = {q: i for i, q in enumerate(qualities)}
    # rows: restored psnr, jpeg psnr, count, restored ssim, jpeg ssim
    sums = torch.zeros(5, len(qualities), dtype=torch.float64)
    picture = None
    was_training = net.training
    net.eval()
    faults.maybe_sleep(accelerator.process_index)
    for deg, clean, q in loader:
        x = to_device_float(deg, device, channels_last)
        y = to_device_float(clean, device, channels_last)
        out = net(x, q.to(device) if cfg.model.condition_on_quality else None)
        out = out.float().clamp(0, 1).mul(255).round().div(255)  # what a saved 8-bit image holds
        idx = torch.tensor([slot[int(v)] for v in q])
        sums[0].index_add_(0, idx, psnr(out, y).clamp(max=100.0).cpu())
        sums[1].index_add_(0, idx, psnr(x, y).clamp(max=100.0).cpu())
        sums[2].index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))
        if with_ssim:
            sums[3].index_add_(0, idx, ssim(out, y).cpu())
            sums[4].index_add_(0, idx, ssim(x, y).cpu())
        if picture is None and accelerator.is_main_process and cfg.panel_images > 0:
            picture = panel(x, out, y, cfg.panel_images)
    net.train(was_training)
    total = accelerator.reduce(sums.to(device), reduction="sum").cpu()
    results: dict[str, float] = {}
    for q, i in slot.items():
        n = float(total[2, i])
        if n == 0:
            continue
        results[f"val/psnr_q{q}"] = float(total[0, i]) / n
        results[f"val/jpeg_psnr_q{q}"] = float(total[1, i]) / n
        results[f"val/gain_q{q}"] = results[f"val/psnr_q{q}"] - results[f"val/jpeg_psnr_q{q}"]
        if with_ssim:
            results[f"val/ssim_q{q}"] = float(total[3, i]) / n
            results[f"val/jpeg_ssim_q{q}"] = float(total[4, i]) / n
    n_all = float(total[2].sum())
    if n_all == 0:  # decided from the reduced count: every process raises it together
        raise AgreedError(
            f"{spec}: no readable validation samples"
            + (f" in split {split!r}" if split else "")
            + f" (on any of {accelerator.num_processes} process(es))"
        )
    results["val/psnr"] = float(total[0].sum()) / n_all
    results["val/gain"] = float((total[0] - total[1]).sum()) / n_all
    results["val/images"] = n_all
    return results, picture


def validate_and_log(
    net, cfg, accelerator, faults, tracker, step: int, *, channels_last: bool, final: bool
) -> dict[str, float]:
    """:func:`val_pass`, then log its figures and panel at ``step`` and print one line; returns the figures."""
    t0 = time.perf_counter()
    results, picture = val_pass(net, cfg, accelerator, faults, channels_last=channels_last, with_ssim=final)
    tracker.log({**results, "val/seconds": time.perf_counter() - t0}, step)
    if picture is not None:
        tracker.log_panel(picture, step, "JPEG | restored | clean")
    qs = " ".join(
        f"q{q}: {results[f'val/psnr_q{q}']:.2f} dB ({results[f'val/gain_q{q}']:+.2f})"
        for q in cfg.val_qualities
        if f"val/psnr_q{q}" in results
    )
    say(accelerator, f"step {step}: val {qs}" + (" [final, with SSIM]" if final else ""))
    return results
