"""SPACE (Lin et al., ICLR 2020), read top to bottom: foreground, background, the ELBO.

Shapes use B batch, G grid cells per side (G*G = cells), N image side, S glimpse side, K background
components. Latent names follow the paper: z_pres, z_where = (z_scale, z_shift), z_depth, z_what for
each foreground cell; z_m (mask) and z_c (component) for each background component.

The paper's computation is written here plainly. Its optimisations live in modules of their own and are
tested against it: space/windows.py composites each glimpse only on the canvas window it can touch
(the footnote on O(hw x HW) rendering; `composite` below pastes every glimpse onto the whole canvas), and
space/recompute.py holds activation checkpointing and the BatchNorm statistics it needs across chunks
and data-parallel ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .recompute import (BatchNorm2d, broadcast_decode, full_precision, in_chunks, join_chunks, leaf_layers,
                        run_keeping_conv_outputs)
from .sparse import sparse_cells
from .windows import composite_windowed

LOG_2PI = math.log(2 * math.pi)
EPS = 1e-6
FIXED_LOGIT = 30.0  # the z_pres logit of a cell set on (or, negated, off) from outside: probability 1 - 1e-13
# log(pi + LOG_PI_FLOOR) is the component encoder's input in the paper's code (model.comp_encoder_input)
LOG_PI_FLOOR = 1e-5


# --------------------------------------------------------------------------------------- building blocks


# Activations run in place on the normalisation's output: neither norm's backward needs its output, so
# this keeps one tensor per layer fewer alive for the backward pass (memory is the glimpses' bottleneck).


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed in float32 under bf16 autocast (train.amp), its output back in the input's dtype:
    torch's mixed-dtype kernel on channels_last maps took 1.5-3.5x the float32 one on this CPU, and float32
    is where CUDA's autocast puts GroupNorm too. The same function and parameters otherwise."""

    def forward(self, x):
        return F.group_norm(full_precision(x), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def conv_gn(cin, cout, k, stride=1, padding=0, groups=8):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding), GroupNorm(groups, cout), nn.CELU(inplace=True))


