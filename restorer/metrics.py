"""Image quality metrics on float tensors in [0, 1], shape [B, C, H, W], one value per image.

Convention (see README): PSNR here is computed on RGB with an 8-bit peak, no border crop, unless
a caller converts to Y (BT.601, :func:`rgb_to_y`) or crops first (:func:`crop_border`). Results
are float64 per image, so means across images and ranks reduce exactly.

* :func:`psnr`   10 log10(peak^2 / MSE), MSE over all channels and pixels.
* :func:`ssim`   Wang et al. 2004: Gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, population
                 (co)variances, 'valid' positions only, mean over channels and positions (what
                 scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
                 use_sample_covariance=False)`` computes).
* :func:`psnr_b` Yim & Bovik 2011, "Quality assessment of deblocked images": PSNR with the MSE
                 increased by the blocking effect factor (BEF) of the *test* image on the 8x8
                 block grid; see :func:`blocking_effect_factor`.
"""

from __future__ import annotations

import math

import torch

# ITU-R BT.601 luma for RGB in [0, 1], giving Y in [16, 235] on the 8-bit scale (MATLAB's
# rgb2ycbcr, the convention of the published JPEG-artifact tables). We divide by 255 and do
# not round Y to integers.
BT601_Y = (65.481, 128.553, 24.966)
BT601_OFFSET = 16.0


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> [B, 1, H, W] BT.601 Y in [16/255, 235/255].
    A 1-channel input is taken as gray (R = G = B)."""
    x = x.detach().double()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"rgb_to_y needs 1 or 3 channels, got {x.shape[1]}")
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (BT601_OFFSET + BT601_Y[0] * r + BT601_Y[1] * g + BT601_Y[2] * b) / 255.0


def crop_border(x: torch.Tensor, border: int) -> torch.Tensor:
    """Drop ``border`` pixels from each side (the usual 'crop_border' of SR/AR evaluations)."""
    if border <= 0:
        return x
    if x.shape[-1] <= 2 * border or x.shape[-2] <= 2 * border:
        raise ValueError(f"crop border {border} leaves nothing of a {x.shape[-1]}x{x.shape[-2]} image")
    return x[..., border:-border, border:-border]


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    diff = pred.detach().double() - target.detach().double()
    return diff.pow(2).flatten(1).mean(dim=1)


def _psnr_from_mse(err: torch.Tensor, data_range: float) -> torch.Tensor:
    return 10.0 * torch.log10(data_range**2 / err)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB; identical images give +inf."""
    return _psnr_from_mse(mse(pred, target), data_range)


def _gaussian_1d(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03,
    'valid' filtering, mean over channels and positions. The Gaussian is applied as two 1-D
    passes (it is separable: identical to the 2-D window up to rounding, ~5x fewer operations)."""
    x, y = pred.detach().double(), target.detach().double()
    h, w = x.shape[-2:]
    if h < win_size or w < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {w}x{h}")
    g = [float(v) for v in _gaussian_1d(win_size, sigma, x.device, x.dtype)]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ho, wo = h - win_size + 1, w - win_size + 1

    def blur(t):  # separable 'valid' Gaussian as shifted sums (float64 conv2d is slow on CPU)
        across = g[0] * t[..., :, 0:wo]
        for k in range(1, win_size):
            across = across + g[k] * t[..., :, k : k + wo]
        out = g[0] * across[..., 0:ho, :]
        for k in range(1, win_size):
            out = out + g[k] * across[..., k : k + ho, :]
        return out

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(dim=1)


def blocking_effect_factor(y: torch.Tensor, block: int = 8, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Blocking effect factor BEF of each channel of ``y`` ([B, C, H, W]) -> [B, C] (float64).

    Yim & Bovik 2011, with the image N_H pixels wide and N_V high:

    * H  = horizontally adjacent pixel pairs (x, x+1) that straddle a vertical block boundary,
      i.e. x + 1 is a multiple of ``block`` (in image coordinates shifted by ``offset``);
      H^c = every other horizontally adjacent pair. V, V^c likewise for vertical neighbours.
    * D_B  = sum over H u V of (y_i - y_j)^2 / |H u V|;  D_B^c = same over H^c u V^c.
    * BEF  = eta * (D_B - D_B^c) if D_B > D_B^c else 0,  eta = log2(block) / log2(min(N_H, N_V)).

    The counts are the sizes of the sets themselves; the paper's closed forms (e.g.
    |H| = N_V (N_H / B - 1)) are the same numbers when the sides are multiples of the block.
    ``offset`` = (row, column) of the first block boundary's origin, for border-cropped images
    (a crop of k pixels moves the JPEG grid to offset (-k mod 8)).
    """
    y = y.detach().double()
    n_v, n_h = y.shape[-2], y.shape[-1]
    if min(n_v, n_h) < 2:
        raise ValueError("BEF needs an image at least 2 pixels on each side")
    dh = (y[..., :, 1:] - y[..., :, :-1]).pow(2)  # pair (x, x+1) -> column x
    dv = (y[..., 1:, :] - y[..., :-1, :]).pow(2)  # pair (r, r+1) -> row r
    oy, ox = offset[0] % block, offset[1] % block
    col_b = ((torch.arange(n_h - 1, device=y.device) + 1 - ox) % block) == 0
    row_b = ((torch.arange(n_v - 1, device=y.device) + 1 - oy) % block) == 0
    sum_b = dh[..., :, col_b].sum(dim=(-2, -1)) + dv[..., row_b, :].sum(dim=(-2, -1))
    sum_all = dh.sum(dim=(-2, -1)) + dv.sum(dim=(-2, -1))
    n_b = n_v * int(col_b.sum()) + n_h * int(row_b.sum())
    n_all = n_v * (n_h - 1) + n_h * (n_v - 1)
    n_c = n_all - n_b
    d_b = sum_b / n_b if n_b else torch.zeros_like(sum_b)
    d_c = (sum_all - sum_b) / n_c if n_c else torch.zeros_like(sum_b)
    eta = math.log2(block) / math.log2(min(n_h, n_v))
    return torch.where(d_b > d_c, eta * (d_b - d_c), torch.zeros_like(d_b))


def psnr_b(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, block: int = 8, offset: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Per-image PSNR-B (Yim & Bovik 2011): 10 log10(peak^2 / (MSE + BEF(pred))).

    ``pred`` is the test image (JPEG or restored), ``target`` the reference. BEF is only
    computed on the test image. For several channels, MSE is over all channels and BEF is the
    mean of the per-channel BEFs (for one channel, e.g. Y, this is exactly the paper's metric).
    """
    err = mse(pred, target) + blocking_effect_factor(pred, block, offset).mean(dim=1)
    return _psnr_from_mse(err, data_range)
