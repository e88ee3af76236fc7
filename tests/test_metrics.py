import math

import numpy as np
import pytest
import torch
from skimage import data
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from restorer.data.degrade import jpeg_roundtrip
from restorer.metrics import blocking_effect_factor, crop_border, psnr, psnr_b, rgb_to_y, ssim


def _t(a: np.ndarray) -> torch.Tensor:
    a = a[:, :, None] if a.ndim == 2 else a
    return torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].double() / 255


@pytest.fixture(scope="module")
def pair():
    ref = data.coffee()[:200, :264]
    return ref, jpeg_roundtrip(ref, 10)


def test_psnr_matches_skimage(pair):
    ref, jpeg = pair
    assert float(psnr(_t(jpeg), _t(ref))) == pytest.approx(peak_signal_noise_ratio(ref, jpeg, data_range=255), abs=1e-9)
    assert math.isinf(float(psnr(_t(ref), _t(ref))))


@pytest.mark.parametrize("gray", [False, True])
def test_ssim_matches_skimage(pair, gray):
    ref, jpeg = pair
    if gray:
        ref, jpeg = ref[:, :, 1], jpeg[:, :, 1]
    expected = structural_similarity(
        ref.astype(np.float64) / 255,
        jpeg.astype(np.float64) / 255,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        channel_axis=None if gray else -1,
    )
    got = float(ssim(_t(jpeg), _t(ref)))
    assert got == pytest.approx(expected, abs=1e-7)
    assert 0.5 < got < 1.0


def test_y_channel_matches_skimage_bt601(pair):
    ref, _ = pair
    expected = rgb2ycbcr(ref)[:, :, 0]  # skimage: BT.601, Y in 16..235
    got = (rgb_to_y(_t(ref)) * 255)[0, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert float(rgb_to_y(torch.ones(1, 3, 2, 2)).max() * 255) == pytest.approx(235.0)


def test_psnr_b_two_block_hand_example():
    # 16x16, left 8 columns 0.5, right 8 columns 0.6; reference all 0.5.
    # Block-boundary pairs: 16 horizontal (columns 7|8) with diff 0.1, 16 vertical (rows 7|8) with diff 0
    #   -> D_B = 16 * 0.01 / 32 = 0.005.  Other pairs (448) all zero -> D_B^c = 0.
    # eta = log2(8)/log2(16) = 0.75 -> BEF = 0.00375.  MSE = half the pixels off by 0.1 = 0.005.
    # PSNR-B = 10 log10(1 / 0.00875) = 20.5799 dB; PSNR = 23.0103 dB.
    y = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    y[..., 8:] = 0.6
    x = torch.full_like(y, 0.5)
    assert float(blocking_effect_factor(y)[0, 0]) == pytest.approx(0.00375, abs=1e-12)
    assert float(psnr_b(y, x)) == pytest.approx(10 * math.log10(1 / 0.00875), abs=1e-9)
    assert float(psnr_b(y, x)) == pytest.approx(20.5799, abs=1e-4)
    assert float(psnr(y, x)) == pytest.approx(23.0103, abs=1e-4)


def test_psnr_b_ramp_hand_example():
    # y[r, c] = 0.01 c: every horizontal pair differs by 0.01, vertical pairs by 0
    #   D_B = 16 * 1e-4 / 32 = 5e-5 = D_B^c (224 * 1e-4 / 448)  -> not greater -> BEF = 0.
    y = (torch.arange(16, dtype=torch.float64) * 0.01).expand(1, 1, 16, 16).clone()
    assert float(blocking_effect_factor(y)[0, 0]) == 0.0
    # a jump of 0.05 at the block boundary: boundary pairs differ by 0.06
    #   D_B = 16 * 0.0036 / 32 = 0.0018, D_B^c = 5e-5 -> BEF = 0.75 * 0.00175 = 0.0013125
    y[..., 8:] += 0.05
    assert float(blocking_effect_factor(y)[0, 0]) == pytest.approx(0.0013125, abs=1e-12)
    assert float(psnr_b(y, y)) == pytest.approx(10 * math.log10(1 / 0.0013125), abs=1e-9)


def test_bef_follows_the_grid_after_a_crop():
    rng = np.random.default_rng(0)
    blocks = rng.random((1, 1, 6, 6))
    img = torch.from_numpy(np.kron(blocks, np.ones((8, 8))))  # 48x48 of constant 8x8 blocks
    assert float(blocking_effect_factor(img)[0, 0]) > 0
    cropped = crop_border(img, 3)  # grid now starts 5 pixels in
    assert float(blocking_effect_factor(cropped, offset=(5, 5))[0, 0]) > 0
    assert float(blocking_effect_factor(cropped)[0, 0]) == 0.0  # wrong grid: no blockiness seen


def test_psnr_b_penalises_real_jpeg_blocks(pair):
    ref, jpeg = pair
    y_ref, y_jpeg = rgb_to_y(_t(ref)), rgb_to_y(_t(jpeg))
    assert float(blocking_effect_factor(y_jpeg)) > float(blocking_effect_factor(y_ref))
    assert float(psnr_b(y_jpeg, y_ref)) < float(psnr(y_jpeg, y_ref))
