"""SSIM written out pixel by pixel, the independent reference the SSIM tests compare against: a Gaussian window
(``w`` x ``w``, ``sigma``, normalised to sum 1) centred on every pixel, image indices reflected at the border
(numpy/torch "reflect": -1 -> 1, n -> n - 2), C1 = 0.01^2, C2 = 0.03^2 (data range 1), kornia's 1e-12 in the
denominator. Slow and plain on purpose."""

import numpy as np


def ssim_map(a: np.ndarray, b: np.ndarray, w: int = 3, sigma: float = 1.5) -> np.ndarray:
    """The SSIM map of one (C, H, W) pair, same shape as the images."""
    r = w // 2
    g = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    C, H, W = a.shape

    def refl(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    out = np.zeros(a.shape)
    for c in range(C):
        for y in range(H):
            for x in range(W):
                rows = [refl(y + dy, H) for dy in range(-r, r + 1)]
                cols = [refl(x + dx, W) for dx in range(-r, r + 1)]
                pa, pb = a[c][np.ix_(rows, cols)], b[c][np.ix_(rows, cols)]
                ma, mb = (k * pa).sum(), (k * pb).sum()
                va, vb, cov = (k * pa * pa).sum() - ma ** 2, (k * pb * pb).sum() - mb ** 2, (k * pa * pb).sum() - ma * mb
                out[c, y, x] = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2) + 1e-12)
    return out


def ssim(a: np.ndarray, b: np.ndarray, w: int = 3, sigma: float = 1.5) -> float:
    """SSIM of one (C, H, W) pair: the map's mean over every pixel and channel."""
    return float(ssim_map(a, b, w, sigma).mean())