def conv_celu_gn(cin, cout, k, stride=1, padding=0, groups=8):
    """The order of the foreground encoder's layers in the paper's code (model.fg_encoder = "code")."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding), nn.CELU(inplace=True), GroupNorm(groups, cout))


def conv_bn(cin, cout, k, stride=1, padding=0):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding), BatchNorm2d(cout), nn.ELU(inplace=True))


def conv_sub(cin, cout, scale, groups):
    """ConvSub(n) of appendix D.3: a stride-1 (1x1) convolution and PixelShuffle(n)."""
    return nn.Sequential(nn.Conv2d(cin, cout * scale * scale, 1), nn.PixelShuffle(scale),
                         GroupNorm(groups, cout), nn.CELU(inplace=True))


def gaussian_kl(mu, sigma, prior_mu, prior_sigma):
    """KL(N(mu, sigma) || N(prior_mu, prior_sigma)), elementwise."""
    var_ratio = (sigma / prior_sigma) ** 2
    return 0.5 * (var_ratio + ((mu - prior_mu) / prior_sigma) ** 2 - 1 - torch.log(var_ratio))


def z_scale_prior_means(mean: float, aspect: float) -> tuple[float, float]:
    """The z_scale prior's mean per axis (x, y): the height's moved by model.z_scale_prior_aspect."""
    return mean, mean + aspect


def bernoulli_kl(q, p):
    """KL(Bern(q) || Bern(p)), elementwise; q a tensor, p a float or tensor."""
    q = q.clamp(EPS, 1 - EPS)
    p = torch.as_tensor(p, dtype=q.dtype, device=q.device).clamp(EPS, 1 - EPS)
    return q * (torch.log(q) - torch.log(p)) + (1 - q) * (torch.log1p(-q) - torch.log1p(-p))


def normal_params(h, dim):
    """Split a head's output into mean and softplus standard deviation (appendix D.3), in float32: under
    bf16 autocast (train.amp) the latents and their KL terms stay in full precision."""
    mu, s = full_precision(h).split(dim, dim=-1)
    return mu, F.softplus(s) + 1e-4


# ------------------------------------------------------------------------------------------ foreground


class FgImageEncoder(nn.Module):
    """Image (B, 3, N, N) -> cell features (B, 128, G, G). Stride 2 layers: log2(N / G).

    layout "paper": appendix D.3's table, each layer conv, GroupNorm, CELU. "code" (model.fg_encoder): the
    code behind the paper's numbers orders each layer conv, CELU, GroupNorm and adds a lateral branch at the
    cells' resolution (two 3x3 layers over the cell features, concatenated with them and merged back to
    128 channels by a 3x3 layer): the cell features see their neighbours' before the z_pres and z_where
    heads read them."""

    def __init__(self, image_size: int, grid_size: int, layout: str = "paper"):
        super().__init__()
        downs = int(math.log2(image_size // grid_size))
        if not 2 <= downs <= 5:
            raise ValueError(f"image_size / grid_size must be 4 to 32, got {image_size // grid_size}")
        # The first three layers halve (4x4, stride 2); with an 8x8 grid the 3x3 layer after them halves too.
        s = [2 if i < downs else 1 for i in range(3)] + [2 if downs > 4 else 1, 2 if downs > 3 else 1]
        k = [4 if st == 2 else 3 for st in s[:3]]
        layer = conv_celu_gn if layout == "code" else conv_gn
        self.net = nn.Sequential(
            layer(3, 16, k[0], s[0], 1, 4),
            layer(16, 32, k[1], s[1], 1, 8),
            layer(32, 64, k[2], s[2], 1, 8),
            layer(64, 128, 3, s[3], 1, 16),
            layer(128, 256, 3, s[4], 1, 16),
            layer(256, 128, 1, 1, 0, 16),
        )
        self.lateral = self.merge = None
        if layout == "code":
            self.lateral = nn.Sequential(layer(128, 128, 3, 1, 1, 16), layer(128, 128, 3, 1, 1, 16))
            self.merge = layer(256, 128, 3, 1, 1, 16)

    def forward(self, x):
        e = self.net(x)  # (B, 128, G, G)
        if self.lateral is None:
            return e
        return self.merge(torch.cat([e, self.lateral(e)], 1))  # (B, 256, G, G) -> (B, 128, G, G)


class GlimpseEncoder(nn.Module):
    """Glimpse (M, 3, S, S) -> z_what mean and std, (M, D) each.

    layout "paper": appendix D.3's table, feature maps 32-16-16-13-6-3; "code": the code behind the
    paper's numbers, 32-16-8-4-1 (model.glimpse_encoder). Either ends in one linear layer. A 16-pixel
    glimpse (model.glimpse_size, not in the paper) enters at the second map, its first layer keeping 16."""

    def __init__(self, z_what_dim: int, layout: str = "paper", size: int = 32):
        super().__init__()
        self.dim = z_what_dim
        stride = 2 if size == 32 else 1  # 32 -> 16, or 16 kept
        stem = [conv_gn(3, 16, 3, 1, 1, 4), conv_gn(16, 32, 4 if stride == 2 else 3, stride, 1, 8)]  # S, 16
        if layout == "code":  # 8, 4, 1
            rest, side = [conv_gn(32, 64, 4, 2, 1, 8), conv_gn(64, 128, 4, 2, 1, 8), conv_gn(128, 256, 4, 1, 0, 16)], 1
        else:  # 16, 13, 6, 3
            rest, side = [conv_gn(32, 32, 3, 1, 1, 4), conv_gn(32, 64, 4, 1, 0, 8), conv_gn(64, 128, 4, 2, 1, 8),
                          conv_gn(128, 256, 4, 1, 0, 16)], 3
        layers = stem + rest
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(256 * side * side, 2 * z_what_dim)

    def forward(self, glimpse):
        return normal_params(self.head(self.net(glimpse)), self.dim)


class GlimpseDecoder(nn.Module):
    """z_what (M, D) -> glimpse mask alpha_att (M, 1, S, S) and appearance o_att (M, 3, S, S).

    colour "linear" (model.glimpse_colour) adds a linear map from z_what to a shift of o_att's logits, one
    per glimpse and channel, zero at initialisation. A 16-pixel glimpse (model.glimpse_size, not in the
    paper) stops at the 16x16 stage, whose last layer then narrows to 16 channels."""

    def __init__(self, z_what_dim: int, colour: str = "paper", size: int = 32):
        super().__init__()
        last = ([conv_sub(32, 16, 2, 4), conv_gn(16, 16, 3, 1, 1, 4)] if size == 32  # 32x32
                else [conv_gn(32, 16, 3, 1, 1, 4)])  # 16x16
        self.net = nn.Sequential(
            conv_gn(z_what_dim, 256, 1, 1, 0, 16),  # 1x1
            conv_sub(256, 128, 2, 16), conv_gn(128, 128, 3, 1, 1, 16),  # 2x2
            conv_sub(128, 128, 2, 16), conv_gn(128, 128, 3, 1, 1, 16),  # 4x4
            conv_sub(128, 64, 2, 8), conv_gn(64, 64, 3, 1, 1, 8),  # 8x8
            conv_sub(64, 32, 2, 8), conv_gn(32, 32, 3, 1, 1, 8),  # 16x16
            *last,
            nn.Conv2d(16, 4, 3, 1, 1),
        )
        self.colour = None
        if colour == "linear":  # zeros, drawing no random numbers: the rest starts as with "paper"
            self.colour = nn.Linear(z_what_dim, 3, device="meta").to_empty(device="cpu")
            nn.init.zeros_(self.colour.weight)
            nn.init.zeros_(self.colour.bias)

    def forward(self, z_what):
        logits = self.net(z_what[:, :, None, None])  # (M, 4, S, S): alpha_att's and o_att's
        if self.colour is not None:
            # (M, 3) -> (M, 4, 1, 1), alpha_att's logit unshifted
            logits = logits + F.pad(self.colour(z_what), (1, 0))[:, :, None, None]
        out = torch.sigmoid(logits)
        return out[:, :1], out[:, 1:]


def where_to_box(z_scale, z_shift, grid_size: int, shift_range: float):
    """z_where (.., G, G, 2) each -> glimpse centre and side as fractions of the image, (.., G, G, 2) each.

    Algorithm 1: z_where = [sigmoid(z_scale), rescale(tanh(z_shift))]; the centre moves up to
    `shift_range` cells from its cell's centre. Last axis is (x, y).
    """
    g = grid_size
    idx = torch.arange(g, device=z_shift.device, dtype=z_shift.dtype)
    cell_x = idx.view(1, g).expand(g, g)  # column
    cell_y = idx.view(g, 1).expand(g, g)  # row
    cell = torch.stack([cell_x, cell_y], -1)  # (G, G, 2)
    centre = (cell + 0.5 + shift_range * torch.tanh(z_shift)) / g
    return centre, torch.sigmoid(z_scale)


def glimpse_theta(centre, size):
    """Affine maps from glimpse coordinates to image coordinates, both in [-1, 1]: (M, 2, 3)."""
    m = centre.shape[0]
    theta = centre.new_zeros(m, 2, 3)
    theta[:, 0, 0] = size[:, 0]
    theta[:, 1, 1] = size[:, 1]
    theta[:, :, 2] = 2 * centre - 1
    return theta


def extract_glimpses(x, centre, size, glimpse_size: int):
    """Spatial transformer read: image (B, 3, N, N), boxes (B, C, 2) -> glimpses (B*C, 3, S, S).

    All of an image's glimpse grids are stacked into one sampling grid, so the image is never copied
    per cell.
    """
    b, c = centre.shape[:2]
    s = glimpse_size
    theta = glimpse_theta(centre.reshape(-1, 2), size.reshape(-1, 2))
    grid = F.affine_grid(theta, (b * c, 3, s, s), align_corners=False)  # (B*C, S, S, 2)
    grid = grid.view(b, c * s, s, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B, 3, C*S, S)
    return out.view(b, 3, c, s, s).transpose(1, 2).reshape(b * c, 3, s, s)


def boundary_band(glimpse_size: int, width: int, device=None):
    """Appendix C's kernel, as a penalty: 1 in the band of `width` pixels along the glimpse's border."""
    band = torch.ones(glimpse_size, glimpse_size, device=device)
    if width > 0:
        band[width:-width, width:-width] = 0
    else:
        band.zero_()
    return band


def to_canvas(maps, centre, size, n: int):
    """Glimpse-space maps (B, C, ch, S, S) warped onto the whole N x N canvas: (B, C, ch, N, N)."""
    b, c, ch, s, _ = maps.shape
    m = b * c
    # Inverse of glimpse_theta: canvas coordinates -> glimpse coordinates.
    sz = size.reshape(m, 2)
    cen = centre.reshape(m, 2)
    theta = sz.new_zeros(m, 2, 3)
    theta[:, 0, 0] = 1 / sz[:, 0]
    theta[:, 1, 1] = 1 / sz[:, 1]
    theta[:, :, 2] = -(2 * cen - 1) / sz
    grid = F.affine_grid(theta, (m, ch, n, n), align_corners=False)
    return F.grid_sample(maps.reshape(m, ch, s, s), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).view(b, c, ch, n, n)


def composite(maps, z_pres, depth_weight, centre, size, n: int, premultiplied: bool = True):
    """Depth-weighted compositing of glimpses into the foreground (algorithm 1, last lines).

    maps: (B, C, 5, S, S) glimpse-space alpha_att, o_att (3), boundary band; z_pres, depth_weight (B, C);
    centre, size (B, C, 2). Returns alpha (B, 1, N, N), mu_fg (B, 3, N, N) and appendix C's overlap map
    (B, 1, N, N): the present glimpses' border bands, sum_i z_pres_i band_i, times alpha.

    Per pixel, glimpse i has alpha_hat_i = alpha_att_i * z_pres_i and importance
    alpha_hat_i * depth_weight_i; w_i = importance_i / sum_j importance_j, alpha = sum_i w_i alpha_hat_i,
    mu_fg = sum_i w_i alpha_hat_i o_att_i (algorithm 1: y_att premultiplied by alpha_hat), or with
    `premultiplied=False` mu_fg = sum_i w_i o_att_i, the colour without the darkening by alpha_hat.

    Every glimpse is warped onto the whole canvas here; training computes the same per glimpse window
    (space/windows.py, `composite_windowed`).
    """
    full = to_canvas(maps, centre, size, n)  # (B, C, 5, N, N)
    alpha_hat = full[:, :, :1] * z_pres[:, :, None, None, None]
    imp = alpha_hat * depth_weight[:, :, None, None, None]
    denom = imp.sum(1) + EPS
    alpha = (imp * alpha_hat).sum(1) / denom  # (B, 1, N, N)
    mu_fg = (imp * (alpha_hat if premultiplied else 1) * full[:, :, 1:4]).sum(1) / denom  # (B, 3, N, N)
    overlap = (full[:, :, 4:5] * z_pres[:, :, None, None, None]).sum(1) * alpha  # (B, 1, N, N)
    return alpha, mu_fg, overlap


class Foreground(nn.Module):
    """Algorithm 1: all cells inferred in parallel (equation 7)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = FgImageEncoder(cfg.image_size, cfg.grid_size, cfg.fg_encoder)
        self.z_pres_net = nn.Conv2d(128, 1, 1)
        self.z_depth_net = nn.Conv2d(128, 2 * cfg.z_depth_dim, 1)
        self.z_scale_net = nn.Conv2d(128, 4, 1)
        self.z_shift_net = nn.Conv2d(128, 4, 1)
        self.glimpse_encoder = GlimpseEncoder(cfg.z_what_dim, cfg.glimpse_encoder, cfg.glimpse_size)
        self.glimpse_decoder = GlimpseDecoder(cfg.z_what_dim, cfg.glimpse_colour, cfg.glimpse_size)
        self.register_buffer("band", boundary_band(cfg.glimpse_size, cfg.boundary_width), persistent=False)
        self.checkpoint_images = 0  # images per activation-checkpointed chunk (0: keep every activation)
        self.z_pres_fixed = None  # (B, G, G) or None: z_pres set from outside (space/refine.py), eval only
        # Start glimpses at the size the z_scale prior expects rather than half the image: the posterior
        # begins near its prior and the compositing windows start small.
        with torch.no_grad():
            self.z_scale_net.bias[:2].copy_(torch.tensor(z_scale_prior_means(cfg.z_scale_prior_mean.start,
                                                                              cfg.z_scale_prior_aspect)))
            # and with the prior's spread: softplus(b) = z_scale_prior_std
            self.z_scale_net.bias[2:].fill_(math.log(math.expm1(cfg.z_scale_prior_std.start)))

    def forward(self, x, z_scale_prior_mean: float, z_scale_prior_std: float, z_pres_prior: float, tau: float,
                cells: dict | None = None):
        """x (B, 3, N, N) -> the foreground's outputs, a dict of per-image tensors (batch first).
        cells: `infer_cells`'s output on x in eval mode, if already computed (space/refine.py reuses it)."""
        if cells is not None:
            return self.finish(cells, z_scale_prior_mean, z_scale_prior_std, z_pres_prior, tau)
        # Every foreground layer works per image, so a batch may run in recomputed chunks (space/recompute.py).
        parts = in_chunks(self.infer, x, self.checkpoint_images, z_scale_prior_mean, z_scale_prior_std,
                          z_pres_prior, tau)
        return parts[0] if len(parts) == 1 else join_chunks(parts)

    def glimpse_maps(self, glimpses):
        """Glimpses (M, 3, S, S) -> maps (M, 5, S, S) (see `decode`) and z_what's KL (M,) against N(0, 1)."""
        what_mu, what_sigma = self.glimpse_encoder(glimpses)  # (M, D)
        z_what = what_mu + what_sigma * torch.randn_like(what_sigma) if self.training else what_mu
        return self.decode(z_what), gaussian_kl(what_mu, what_sigma, 0.0, 1.0).sum(-1)

    def decode(self, z_what):
        """z_what (M, D) -> maps (M, 5, S, S): alpha_att, o_att (3) and appendix C's boundary band, each in
        glimpse space."""
        alpha_att, o_att = self.glimpse_decoder(z_what)  # (M, 1, S, S), (M, 3, S, S)
        m, s = z_what.shape[0], alpha_att.shape[-1]
        return torch.cat([alpha_att, o_att, self.band.expand(m, 1, s, s)], 1)

    def render(self, maps, z_pres, z_depth, centre, size):
        """Algorithm 1's last lines: the glimpses' maps (B, C, 5, S, S) composited by z_pres and z_depth
        (B, C) at their boxes, centre and size (B, C, 2). Returns alpha (B, 1, N, N), mu_fg (B, 3, N, N), the
        boundary overlap map (B, 1, N, N) and the depth weights (B, C)."""
        cfg = self.cfg
        # Depth weights exp(-c * sigmoid(z_depth)), shifted per image so they cannot all underflow.
        depth = cfg.depth_sharpness * torch.sigmoid(z_depth)  # (B, C)
        depth_weight = torch.exp(-(depth - depth.min(1, keepdim=True).values))
        alpha, mu_fg, overlap = composite_windowed(maps, z_pres, depth_weight, centre, size, cfg.image_size,
                                                   cfg.fg_mean == "premultiplied", eps=EPS)
        return alpha, mu_fg, overlap, depth_weight

    def infer(self, x, z_scale_prior_mean: float, z_scale_prior_std: float, z_pres_prior: float, tau: float):
        """Algorithm 1 on a batch (or a chunk of one)."""
        return self.finish(self.infer_cells(x), z_scale_prior_mean, z_scale_prior_std, z_pres_prior, tau)

    def infer_cells(self, x):
        """Algorithm 1 up to z_pres: each cell's latents, glimpse and decoded maps, none of which depends on
        z_pres (so space/refine.py computes them once per frame). A dict of per-cell tensors (batch first)."""
        cfg = self.cfg
        b, g, s = x.shape[0], cfg.grid_size, cfg.glimpse_size
        c = g * g
        e = self.encoder(x)  # (B, 128, G, G)
        cells = lambda t: t.permute(0, 2, 3, 1)  # noqa: E731  (B, ch, G, G) -> (B, G, G, ch)

        pres_logit = full_precision(cells(self.z_pres_net(e))[..., 0])  # (B, G, G), float32 as normal_params
        if cfg.z_pres_logit_bound:
            pres_logit = cfg.z_pres_logit_bound * torch.tanh(pres_logit)
        # z_pres's logistic noise, drawn here, before the other latents' noise (the order of the draws)
        u = torch.rand_like(pres_logit).clamp(EPS, 1 - EPS) if self.training else None
        depth_mu, depth_sigma = normal_params(cells(self.z_depth_net(e)), cfg.z_depth_dim)  # (B, G, G, 1)
        scale_mu, scale_sigma = normal_params(cells(self.z_scale_net(e)), 2)  # (B, G, G, 2)
        shift_mu, shift_sigma = normal_params(cells(self.z_shift_net(e)), 2)
        rs = (lambda mu, sd: mu + sd * torch.randn_like(sd)) if self.training else (lambda mu, sd: mu)
        z_depth = rs(depth_mu, depth_sigma)
        z_scale = rs(scale_mu, scale_sigma)
        z_shift = rs(shift_mu, shift_sigma)
        centre, size = where_to_box(z_scale, z_shift, g, cfg.shift_range)  # (B, G, G, 2) each

        # Each cell's glimpse, encoded to z_what and decoded to its mask and appearance (appendix D.3).
        # Sparse mode (space/sparse.py) decodes only the cells likely to hold an object.
        centre_f, size_f = centre.reshape(b, c, 2), size.reshape(b, c, 2)
        glimpses = extract_glimpses(x, centre_f, size_f, s)  # (B*C, 3, S, S)
        if cfg.sparse_threshold > 0:
            # (cells the refine search fixed on are decoded too, so the cached cells of refine.py are not used)
            maps, kl_what, decoded = sparse_cells(self.glimpse_maps, glimpses,
                                                  torch.sigmoid(self._fixed(pres_logit)).reshape(-1),
                                                  cfg.sparse_threshold)
        else:
            maps, kl_what = self.glimpse_maps(glimpses)  # (B*C, 5, S, S) alpha_att, o_att, band; (B*C,)
            decoded = b * c
        return {"pres_logit": pres_logit, "u": u, "depth_mu": depth_mu, "depth_sigma": depth_sigma,
                "scale_mu": scale_mu, "scale_sigma": scale_sigma, "shift_mu": shift_mu, "shift_sigma": shift_sigma,
                "z_depth": z_depth, "centre": centre, "size": size,
                "maps": maps.view(b, c, 5, s, s), "kl_what": kl_what.view(b, g, g), "glimpses_decoded": decoded}

    def _fixed(self, pres_logit):
        """The z_pres logits (B, G, G) with the cells space/refine.py's search decided set: z_pres_fixed's 0 or
        1 as -+FIXED_LOGIT, NaN = inferred."""
        if self.z_pres_fixed is None:
            return pres_logit
        fixed = self.z_pres_fixed.to(pres_logit)
        return torch.where(torch.isnan(fixed), pres_logit, (2 * fixed - 1) * FIXED_LOGIT)

    def finish(self, cells, z_scale_prior_mean: float, z_scale_prior_std: float, z_pres_prior: float, tau: float):
        """Algorithm 1 from z_pres on: `infer_cells`'s output -> z_pres, the composite and the KL terms."""
        cfg = self.cfg
        pres_logit = cells["pres_logit"]  # (B, G, G)
        b, g = pres_logit.shape[0], pres_logit.shape[1]
        c = g * g
        pres_logit = self._fixed(pres_logit)
        pres_prob = torch.sigmoid(pres_logit)
        # z_pres: relaxed Bernoulli (binary Gumbel-softmax) with temperature tau; hard samples for display.
        if self.training:
            u = cells["u"]
            z_pres = torch.sigmoid((pres_logit + torch.log(u) - torch.log1p(-u)) / tau)
        else:
            z_pres = pres_prob
        z_depth, maps = cells["z_depth"], cells["maps"]
        centre_f, size_f = cells["centre"].reshape(b, c, 2), cells["size"].reshape(b, c, 2)
        alpha, mu_fg, overlap, depth_weight = self.render(maps, z_pres.reshape(b, c), z_depth[..., 0].reshape(b, c),
                                                          centre_f, size_f)

        # KL terms (appendix B), per cell; z_where, z_depth, z_what weighted by the z_pres sample (the
        # paper's appendix) or charged for every cell (model.kl_weighting, the paper's code).
        kl_pres = bernoulli_kl(pres_prob, z_pres_prior)  # (B, G, G)
        scale_mu = cells["scale_mu"]
        scale_prior = scale_mu.new_tensor(z_scale_prior_means(z_scale_prior_mean, cfg.z_scale_prior_aspect))  # (2,)
        kl_scale = gaussian_kl(scale_mu, cells["scale_sigma"], scale_prior, z_scale_prior_std).sum(-1)
        kl_shift = gaussian_kl(cells["shift_mu"], cells["shift_sigma"], cfg.z_shift_prior_mean,
                               cfg.z_shift_prior_std).sum(-1)
        kl_depth = gaussian_kl(cells["depth_mu"], cells["depth_sigma"], cfg.z_depth_prior_mean,
                               cfg.z_depth_prior_std).sum(-1)
        zp = z_pres if cfg.kl_weighting == "z_pres" else torch.ones_like(z_pres)
        return {
            "alpha": alpha,  # (B, 1, N, N)
            "mu_fg": mu_fg,  # (B, 3, N, N)
            "overlap": overlap,  # (B, 1, N, N) appendix C's map
            "kl_pres": kl_pres.sum((1, 2)),
            "kl_where": (zp * (kl_scale + kl_shift)).sum((1, 2)),
            "kl_depth": (zp * kl_depth).sum((1, 2)),
            "kl_what": (zp * cells["kl_what"]).sum((1, 2)),
            "z_pres": z_pres,  # (B, G, G) relaxed sample
            "z_pres_prob": pres_prob,  # (B, G, G)
            "centre": cells["centre"],  # (B, G, G, 2) fraction of the image, (x, y)
            "size": cells["size"],  # (B, G, G, 2)
            "z_depth": z_depth,
            "glimpses_decoded": cells["glimpses_decoded"],
            # For evaluation (which glimpse owns a pixel); not kept in training, where they would hold memory.
            **({} if self.training else {"glimpse_maps": maps, "depth_weight": depth_weight}),
        }


