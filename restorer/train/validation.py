"""The validation pass: PSNR (and SSIM) of restored and JPEG images against clean, per quality.

Figures are exact over the whole split: each process sums over its own images, the sums are
all-reduced, and an empty split is an error every process raises together. Outputs are rounded
to 8 bits first (what a saved image holds). PSNR = RGB, 8-bit peak 255, no border crop.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from restorer.data.batch import to_device_float
from restorer.data.val import ValLoader, ValOptions, make_val_loader
from restorer.errors import AgreedError
from restorer.metrics import psnr, ssim
from restorer.train.context import TrainContext
from restorer.train.tracking import say


def panel(deg: torch.Tensor, out: torch.Tensor, clean: torch.Tensor, n: int) -> np.ndarray:
    """Rows of JPEG | restored | clean, uint8 HxWx3."""
    rows = [torch.cat([deg[i], out[i], clean[i]], dim=-1) for i in range(min(n, deg.shape[0]))]  # C,H,3W
    grid = torch.cat(rows, dim=-2).float().clamp(0, 1).mul(255).round().byte().cpu()
    if grid.shape[0] == 1:
        grid = grid.expand(3, -1, -1)
    return grid.permute(1, 2, 0).contiguous().numpy()


def val_loader(ctx: TrainContext) -> ValLoader:
    """This process's share of the validation images of ``cfg.val_source()``."""
    cfg = ctx.cfg
    spec, split = cfg.val_source()
    options = ValOptions(
        split=split,
        qualities=tuple(int(q) for q in cfg.val_qualities),
        crop=cfg.val_crop,
        rank=ctx.accelerator.process_index,
        world_size=ctx.accelerator.num_processes,
        batch_size=cfg.val_batch_size,
        num_workers=0,
        grayscale=cfg.data.grayscale,
        chroma_subsampling=cfg.data.chroma_subsampling,
    )
    return make_val_loader(spec, options)


@torch.no_grad()
def val_pass(ctx: TrainContext, net, *, with_ssim: bool) -> tuple[dict[str, float], np.ndarray | None]:
    """Run ``net`` over the validation images of ``cfg.val_source()``; return the figures
    (``val/psnr_qQ``, ``val/jpeg_psnr_qQ``, ``val/gain_qQ`` [, ``val/ssim_qQ``, ``val/jpeg_ssim_qQ``],
    ``val/psnr``, ``val/gain``, ``val/images``) and, on the main process, a panel."""
    loader = val_loader(ctx)
    was_training = net.training
    net.eval()
    if ctx.faults is not None:
        ctx.faults.maybe_sleep(ctx.accelerator.process_index)
    sums, picture = _val_sums(ctx, net, loader, with_ssim)
    net.train(was_training)
    total = ctx.accelerator.reduce(sums.to(ctx.accelerator.device), reduction="sum").cpu()
    return _val_figures(ctx, total, loader, with_ssim), picture


def _val_sums(ctx: TrainContext, net, loader: ValLoader, with_ssim: bool) -> tuple[torch.Tensor, np.ndarray | None]:
    """Per quality (columns): restored PSNR, JPEG PSNR, count, restored SSIM, JPEG SSIM (rows),
    summed over this process's images; and the panel (main process)."""
    cfg, device = ctx.cfg, ctx.accelerator.device
    slot = {q: i for i, q in enumerate(loader.qualities)}
    sums = torch.zeros(5, len(loader.qualities), dtype=torch.float64)
    picture = None
    for deg, clean, q in loader:
        x = to_device_float(deg, device, ctx.channels_last)
        y = to_device_float(clean, device, ctx.channels_last)
        out = net(x, q.to(device) if cfg.model.condition_on_quality else None)
        out = out.float().clamp(0, 1).mul(255).round().div(255)  # what a saved 8-bit image holds
        idx = torch.tensor([slot[int(v)] for v in q])
        sums[0].index_add_(0, idx, psnr(out, y).clamp(max=100.0).cpu())
        sums[1].index_add_(0, idx, psnr(x, y).clamp(max=100.0).cpu())
        sums[2].index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))
        if with_ssim:
            sums[3].index_add_(0, idx, ssim(out, y).cpu())
            sums[4].index_add_(0, idx, ssim(x, y).cpu())
        if picture is None and ctx.accelerator.is_main_process and cfg.panel_images > 0:
            picture = panel(x, out, y, cfg.panel_images)
    return sums, picture


def _val_figures(ctx: TrainContext, total: torch.Tensor, loader: ValLoader, with_ssim: bool) -> dict[str, float]:
    """The figures of the all-reduced sums; an empty split is an error every process raises together."""
    results: dict[str, float] = {}
    for q, i in {q: i for i, q in enumerate(loader.qualities)}.items():
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
        split = ctx.cfg.val_source()[1]
        raise AgreedError(
            f"{loader.spec}: no readable validation samples"
            + (f" in split {split!r}" if split else "")
            + f" (on any of {ctx.accelerator.num_processes} process(es))"
        )
    results["val/psnr"] = float(total[0].sum()) / n_all
    results["val/gain"] = float((total[0] - total[1]).sum()) / n_all
    results["val/images"] = n_all
    return results


def validate_and_log(ctx: TrainContext, *, final: bool) -> dict[str, float]:
    """:func:`val_pass` of the EMA (else the model) at ``ctx.state.step``, then log its figures and
    panel and print one line; returns the figures."""
    step = ctx.state.step
    t0 = time.perf_counter()
    results, picture = val_pass(ctx, ctx.eval_net(), with_ssim=final)
    if ctx.tracker is not None:
        ctx.tracker.log({**results, "val/seconds": time.perf_counter() - t0}, step)
        if picture is not None:
            ctx.tracker.log_panel(picture, step, "JPEG | restored | clean")
    qs = " ".join(
        f"q{q}: {results[f'val/psnr_q{q}']:.2f} dB ({results[f'val/gain_q{q}']:+.2f})"
        for q in ctx.cfg.val_qualities
        if f"val/psnr_q{q}" in results
    )
    say(ctx.accelerator, f"step {step}: val {qs}" + (" [final, with SSIM]" if final else ""))
    return results
