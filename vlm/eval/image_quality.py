"""Reconstruction quality per frame: PSNR and SSIM (Wang et al. 2004), for video autoencoders.

Frames are [..., H, W, C] on a scale of `data_range` (255 for uint8 pixels, 1 or 2 for floats);
every function returns one value per frame, [...], so a video batch [B, T, H, W, 3] gives [B, T]
and the caller averages (vlm reports the mean over frames and clips). Written with jax.numpy: they
run inside a jitted eval step on the accelerator, and on numpy arrays too.

SSIM is the standard one: an 11x11 Gaussian window with σ = 1.5, K1 = 0.01, K2 = 0.03, computed
per channel over the window positions that fit inside the frame ("valid", as Wang et al.'s code
and tf.image.ssim), averaged over positions and channels.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# PSNR of an exact frame would be infinite; MSE is floored at (data_range * 1e-5)^2, i.e. 100 dB.
PSNR_MAX_DB = 100.0


def mse(x, y):
    """Mean squared error per frame: [..., H, W, C] → [...] float32."""
    d = jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)
    return jnp.mean(jnp.square(d), axis=(-3, -2, -1))


def psnr(x, y, data_range: float = 255.0):
    """Peak signal-to-noise ratio per frame in dB: 10 log10(data_range² / MSE), at most PSNR_MAX_DB."""
    floor = (data_range * 10 ** (-PSNR_MAX_DB / 20)) ** 2
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse(x, y), floor))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1D Gaussian [size]; the 2D window is its outer product."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (g / g.sum()).astype(np.float32)


def _valid_filter_matrix(length: int, window: np.ndarray) -> np.ndarray:
    """[length - size + 1, length]: row i holds the window at offset i, so M @ x is the 'valid' 1D filter."""
    size = len(window)
    m = np.zeros((length - size + 1, length), np.float32)
    for i in range(length - size + 1):
        m[i, i:i + size] = window
    return m


def ssim(x, y, data_range: float = 255.0):
    """Mean SSIM per frame: [..., H, W, C] → [...] float32 (H, W ≥ 11)."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    h, w = x.shape[-3], x.shape[-2]
    if x.shape != y.shape or h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"ssim needs two frames of the same shape, at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels; "
                         f"got {x.shape} and {y.shape}")
    window = gaussian_window()
    rows, cols = jnp.asarray(_valid_filter_matrix(h, window)), jnp.asarray(_valid_filter_matrix(w, window))

    def blur(z):  # separable Gaussian, valid positions only: [..., H, W, C] → [..., H-10, W-10, C]
        return jnp.einsum("ih,...hwc,jw->...ijc", rows, z, cols)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return jnp.mean(ssim_map, axis=(-3, -2, -1))
