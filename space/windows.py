"""The foreground composite of space/model.py (`composite`), computed per glimpse window.

The paper's footnote on O(hw x HW) rendering: the straightforward composite warps every glimpse onto the
whole canvas (a full-image warp per cell). Here each glimpse is warped only onto the window of the canvas
it can touch and scatter-added into place: the same sums in another order (tested against
`space.model.composite` in float64, values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _window_grid(centre, size, n: int, glimpse_size: int):
    """For each glimpse, the canvas window it can touch and where each window pixel falls in the glimpse.

    centre, size: (M, 2) fractions of the image. Returns the window's top-left pixel (M, 2) (x, y),
    its side P (an int, the same for all), and the glimpse coordinates of every window pixel centre
    (M, P, P, 2) for grid_sample.
    """
    # A glimpse pixel's bilinear footprint reaches one glimpse pixel past the outermost centres:
    # half-extent in canvas pixels = size * N / 2 * (1 + 1 / S).
    half = size * (n / 2) * (1 + 1 / glimpse_size)
    # Only the part on the canvas matters: clip to it, so no window is wider than the canvas.
    lo = torch.floor(centre * n - half - 0.5).clamp(0, n - 1)
    hi = torch.ceil(centre * n + half - 0.5).clamp(0, n - 1)
    p = int((hi - lo).max().item()) + 1
    offs = torch.arange(p, device=centre.device, dtype=centre.dtype)
    # Canvas pixel centres in [-1, 1], then into glimpse coordinates: u = (x - (2c - 1)) / s.
    px = (lo[:, 0:1] + offs + 0.5) * (2 / n) - 1  # (M, P)
    py = (lo[:, 1:2] + offs + 0.5) * (2 / n) - 1
    gx = (px - (2 * centre[:, 0:1] - 1)) / size[:, 0:1]
    gy = (py - (2 * centre[:, 1:2] - 1)) / size[:, 1:2]
    grid = torch.stack([gx[:, None, :].expand(-1, p, p), gy[:, :, None].expand(-1, p, p)], -1)
    return lo.long(), p, grid


def composite_windowed(maps, z_pres, depth_weight, centre, size, n: int, premultiplied: bool = True,
                       eps: float = 1e-6):
    """space.model.composite, windowed: the same arguments and results (eps: the denominator's floor,
    space.model.EPS, which the model passes).

    Per pixel it sums each glimpse's importance and weighted values over the glimpses whose window holds
    the pixel; outside its window a glimpse's warped maps are 0, so those are all the terms there are.
    """
    b, c, _, s, _ = maps.shape
    m = b * c
    lo, p, grid = _window_grid(centre.reshape(m, 2), size.reshape(m, 2), n, s)
    win = F.grid_sample(maps.reshape(m, 5, s, s), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)  # (M, 5, P, P)
    alpha_hat = win[:, :1] * z_pres.reshape(m, 1, 1, 1)
    imp = alpha_hat * depth_weight.reshape(m, 1, 1, 1)
    colour = alpha_hat * win[:, 1:4] if premultiplied else win[:, 1:4]
    band = win[:, 4:5] * z_pres.reshape(m, 1, 1, 1)
    sums = torch.cat([imp, imp * alpha_hat, imp * colour, band], 1)  # (M, 6, P, P)

    # Flat canvas index of every window pixel; pixels off the canvas go to a spill slot n*n.
    offs = torch.arange(p, device=maps.device)
    xs = lo[:, 0:1] + offs  # (M, P)
    ys = lo[:, 1:2] + offs
    inside = ((xs >= 0) & (xs < n))[:, None, :] & ((ys >= 0) & (ys < n))[:, :, None]  # (M, P, P)
    flat = torch.where(inside, ys[:, :, None] * n + xs[:, None, :], n * n)  # (M, P, P)
    flat = flat.view(b, 1, c * p * p)
    canvas = sums.new_zeros(b, 6, n * n + 1)
    canvas.scatter_add_(2, flat.expand(b, 6, -1), sums.view(b, c, 6, p * p).transpose(1, 2).reshape(b, 6, c * p * p))
    canvas = canvas[:, :, : n * n].view(b, 6, n, n)
    denom = canvas[:, :1] + eps
    alpha = canvas[:, 1:2] / denom
    mu_fg = canvas[:, 2:5] / denom

    # Appendix C: each present glimpse's band, placed on the canvas, times the global foreground mask alpha.
    overlap = canvas[:, 5:6] * alpha  # (B, 1, N, N)
    return alpha, mu_fg, overlap
