"""Scenes from the prior: the foreground prior of equation 3 and the background of algorithm 3."""

from __future__ import annotations

import torch

from .model import SPACE, where_to_box, z_scale_prior_means


@torch.no_grad()
def sample_images(model: SPACE, count: int, step: int, seed: int = 0) -> torch.Tensor:
    """`count` images (count, 3, N, N) in [0, 1] drawn from a trained model's priors at `step`."""
    m = model.cfg
    model.eval()
    torch.manual_seed(seed)
    g, s = m.grid_size, m.glimpse_size
    c = g * g
    # Foreground (equation 3): z_pres ~ Bern(rho); z_where, z_depth, z_what from their Gaussian priors.
    z_pres = torch.bernoulli(torch.full((count, c), m.z_pres_prior.at(step)))  # (count, C), hard
    scale_mean = torch.tensor(z_scale_prior_means(m.z_scale_prior_mean.at(step), m.z_scale_prior_aspect))  # (x, y)
    z_scale = scale_mean + m.z_scale_prior_std.at(step) * torch.randn(count, g, g, 2)
    z_shift = m.z_shift_prior_mean + m.z_shift_prior_std * torch.randn(count, g, g, 2)
    z_depth = m.z_depth_prior_mean + m.z_depth_prior_std * torch.randn(count, c)
    z_what = torch.randn(count * c, m.z_what_dim)
    centre, size = where_to_box(z_scale, z_shift, g, m.shift_range)
    maps = model.fg.decode(z_what).view(count, c, 5, s, s)  # alpha_att, o_att, band
    alpha, mu_fg, _, _ = model.fg.render(maps, z_pres, z_depth, centre.reshape(count, c, 2), size.reshape(count, c, 2))
    # Background (algorithm 3).
    pi, mu_bg = model.bg.generate(count)
    background = (pi * mu_bg).sum(1)
    return alpha * mu_fg + (1 - alpha) * background