# ------------------------------------------------------------------------------------------ background


class MaskDecoder(nn.Module):
    """z_m (M, Dm) -> mask logits (M, 1, N, N), sub-pixel upsampling from 1x1 (appendix D.3)."""

    def __init__(self, z_dim: int, image_size: int):
        super().__init__()
        # The paper's 128 = 4 * 2 * 4 * 4; smaller images halve the leading factors.
        factors = [4, 2, 4, 4]
        while math.prod(factors) > image_size:
            if factors[0] > 2:
                factors[0] //= 2
            else:
                factors.pop(0)
        if math.prod(factors) != image_size:
            raise ValueError(f"image_size {image_size} is not reachable by the mask decoder's upsampling")
        chans = [256, 128, 64, 16][-len(factors):]
        groups = {256: 16, 128: 16, 64: 8, 16: 4}
        layers = [conv_gn(z_dim, 256, 1, 1, 0, 16)]
        cin = 256
        for f, ch in zip(factors, chans):
            layers += [conv_sub(cin, ch, f, groups[ch]), conv_gn(ch, ch, 3, 1, 1, groups[ch])]
            cin = ch
        layers.append(nn.Conv2d(cin, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)
        self.checkpoint_rows = 0  # rows per activation-checkpointed chunk (0: keep every activation)

    def forward(self, z):
        h = z[:, :, None, None]  # (M, Dm, 1, 1)
        # GroupNorm works per row, so chunks of rows are exact; recomputing them in the backward pass costs a
        # forward of this small decoder, ~5% of a step.
        parts = in_chunks(self.net, h, self.checkpoint_rows)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class CompDecoder(nn.Module):
    """Spatial broadcast decoder: z_c (M, Dc) -> component mean image (M, 3, N, N).

    layout "paper": appendix D.3's table, three 3x3 BN/ELU layers and a 3x3 output layer; "code": the code
    behind the paper's numbers, four 3x3 BN/ELU layers and a 1x1 output layer (model.comp_decoder). Both
    take 8 pixels off the broadcast canvas."""

    def __init__(self, z_dim: int, image_size: int, layout: str = "paper"):
        super().__init__()
        self.n = image_size
        hidden, out_kernel = (4, 1) if layout == "code" else (3, 3)
        self.net = nn.Sequential(
            conv_bn(z_dim + 2, 32, 3), *(conv_bn(32, 32, 3) for _ in range(hidden - 1)), nn.Conv2d(32, 3, out_kernel)
        )
        side = image_size + 8  # four unpadded 3x3 convolutions take 8 pixels off
        lin = torch.linspace(-1, 1, side)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        self.register_buffer("coords", torch.stack([xx, yy])[None], persistent=False)  # (1, 2, N+8, N+8)
        self.checkpoint_rows = 0  # rows per chunk in training (0: the whole batch at once)

    def forward(self, z):
        """z tiled over the canvas beside the two coordinate channels, through the layers: `tiled`, computed
        by space/recompute.py's `broadcast_decode` without building the tiled (M, Dc + 2, N+8, N+8) input
        or its gradient (exact, tested against `tiled`)."""
        rows = self.checkpoint_rows if self.training and torch.is_grad_enabled() else 0
        return broadcast_decode(self.net, self.coords, z, rows)  # (M, 3, N, N)

    def tiled(self, z):
        """The straightforward spatial broadcast: z tiled and concatenated with the coordinates."""
        m = z.shape[0]
        side = self.coords.shape[-1]
        tiled = z[:, :, None, None].expand(m, z.shape[1], side, side)  # (M, Dc, N+8, N+8)
        return torch.sigmoid(self.net(torch.cat([tiled, self.coords.expand(m, -1, -1, -1)], 1)))


def _enc_bn(cin, chans, image_size):
    layers, c = [], cin
    for ch in chans:
        layers.append(conv_bn(c, ch, 3, 2, 1))
        c = ch
    side = image_size // 2 ** len(chans)
    return nn.Sequential(*layers, nn.Flatten()), c * side * side


class Background(nn.Module):
    """Algorithms 2 (inference) and 3 (generation): K components, GENESIS-style."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, dm, dc = cfg.lstm_hidden, cfg.z_mask_dim, cfg.z_comp_dim
        self.image_encoder, flat = _enc_bn(3, [64, 64, 64, 64], cfg.image_size)
        self.image_fc = nn.Sequential(nn.Linear(flat, 64), nn.ELU())
        self.lstm = nn.LSTMCell(dm + 64, h)
        self.predict_mask = nn.Linear(h, 2 * dm)
        self.prior_lstm = nn.LSTMCell(dm, h)
        self.predict_mask_prior = nn.Linear(h, 2 * dm)
        self.mask_decoder = MaskDecoder(dm, cfg.image_size)
        self.comp_encoder, flat_c = _enc_bn(4, [32, 32, 64, 64], cfg.image_size)
        self.comp_head = nn.Linear(flat_c, 2 * dc)
        hc = cfg.comp_prior_hidden
        self.predict_comp = nn.Sequential(nn.Linear(dm, hc), nn.ELU(), nn.Linear(hc, hc), nn.ELU(), nn.Linear(hc, 2 * dc))
        self.comp_decoder = CompDecoder(dc, cfg.image_size, cfg.comp_decoder)
        if cfg.bg_initial_state == "learned":  # h_0, c_0 of both LSTMs and the dummy z^m_0, learned (from zeros)
            self.h0, self.c0, self.prior_h0, self.prior_c0 = (nn.Parameter(torch.zeros(h)) for _ in range(4))
            self.z_m0 = nn.Parameter(torch.zeros(dm))
        self.checkpoint_layers = False  # the encoders keep only convolution outputs for the backward pass

    def encode(self, encoder, x):
        return run_keeping_conv_outputs(leaf_layers(encoder), x) if self.checkpoint_layers else encoder(x)

    @staticmethod
    def stick_breaking(logits):
        """Mask logits (B, K, 1, N, N) -> log pi (B, K, 1, N, N); the last component takes the rest."""
        logits = full_precision(logits)  # float32 under bf16 autocast, as the latents (normal_params)
        log_m = F.logsigmoid(logits)
        log_not_m = F.logsigmoid(-logits)
        scope = torch.cumsum(log_not_m, 1) - log_not_m  # log prod_{j<k} (1 - m_j)
        log_pi = torch.cat([log_m[:, :-1] + scope[:, :-1], scope[:, -1:]], 1)
        return log_pi

    def initial_state(self, b: int, like: torch.Tensor):
        """Algorithms 2 and 3's h_0, c_0 (inference and prior LSTMs) and dummy z^m_0, each (B, .): zeros
        (the paper does not say) or learned (model.bg_initial_state, the paper's code)."""
        cfg = self.cfg
        if cfg.bg_initial_state == "learned":
            rows = lambda p: p.to(like.dtype).expand(b, -1)  # noqa: E731
            return rows(self.z_m0), (rows(self.h0), rows(self.c0)), (rows(self.prior_h0), rows(self.prior_c0))
        zeros = lambda d: like.new_zeros(b, d)  # noqa: E731
        hd = cfg.lstm_hidden
        return zeros(cfg.z_mask_dim), (zeros(hd), zeros(hd)), (zeros(hd), zeros(hd))

    def forward(self, x):
        cfg = self.cfg
        b, k, n = x.shape[0], cfg.n_components, cfg.image_size
        dm, dc = cfg.z_mask_dim, cfg.z_comp_dim
        e = self.image_fc(self.encode(self.image_encoder, x))  # (B, 64)
        z_prev, state, prior_state = self.initial_state(b, x)
        z_m, kl_m = [], []
        for _ in range(k):  # the only sequential part: z^m_k depends on z^m_<k
            prior_state = self.prior_lstm(z_prev, prior_state)
            p_mu, p_sigma = normal_params(self.predict_mask_prior(prior_state[0]), dm)
            state = self.lstm(torch.cat([z_prev, e], 1), state)
            q_mu, q_sigma = normal_params(self.predict_mask(state[0]), dm)
            z = q_mu + q_sigma * torch.randn_like(q_sigma) if self.training else q_mu
            kl_m.append(gaussian_kl(q_mu, q_sigma, p_mu, p_sigma).sum(1))
            z_m.append(z)
            z_prev = z
        z_m = torch.stack(z_m, 1)  # (B, K, Dm)
        logits = self.mask_decoder(z_m.view(b * k, dm)).view(b, k, 1, n, n)
        log_pi = self.stick_breaking(logits)  # (B, K, 1, N, N)
        pi = log_pi.exp()
        # The component encoder sees [pi_k, x] (algorithm 2) or [log(pi_k + floor), x] (the paper's code)
        mask_in = pi if cfg.comp_encoder_input == "pi" else torch.log(pi + LOG_PI_FLOOR)
        enc_in = torch.cat([mask_in, x[:, None].expand(b, k, 3, n, n)], 2).view(b * k, 4, n, n)
        c_mu, c_sigma = normal_params(self.comp_head(self.encode(self.comp_encoder, enc_in)), dc)  # (B*K, Dc)
        z_c = c_mu + c_sigma * torch.randn_like(c_sigma) if self.training else c_mu
        pc_mu, pc_sigma = normal_params(self.predict_comp(z_m.view(b * k, dm)), dc)
        kl_c = gaussian_kl(c_mu, c_sigma, pc_mu, pc_sigma).sum(1).view(b, k)
        mu_bg = self.comp_decoder(z_c).view(b, k, 3, n, n)
        return {
            "log_pi": log_pi,  # (B, K, 1, N, N)
            "mu_bg": mu_bg,  # (B, K, 3, N, N)
            "z_mask": z_m,  # (B, K, Dm) sampled in training, the means in eval
            "z_comp": z_c.view(b, k, dc),  # (B, K, Dc)
            "kl_bg_mask": torch.stack(kl_m, 1).sum(1),  # (B,)
            "kl_bg_comp": kl_c.sum(1),
        }

    @torch.no_grad()
    def generate(self, b: int, device=None):
        """Algorithm 3: background components from the prior."""
        cfg = self.cfg
        k, n, dm, dc = cfg.n_components, cfg.image_size, cfg.z_mask_dim, cfg.z_comp_dim
        z_prev, _, state = self.initial_state(b, torch.zeros((), device=device))
        z_m = []
        for _ in range(k):
            state = self.prior_lstm(z_prev, state)
            mu, sigma = normal_params(self.predict_mask_prior(state[0]), dm)
            z_prev = mu + sigma * torch.randn_like(sigma)
            z_m.append(z_prev)
        z_m = torch.stack(z_m, 1)
        log_pi = self.stick_breaking(self.mask_decoder(z_m.view(b * k, dm)).view(b, k, 1, n, n))
        mu, sigma = normal_params(self.predict_comp(z_m.view(b * k, dm)), dc)
        mu_bg = self.comp_decoder(mu + sigma * torch.randn_like(sigma)).view(b, k, 3, n, n)
        return log_pi.exp(), mu_bg


# ------------------------------------------------------------------------------------------------ SPACE


def boundary_loss(overlap, cfg: ModelConfig, step: int):
    """Appendix C's boundary loss per image (B,) from the overlap map (B, 1, N, N), summed over the canvas
    like the log-likelihood (both are per image; a per-pixel mean would weigh it 1/N^2 against the ELBO).
    "linear" (the paper's text): the map itself. "gaussian" (the paper's code): minus the log density of
    N(0, boundary_sigma) at the overlap, without its constant: overlap^2 / (2 sigma^2). Off from
    model.boundary_off_step."""
    if cfg.boundary_off_step and step >= cfg.boundary_off_step:
        return overlap.new_zeros(overlap.shape[0])
    if cfg.boundary_loss == "gaussian":
        return (overlap**2).sum((1, 2, 3)) / (2 * cfg.boundary_sigma**2)
    return overlap.sum((1, 2, 3))



def tempered_log_likelihood(log_fg, log_bg, temperature: float):
    """Equation 1's log-likelihood per image (B,), its gradient tempered (model.mixture_temperature).

    log_fg (B, 1, C, N, N) and log_bg (B, K, C, N, N): log alpha N(x; mu_fg) and log (1 - alpha) pi_k
    N(x; mu_k), C = 1 (mixed per pixel) or 3 (per channel). The value is always the exact log-sum-exp. Its
    gradient is that of sum_j r_j log p_j over the foreground and the K background components, with
    r = softmax(log p / T) held fixed: at T = 1 exactly the log-sum-exp's gradient; above 1 every component
    gets a share of every pixel, the ones that explain it worse too (deterministic annealing). Tempering
    between the foreground and the background as a whole only, with the components' exact shares within
    the background, did not help: the background specialised and the foreground died (BENCHMARKS.md)."""
    log_joint = torch.cat([log_fg, log_bg], 1)  # (B, 1+K, C, N, N)
    log_lik = torch.logsumexp(log_joint, 1).sum((1, 2, 3))  # (B,)
    if temperature == 1.0 or not torch.is_grad_enabled():
        return log_lik
    r = torch.softmax(log_joint.detach() / temperature, 1)
    tempered = (r * log_joint).sum(1).sum((1, 2, 3))
    return log_lik.detach() + tempered - tempered.detach()


class SPACE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.fg = Foreground(cfg)
        self.bg = Background(cfg)

    def forward(self, x, step: int = 0, bg: dict | None = None, fg_cells: dict | None = None):
        """x (B, 3, N, N) in [0, 1] -> the loss and everything needed to look at the decomposition.
        bg, fg_cells: the background's output on x and the foreground's `infer_cells`, when already computed
        (space/refine.py reuses them in eval mode; neither depends on z_pres)."""
        bg = self.bg(x) if bg is None else bg
        fg = self.fg(x, *self.fg_schedules(step), fg_cells)
        return self.assemble(x, bg, fg, step)

    def fg_schedules(self, step: int) -> tuple:
        """The foreground's annealed settings at `step`: z_scale's prior mean and std, z_pres's prior, tau."""
        cfg = self.cfg
        return (cfg.z_scale_prior_mean.at(step), cfg.z_scale_prior_std.at(step), cfg.z_pres_prior.at(step),
                cfg.tau.at(step))

    def assemble(self, x, bg: dict, fg: dict, step: int) -> dict:
        """The background's and foreground's outputs on x (B, 3, N, N) -> the loss and its terms (equations 1
        and 6, appendix C), each image's alone in "per_image" ((B,) each) and their means in "terms"."""
        cfg = self.cfg
        pi = bg["log_pi"].exp()
        bg_image = (pi * bg["mu_bg"]).sum(1)  # (B, 3, N, N)
        alpha = full_precision(fg["alpha"]).clamp(EPS, 1 - EPS)  # (B, 1, N, N), float32 under bf16 autocast
        if step < cfg.fix_alpha_steps:  # appendix D.2: a fixed alpha lets both modules start learning
            alpha = torch.full_like(alpha, cfg.fix_alpha_value)

        # Equation 1 in log space: alpha N(x; mu_fg, s_fg) + (1 - alpha) sum_k pi_k N(x; mu_k, s_bg), mixed per
        # pixel (a Gaussian over RGB per component) or per colour channel (model.mixture).
        per_channel = cfg.mixture == "channel"

        def log_normal(mu, sigma):  # (B, ., 3, N, N) -> (B, ., 1 or 3, N, N)
            v = -0.5 * ((x.unsqueeze(1) - full_precision(mu)) / sigma) ** 2 - math.log(sigma) - 0.5 * LOG_2PI
            return v if per_channel else v.sum(2, keepdim=True)

        log_fg = torch.log(alpha)[:, None] + log_normal(fg["mu_fg"][:, None], cfg.fg_sigma)  # (B, 1, 1|3, N, N)
        log_bg = torch.log1p(-alpha)[:, None] + bg["log_pi"] + log_normal(bg["mu_bg"], cfg.bg_sigma)  # (B, K, 1|3, N, N)
        # The exact log-likelihood (B,); above model.mixture_temperature 1 its gradient is tempered.
        log_lik = tempered_log_likelihood(log_fg, log_bg, cfg.mixture_temperature.at(step))

        kl = fg["kl_pres"] + fg["kl_where"] + fg["kl_depth"] + fg["kl_what"] + bg["kl_bg_mask"] + bg["kl_bg_comp"]
        elbo = log_lik - kl  # equation 6
        boundary = cfg.boundary_loss_weight * boundary_loss(fg["overlap"], cfg, step)  # (B,)
        objective = -elbo + boundary  # (B,) per image: what training minimises (appendix C)
        loss = objective
        kl_what_weight = cfg.kl_what_weight.at(step)
        if kl_what_weight != 1.0:  # model.kl_what_weight (not in the paper): z_what's KL reweighted in the loss only
            loss = loss + (kl_what_weight - 1.0) * fg["kl_what"]

        recon = fg["alpha"] * fg["mu_fg"] + (1 - fg["alpha"]) * bg_image
        per_image = {  # (B,) each; training minimises the mean of "loss"
            "loss": loss,
            "elbo": elbo,
            "log_lik": log_lik,
            "kl_pres": fg["kl_pres"],
            "kl_where": fg["kl_where"],
            "kl_depth": fg["kl_depth"],
            "kl_what": fg["kl_what"],
            "kl_bg_mask": bg["kl_bg_mask"],
            "kl_bg_comp": bg["kl_bg_comp"],
            "boundary_loss": boundary,
        }
        return {
            "terms": {k: v.mean() for k, v in per_image.items()},
            "per_image": per_image,
            "recon": recon,
            "mse": ((recon - x) ** 2).mean((1, 2, 3)),  # (B,) per pixel and channel
            "objective": objective.detach(),  # (B,)
            "fg": fg,
            "bg": bg,
            "bg_image": bg_image,
            "pi": pi,
        }

    def set_checkpoint_images(self, images: int) -> None:
        """Activation checkpointing (train.checkpoint_images): recompute instead of storing activations.

        The foreground runs in chunks of this many images. Training's step takes each chunk backward as
        soon as it has gone forward (space/recompute.py, `forward_backward_in_chunks`); a plain model(x)
        drops the chunks' activations and recomputes them in the backward pass (`in_chunks`). The
        background's encoders keep only their convolutions' outputs and recompute the
        normalisations and activations between them (`run_keeping_conv_outputs`); its mask decoder runs in
        recomputed chunks of rows, and its component decoder goes layer by layer in chunks of rows with
        BatchNorm statistics over the whole batch (space/recompute.py, `broadcast_decode`).
        0 stores every activation.
        """
        self.fg.checkpoint_images = int(images)
        self.bg.mask_decoder.checkpoint_rows = int(images) * self.cfg.n_components
        self.bg.comp_decoder.checkpoint_rows = int(images) * self.cfg.n_components
        self.bg.checkpoint_layers = images > 0

    def param_groups(self):
        """Foreground parameters (RMSProp) and background parameters (Adam), appendix D.2."""
        return list(self.fg.parameters()), list(self.bg.parameters())
