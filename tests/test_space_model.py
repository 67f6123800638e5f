"""The SPACE model (space/model.py, space/config.py) against independent facts.

Shapes through every module, the KL terms against torch.distributions, gradients reaching every
parameter, the windowed compositor against the full-canvas one and against hand-computed canvases,
the spatial-transformer read, appendix C's boundary loss, GENESIS stick-breaking, z_where's box
geometry, the annealing schedules and the paper's hyperparameters (appendix D.2).

Everything runs on tiny settings (32x32 or 64x64 images, a 4x4 grid, K=2, batches of 2) so the file
takes seconds on two CPU cores.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from space.config import LEARNED, PRESETS, Anneal, Config, ConfigError, ModelConfig, preset
from space.windows import composite_windowed
from space.model import (
    SPACE,
    Background,
    CompDecoder,
    FgImageEncoder,
    GlimpseDecoder,
    GlimpseEncoder,
    GroupNorm,
    MaskDecoder,
    bernoulli_kl,
    boundary_band,
    composite,
    extract_glimpses,
    gaussian_kl,
    normal_params,
    where_to_box,
)


S = 32  # the paper's glimpse side

# Compositor tolerance: composite_windowed and composite do the same arithmetic in another order, so in
# float64 they agree to round-off; we allow 1e-9 absolute + 1e-7 relative (float32 would be ~1e-5).
CMP_TOL = dict(rtol=1e-7, atol=1e-9)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(image_size=32, grid_size=4, n_components=2)
    base.update(kw)
    return ModelConfig(**base)


# ------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("n,g", [(64, 4), (64, 8), (128, 8), (128, 16), (32, 4), (32, 8)])
def test_fg_image_encoder_gives_one_feature_per_cell(n, g):
    enc = FgImageEncoder(n, g)
    out = enc(torch.rand(2, 3, n, n))
    assert out.shape == (2, 128, g, g)


@pytest.mark.parametrize("n,g", [(64, 64), (64, 32), (128, 2)])
def test_fg_image_encoder_refuses_unreachable_grids(n, g):
    with pytest.raises(ValueError, match="image_size / grid_size"):
        FgImageEncoder(n, g)


def test_glimpse_encoder_and_decoder_shapes_and_ranges():
    torch.manual_seed(0)
    enc, dec = GlimpseEncoder(32), GlimpseDecoder(32)
    mu, sigma = enc(torch.rand(5, 3, S, S))
    assert mu.shape == sigma.shape == (5, 32)
    assert (sigma > 0).all()  # softplus
    alpha, o = dec(torch.randn(5, 32))
    assert alpha.shape == (5, 1, S, S) and o.shape == (5, 3, S, S)
    assert ((alpha >= 0) & (alpha <= 1)).all() and ((o >= 0) & (o <= 1)).all()  # sigmoid


def test_glimpse_colour_linear_starts_as_the_paper_and_reaches_colours_the_paper_cannot():
    """model.glimpse_colour: "linear" draws no random numbers and adds zero at initialisation, so it starts
    as "paper" does. The paper's decoder, freshly built, paints nearly one mean colour whatever z_what (its
    GroupNorm layers normalise the per-glimpse mean away); fitting z_what alone cannot make it green. Fitting
    z_what and the linear map can."""
    torch.manual_seed(0)
    paper = GlimpseDecoder(32)
    torch.manual_seed(0)
    linear = GlimpseDecoder(32, "linear")
    z = torch.randn(64, 32)
    for a, b in zip(paper(z), linear(z)):
        assert torch.equal(a, b)
    mean_colour = paper(z)[1].mean((2, 3))  # (64, 3)
    assert mean_colour.std(0).max() < 0.05

    green = torch.tensor([0.13, 0.50, 0.17])[None, :, None, None]

    def fit(dec, params):
        zz = torch.randn(4, 32, requires_grad=True)
        opt = torch.optim.Adam([zz, *params], lr=0.05)
        for _ in range(150):
            loss = ((dec(zz)[1] - green) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return dec(zz)[1].mean((0, 2, 3)).detach()

    far = fit(paper, [])
    near = fit(linear, list(linear.colour.parameters()))
    target = green.flatten()
    assert (far - target).abs().max() > 0.2
    assert (near - target).abs().max() < 0.05


def test_extract_glimpses_shape():
    x = torch.rand(2, 3, 64, 64)
    centre, size = torch.rand(2, 7, 2), torch.rand(2, 7, 2)
    assert extract_glimpses(x, centre, size, S).shape == (14, 3, S, S)


def test_composite_shapes():
    b, c, n = 2, 5, 48
    alpha, mu, overlap = composite_windowed(torch.rand(b, c, 5, S, S), torch.rand(b, c), torch.rand(b, c),
                                   torch.rand(b, c, 2), torch.rand(b, c, 2) * 0.5, n)
    assert alpha.shape == (b, 1, n, n) and mu.shape == (b, 3, n, n) and overlap.shape == (b, 1, n, n)


@pytest.mark.parametrize("n", [32, 64, 128])
def test_mask_decoder_reaches_image_size(n):
    dec = MaskDecoder(32, n)
    assert dec(torch.randn(3, 32)).shape == (3, 1, n, n)


def test_mask_decoder_refuses_sizes_it_cannot_reach():
    with pytest.raises(ValueError, match="not reachable"):
        MaskDecoder(32, 48)


@pytest.mark.parametrize("n", [32, 64])
def test_comp_decoder_shape_and_range(n):
    dec = CompDecoder(32, n)
    out = dec(torch.randn(3, 32))
    assert out.shape == (3, 3, n, n)
    assert ((out >= 0) & (out <= 1)).all()


@pytest.mark.parametrize("layout", ["paper", "code"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_comp_decoder_equals_the_tiled_spatial_broadcast(train_mode, layout):
    """The first convolution's z part computed once per component equals convolving the tiled z: outputs
    and every gradient (BatchNorm in training and eval mode), in either layout."""
    torch.manual_seed(0)
    dec = CompDecoder(8, 32, layout).double().train(train_mode)
    z = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (dec.forward, dec.tiled):
        dec.zero_grad()
        z.grad = None
        out = fn(z)
        (out * torch.linspace(0, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        results.append((out.detach(), z.grad.clone(), {n: p.grad.clone() for n, p in dec.named_parameters()}))
    (o1, gz1, gp1), (o2, gz2, gp2) = results
    assert torch.allclose(o1, o2, atol=1e-12)
    assert torch.allclose(gz1, gz2, atol=1e-10)
    for name in gp1:
        assert torch.allclose(gp1[name], gp2[name], atol=1e-9), name


@pytest.mark.parametrize("n,k", [(32, 2), (64, 3)])
def test_background_shapes_and_mixing_weights_sum_to_one(n, k):
    torch.manual_seed(1)
    bg = Background(tiny_cfg(image_size=n, n_components=k))
    out = bg(torch.rand(2, 3, n, n))
    assert out["log_pi"].shape == (2, k, 1, n, n)
    assert out["mu_bg"].shape == (2, k, 3, n, n)
    assert out["kl_bg_mask"].shape == out["kl_bg_comp"].shape == (2,)
    # pi is a distribution over components at every pixel: logsumexp_k log pi_k == 0.
    lse = torch.logsumexp(out["log_pi"], 1)
    assert lse.abs().max() < 1e-5
    assert (out["kl_bg_mask"] >= 0).all() and (out["kl_bg_comp"] >= 0).all()
    pi, mu = bg.generate(2)
    assert pi.shape == (2, k, 1, n, n) and mu.shape == (2, k, 3, n, n)
    assert torch.allclose(pi.sum(1), torch.ones(()), atol=1e-5)


@pytest.fixture(scope="module")
def space_out():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = SPACE(cfg)
    x = torch.rand(2, 3, 32, 32)
    out = model(x, step=0)
    return cfg, model, x, out


def test_space_forward_shapes(space_out):
    cfg, _, x, out = space_out
    g, n = cfg.grid_size, cfg.image_size
    assert out["recon"].shape == x.shape
    assert out["mse"].shape == (2,)
    assert out["bg_image"].shape == x.shape
    assert out["pi"].shape == (2, cfg.n_components, 1, n, n)
    for k in ("z_pres", "z_pres_prob"):
        assert out["fg"][k].shape == (2, g, g)
    assert out["fg"]["centre"].shape == out["fg"]["size"].shape == (2, g, g, 2)
    assert out["fg"]["glimpses_decoded"] == 2 * g * g
    names = {"loss", "elbo", "log_lik", "kl_pres", "kl_where", "kl_depth", "kl_what", "kl_bg_mask",
             "kl_bg_comp", "boundary_loss"}
    assert set(out["terms"]) == names
    for k, v in out["terms"].items():
        assert v.dim() == 0, k
        assert torch.isfinite(v), k


@pytest.mark.parametrize("mixture", ["pixel", "channel"])
def test_log_likelihood_is_equation_1_as_torch_distributions_computes_it(mixture):
    """The ELBO's log-likelihood is equation 1's mixture, alpha N(x; mu_fg, s_fg) + (1 - alpha) sum_k pi_k
    N(x; mu_k, s_bg), per pixel (a Gaussian over RGB) or per colour channel, computed here from the
    model's own maps by torch.distributions' MixtureSameFamily in float64. alpha is kept in [EPS, 1 - EPS]
    as the model keeps it (outside every glimpse alpha is 0, and log 0 is no number)."""
    from torch.distributions import Categorical, Independent, MixtureSameFamily

    from space.model import EPS

    torch.manual_seed(0)
    cfg = tiny_cfg(mixture=mixture)
    x = torch.rand(2, 3, 32, 32)
    out = SPACE(cfg)(x, step=0)
    b, k, n = 2, cfg.n_components, cfg.image_size
    alpha = out["fg"]["alpha"].detach().double().clamp(EPS, 1 - EPS)  # (B, 1, N, N)
    weights = torch.cat([alpha, (1 - alpha) * out["pi"].detach().double()[:, :, 0]], 1)  # (B, 1+K, N, N)
    means = torch.cat([out["fg"]["mu_fg"].detach()[:, None], out["bg"]["mu_bg"].detach()], 1).double()
    sigmas = torch.tensor([cfg.fg_sigma] + [cfg.bg_sigma] * k, dtype=torch.float64)[None, :, None, None, None]
    # pixels (and, per channel, channels) as the batch of the mixture: (P, 1+K) weights, (P, 1+K, D) means
    loc = means.permute(0, 3, 4, 1, 2)  # (B, N, N, 1+K, 3)
    scale = sigmas.expand(b, 1 + k, 3, n, n).permute(0, 3, 4, 1, 2)
    w = weights.permute(0, 2, 3, 1)  # (B, N, N, 1+K)
    obs = x.double().permute(0, 2, 3, 1)  # (B, N, N, 3)
    if mixture == "pixel":
        dist = MixtureSameFamily(Categorical(probs=w), Independent(Normal(loc, scale), 1))
        log_lik = dist.log_prob(obs).sum((1, 2))
    else:
        dist = MixtureSameFamily(Categorical(probs=w[..., None, :].expand(b, n, n, 3, 1 + k)),
                                 Normal(loc.transpose(-1, -2), scale.transpose(-1, -2)))
        log_lik = dist.log_prob(obs).sum((1, 2, 3))
    assert float(out["terms"]["log_lik"]) == pytest.approx(float(log_lik.mean()), rel=1e-5)


def test_kl_pres_is_the_bernoulli_kl_against_the_prior_of_the_step(space_out):
    cfg, _, _, out = space_out
    prob = out["fg"]["z_pres_prob"].detach()
    prior = Bernoulli(probs=torch.full_like(prob, cfg.z_pres_prior.at(0)))
    expected = kl_divergence(Bernoulli(probs=prob), prior).sum((1, 2)).mean()
    assert float(out["terms"]["kl_pres"]) == pytest.approx(float(expected), rel=1e-4)
    for k in ("kl_pres", "kl_where", "kl_depth", "kl_what", "kl_bg_mask", "kl_bg_comp", "boundary_loss"):
        assert float(out["terms"][k]) >= 0, k


def test_kl_where_uses_the_z_scale_prior_of_the_step():
    """model.z_scale_prior_std as a schedule: z_where's KL at a step is against N(mean(step), std(step)),
    checked against torch.distributions on the z_scale posterior the model computed."""
    torch.manual_seed(5)
    cfg = tiny_cfg(z_scale_prior_std=Anneal(0.3, 0.1, 0, 100), z_scale_prior_mean=Anneal(-1.5, -1.5))
    model = SPACE(cfg).eval()
    assert float(torch.nn.functional.softplus(model.fg.z_scale_net.bias[2])) == pytest.approx(0.3, rel=1e-5)
    heads = []
    model.fg.z_scale_net.register_forward_hook(lambda mod, inp, out: heads.append(out.detach()))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        early, late = model(x, step=0), model(x, step=50)
    mu, sd = normal_params(heads[0].permute(0, 2, 3, 1), 2)  # (B, G, G, 2), the same at both steps
    zp = early["fg"]["z_pres"]  # (B, G, G): eval mode, the probability, equal at both steps

    def kl_scale(std):
        return (zp * kl_divergence(Normal(mu, sd), Normal(-1.5, std)).sum(-1)).sum((1, 2))  # (B,)

    # z_shift's KL is the same at both steps, so the difference is z_scale's alone.
    diff = late["fg"]["kl_where"] - early["fg"]["kl_where"]
    assert torch.allclose(diff, kl_scale(0.2) - kl_scale(0.3), rtol=1e-4, atol=1e-3)
    assert Config.from_dict({"model": {"z_scale_prior_std": 0.2}}).model.z_scale_prior_std.at(10**6) == 0.2
    with pytest.raises(ConfigError, match="z_scale_prior_std"):
        Config.from_dict({"model": {"z_scale_prior_std": {"start": 0.2, "end": 0.0}}}).validate()


def test_z_scale_prior_aspect_moves_the_heights_prior_alone():
    """model.z_scale_prior_aspect: z_scale's y (the glimpse's height) is charged against N(mean + aspect,
    std), its x against N(mean, std) (torch.distributions on the posterior the model computed), and the
    glimpses start at that shape."""
    torch.manual_seed(6)
    square = SPACE(tiny_cfg(z_scale_prior_mean=Anneal(-1.5, -1.5))).eval()
    tall = SPACE(tiny_cfg(z_scale_prior_mean=Anneal(-1.5, -1.5), z_scale_prior_aspect=0.4)).eval()
    bias = tall.fg.z_scale_net.bias
    assert float(bias[0]) == pytest.approx(-1.5) and float(bias[1]) == pytest.approx(-1.1)
    tall.load_state_dict(square.state_dict())  # one posterior for both: only the priors differ
    heads = []
    square.fg.z_scale_net.register_forward_hook(lambda mod, inp, out: heads.append(out.detach()))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = square(x, step=0), tall(x, step=0)
    mu, sd = normal_params(heads[0].permute(0, 2, 3, 1), 2)  # (B, G, G, 2), last axis (x, y)
    zp = a["fg"]["z_pres"]  # (B, G, G)

    def kl_scale(prior_mean):  # (B,)
        return (zp * kl_divergence(Normal(mu, sd), Normal(prior_mean, 0.1)).sum(-1)).sum((1, 2))

    diff = b["fg"]["kl_where"] - a["fg"]["kl_where"]
    expected = kl_scale(torch.tensor([-1.5, -1.1])) - kl_scale(torch.tensor([-1.5, -1.5]))
    assert torch.allclose(diff, expected, rtol=1e-4, atol=1e-3) and bool((expected != 0).all())


def test_space_eval_is_deterministic():
    torch.manual_seed(3)
    model = SPACE(tiny_cfg()).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a["recon"], b["recon"])
    assert torch.equal(a["fg"]["z_pres"], a["fg"]["z_pres_prob"])  # eval: z_pres is its probability


def test_fixed_alpha_replaces_the_foreground_mask_early():
    """Appendix D.2 (Atari): for step < fix_alpha_steps the likelihood uses alpha = fix_alpha_value."""
    torch.manual_seed(4)
    x = torch.rand(2, 3, 32, 32)
    model = SPACE(tiny_cfg(fix_alpha_steps=10, fix_alpha_value=0.1)).eval()
    with torch.no_grad():
        early, late = model(x, step=0), model(x, step=10)
        out = early
        cfg = model.cfg
        # Equation 1 by hand with alpha = 0.1 everywhere.
        def log_n(mu, s):
            return torch.distributions.Normal(mu, s).log_prob(x[:, None] if mu.dim() == 5 else x).sum(-3)
        lf = math.log(0.1) + log_n(out["fg"]["mu_fg"], cfg.fg_sigma)  # (B, N, N)
        lb = math.log(0.9) + out["bg"]["log_pi"][:, :, 0] + log_n(out["bg"]["mu_bg"], cfg.bg_sigma)
        ll = torch.logsumexp(torch.cat([lf[:, None], lb], 1), 1).sum((1, 2)).mean()
    assert float(early["terms"]["log_lik"]) == pytest.approx(float(ll), rel=1e-4)
    assert float(late["terms"]["log_lik"]) != pytest.approx(float(ll), rel=1e-4)


# ------------------------------------------------------------------------------------------ KL terms


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    shape = (4, 5, 3)
    mu, pm = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    sd = torch.rand(shape, generator=g, dtype=torch.float64) * 2 + 0.05
    ps = torch.rand(shape, generator=g, dtype=torch.float64) * 2 + 0.05
    ref = kl_divergence(Normal(mu, sd), Normal(pm, ps))
    assert torch.allclose(gaussian_kl(mu, sd, pm, ps), ref, rtol=1e-10, atol=1e-12)
    # A float prior broadcasts, as the model uses it (z_scale prior mean -1, std 0.1).
    ref = kl_divergence(Normal(mu, sd), Normal(torch.full_like(mu, -1.0), torch.full_like(mu, 0.1)))
    assert torch.allclose(gaussian_kl(mu, sd, -1.0, 0.1), ref, rtol=1e-10, atol=1e-12)
    assert gaussian_kl(mu, sd, mu, sd).abs().max() < 1e-12


def test_bernoulli_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    q = torch.rand(6, 4, 4, generator=g, dtype=torch.float64) * 0.98 + 0.01
    p = torch.rand(6, 4, 4, generator=g, dtype=torch.float64) * 0.98 + 0.01
    ref = kl_divergence(Bernoulli(probs=q), Bernoulli(probs=p))
    assert torch.allclose(bernoulli_kl(q, p), ref, rtol=1e-8, atol=1e-10)
    # Float prior (the z_pres prior probability) broadcast over every cell.
    ref = kl_divergence(Bernoulli(probs=q), Bernoulli(probs=torch.full_like(q, 0.01)))
    out = bernoulli_kl(q, 0.01)
    assert out.shape == q.shape
    assert torch.allclose(out, ref, rtol=1e-8, atol=1e-10)
    assert (bernoulli_kl(q, q)).abs().max() < 1e-10


def test_bernoulli_kl_is_finite_at_the_ends():
    q = torch.tensor([0.0, 1.0, 0.5])
    out = bernoulli_kl(q, 0.01)
    assert torch.isfinite(out).all()
    # KL(Bern(0) || Bern(p)) = -log(1 - p), KL(Bern(1) || Bern(p)) = -log p, up to the EPS clamp of q.
    assert float(out[0]) == pytest.approx(-math.log(0.99), abs=1e-4)
    assert float(out[1]) == pytest.approx(-math.log(0.01), abs=1e-4)


# ------------------------------------------------------------------------------------------ gradients


def _bias_before_batchnorm(model: torch.nn.Module) -> set[str]:
    """Biases of convolutions that feed a BatchNorm: in training mode BN subtracts each channel's batch
    mean, so their gradient is zero in exact arithmetic (round-off only). Not a bug, just dead weight."""
    names = set()
    for mod_name, mod in model.named_modules():
        kids = list(mod.named_children())
        for (a, ma), (_, mb) in zip(kids, kids[1:]):
            if isinstance(ma, torch.nn.Conv2d) and isinstance(mb, torch.nn.BatchNorm2d) and ma.bias is not None:
                names.add(f"{mod_name}.{a}.bias" if mod_name else f"{a}.bias")
    return names


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = SPACE(tiny_cfg())
    x = torch.rand(2, 3, 32, 32)
    model(x)["terms"]["loss"].backward()
    exempt = _bias_before_batchnorm(model)
    assert exempt, "expected the background's conv+BN layers"
    dead = []
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
        if name not in exempt and not (p.grad != 0).any():
            dead.append(name)
    assert not dead, f"zero gradient: {dead}"


def test_activation_checkpointing_computes_the_same_loss_and_gradients():
    """train.checkpoint_images: the foreground in chunks, recomputed in backward, is the same function."""
    torch.manual_seed(0)
    model = SPACE(tiny_cfg()).double()
    model.eval()  # no sampling noise: the chunked and whole-batch passes see the same latents
    x = torch.rand(5, 3, 32, 32, dtype=torch.float64)
    results = []
    for chunk in (0, 2):
        model.set_checkpoint_images(chunk)
        model.zero_grad()
        loss = model(x)["terms"]["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-10)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-7, atol=1e-10), name


def test_activation_checkpointing_recomputes_with_the_forward_pass_draws(monkeypatch):
    """In training mode each recomputed chunk must reuse its forward pass's random draws (checkpoint
    restores the RNG state): the gradients equal those of the same chunked pass with every activation kept."""
    import space.recompute as recompute

    def grads(keep_activations):
        if keep_activations:
            monkeypatch.setattr(recompute, "checkpointed", lambda f, *a: f(*a))
        torch.manual_seed(0)
        model = SPACE(tiny_cfg()).double()
        model.set_checkpoint_images(1)
        x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
        model(x)["terms"]["loss"].backward()
        monkeypatch.undo()
        return {n: p.grad.clone() for n, p in model.fg.named_parameters()}

    a, b = grads(False), grads(True)
    for name in a:
        assert (a[name] != 0).any(), name
        assert torch.allclose(a[name], b[name], rtol=1e-7, atol=1e-10), name


def _state(model, out):
    return ({k: v.detach().clone() for k, v in out["terms"].items()},
            {n: p.grad.clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("images, as_training", [(2, False), (5, False), (2, True)],
                         ids=["chunks", "one chunk", "as training: background checkpointed, sparse, alpha fixed"])
def test_backward_in_chunks_computes_the_same_loss_gradients_and_outputs(images, as_training):
    """space/recompute.py's forward_backward_in_chunks (training's step when the foreground runs in chunks):
    each chunk's foreground goes backward as soon as it has gone forward, the background last. In training
    mode, with the same random draws, it gives what the model's forward and backward give: the same terms,
    per-image outputs, gradients of every parameter and BatchNorm running statistics; with one chunk, the
    plain model's own, and with chunks of 2, the recomputed chunks' (whose draws come in the same order)."""
    from space.recompute import forward_backward_in_chunks

    torch.manual_seed(0)
    extra = dict(sparse_threshold=0.3, fix_alpha_steps=10) if as_training else {}
    model = SPACE(tiny_cfg(**CODE_BACKGROUND, **extra)).double().train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(5, 3, 32, 32, dtype=torch.float64)

    def plain():
        model.load_state_dict(start)
        model.set_checkpoint_images(images if images < x.shape[0] else 0)
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x, step=0)
        out["terms"]["loss"].backward()
        return out, _state(model, out)

    def chunked():
        model.load_state_dict(start)
        # training's settings, the background's own savings included, or those left out
        model.set_checkpoint_images(images if as_training else 0)
        model.zero_grad()
        torch.manual_seed(1)
        out = forward_backward_in_chunks(model, x, 0, images)
        return out, _state(model, out)

    (ref, (t0, g0, b0)), (got, (t1, g1, b1)) = plain(), chunked()
    for name in t0:
        assert torch.allclose(t0[name], t1[name], rtol=1e-10), name
    for name in g0:
        assert (g0[name] != 0).any() or name.endswith("bias"), name
        assert torch.allclose(g0[name], g1[name], rtol=1e-7, atol=1e-10), name
    for name in b0:
        assert torch.allclose(b0[name], b1[name], rtol=1e-12, atol=1e-15), name
    for key in ("recon", "mse", "objective", "bg_image", "pi"):
        assert torch.allclose(ref[key].detach(), got[key], rtol=1e-10, atol=1e-12), key
        assert not got[key].requires_grad, key
    for key in ref["fg"]:
        assert torch.allclose(torch.as_tensor(ref["fg"][key]).detach().double(),
                              torch.as_tensor(got["fg"][key]).double(), rtol=1e-10, atol=1e-12), key


def test_training_step_computes_each_chunk_once(monkeypatch):
    """train_step on a model whose foreground runs in chunks: each chunk's glimpse encoder runs once
    (backward in chunks), not twice as when the chunks are recomputed in the backward pass."""
    from space.config import TrainConfig
    from space.train import optimisers, train_step

    torch.manual_seed(0)
    model = SPACE(tiny_cfg()).train()
    model.set_checkpoint_images(2)
    calls = []
    model.fg.glimpse_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    opt_fg, opt_bg = optimisers(model, TrainConfig())
    x = torch.rand(5, 3, 32, 32)
    out, grad_norm, _ = train_step(model, x, 0, opt_fg, opt_bg, TrainConfig())
    cells = model.cfg.grid_size ** 2
    assert calls == [2 * cells, 2 * cells, cells]
    assert torch.isfinite(grad_norm) and float(grad_norm) > 0
    assert out["recon"].shape == x.shape and out["fg"]["z_pres"].shape[0] == 5


def _background_grads(model, x):
    torch.manual_seed(1)  # the same latent draws in both passes
    model.zero_grad()
    loss = model(x)["terms"]["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


CODE_BACKGROUND = dict(comp_decoder="code", bg_initial_state="learned", comp_encoder_input="log_pi")


@pytest.mark.parametrize("arch", [{}, CODE_BACKGROUND], ids=["paper", "code"])
def test_background_checkpointing_is_exact_in_training_mode(arch):
    """The background under train.checkpoint_images: the encoders keep only their convolutions' outputs
    (BatchNorm recomputed with batch statistics), the mask decoder runs in recomputed chunks of rows, and
    the component decoder goes layer by layer in chunks with whole-batch BatchNorm statistics. Same loss,
    same gradients, running statistics updated once, as without; in the text's architecture and the code's."""
    torch.manual_seed(0)
    plain = SPACE(tiny_cfg(**arch)).double().train()
    light = SPACE(tiny_cfg(**arch)).double().train()
    light.load_state_dict(plain.state_dict())
    # the background only: the foreground's chunks would draw their noise in another order
    light.bg.checkpoint_layers = True
    light.bg.comp_decoder.checkpoint_rows = 3
    light.bg.mask_decoder.checkpoint_rows = 3
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    (l0, g0), (l1, g1) = _background_grads(plain, x), _background_grads(light, x)
    assert torch.allclose(l0, l1, rtol=1e-12)
    for name in g0:  # atol: a bias before BatchNorm has gradient 0, here float64 noise of order 1e-13
        assert torch.allclose(g0[name], g1[name], rtol=1e-9, atol=1e-11), name
    b0, b1 = dict(plain.named_buffers()), dict(light.named_buffers())
    for name in b0:  # one running-statistics update per forward pass (sums in another order: float64 rounding)
        assert torch.allclose(b0[name], b1[name], rtol=1e-12, atol=1e-15), name
    assert int(b0["bg.comp_decoder.net.0.1.num_batches_tracked"]) == 1


def test_background_checkpointing_recomputes_no_convolution():
    """The recomputation stops at each convolution's saved input: the component decoder's and the encoders'
    convolutions run once per step, not twice."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountConvolutions(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                CountConvolutions.calls += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = SPACE(tiny_cfg()).train()
    model.bg.checkpoint_layers = True
    model.bg.comp_decoder.checkpoint_rows = 1
    loss = model(torch.rand(2, 3, 32, 32))["terms"]["loss"]
    with CountConvolutions():
        loss.backward()
    assert CountConvolutions.calls == 0
    # Negative control: the mask decoder's chunks do recompute their convolutions.
    model.bg.mask_decoder.checkpoint_rows = 2
    loss = model(torch.rand(2, 3, 32, 32))["terms"]["loss"]
    with CountConvolutions():
        loss.backward()
    assert CountConvolutions.calls > 0


def _sparse_pair(threshold, seed=0):
    torch.manual_seed(seed)
    exact = SPACE(tiny_cfg())
    sparse = SPACE(tiny_cfg(sparse_threshold=threshold))
    sparse.load_state_dict(exact.state_dict())
    return exact.eval(), sparse.eval()


def test_sparse_mode_below_every_probability_is_the_exact_model():
    exact, sparse = _sparse_pair(1e-9)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = exact(x), sparse(x)
    assert b["fg"]["glimpses_decoded"] == a["fg"]["glimpses_decoded"] == 2 * 16
    assert torch.allclose(a["terms"]["loss"], b["terms"]["loss"], rtol=1e-6)


def test_sparse_mode_skips_exactly_the_cells_below_the_threshold():
    """The skipped cells' glimpses vanish from the foreground; the kept cells are unchanged."""
    exact, sparse = _sparse_pair(0.5)
    with torch.no_grad():  # spread the cells' z_pres probabilities over (0, 1)
        exact.fg.z_pres_net.bias.fill_(0.0)
        exact.fg.z_pres_net.weight.mul_(50)
        sparse.load_state_dict(exact.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = exact(x), sparse(x)
    prob = a["fg"]["z_pres_prob"]
    kept = prob >= 0.5
    assert 0 < int(kept.sum()) < kept.numel()
    assert b["fg"]["glimpses_decoded"] == int(kept.sum())
    # Reference: the exact model with the skipped cells' z_pres forced to 0 (a logit of -1e4).
    def switch_off(module, inputs, output):  # output (B, 1, G, G), kept (B, G, G)
        return output.masked_fill(~kept[:, None], -1e4)

    hook = exact.fg.z_pres_net.register_forward_hook(switch_off)
    with torch.no_grad():
        r = exact(x)
    hook.remove()
    # (z_where and z_depth are still inferred for every cell, so their KL terms are not compared.)
    for key in ("alpha", "mu_fg", "kl_what", "overlap"):
        assert torch.allclose(b["fg"][key], r["fg"][key], rtol=1e-5, atol=1e-6), key
    assert not torch.allclose(a["fg"]["alpha"], b["fg"]["alpha"])  # skipping did change the foreground


def test_sparse_mode_with_no_cell_above_the_threshold_trains():
    """Every cell skipped: the step still runs forward and backward, with an empty foreground."""
    torch.manual_seed(0)
    model = SPACE(tiny_cfg(sparse_threshold=0.999))
    with torch.no_grad():
        model.fg.z_pres_net.bias.fill_(-20.0)
    out = model(torch.rand(2, 3, 32, 32))
    out["terms"]["loss"].backward()
    assert out["fg"]["glimpses_decoded"] == 0
    assert float(out["fg"]["alpha"].detach().max()) < 1e-4
    assert torch.isfinite(out["terms"]["loss"])


# ---------------------------------------------------------------------------------------- compositing


def _random_scene(seed, b, c, size_lo, size_hi, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(b, c, 5, S, S, generator=g, dtype=dtype)
    z_pres = torch.rand(b, c, generator=g, dtype=dtype)
    z_pres[0, 0] = 0.0  # an absent glimpse
    depth_w = torch.exp(-10 * torch.rand(b, c, generator=g, dtype=dtype))
    centre = torch.rand(b, c, 2, generator=g, dtype=dtype) * 1.4 - 0.2  # some partly or wholly off the canvas
    size = torch.rand(b, c, 2, generator=g, dtype=dtype) * (size_hi - size_lo) + size_lo
    return maps, z_pres, depth_w, centre, size


@pytest.mark.parametrize("premultiplied", [True, False], ids=["premultiplied", "normalised"])
@pytest.mark.parametrize("n", [32, 64, 128])
@pytest.mark.parametrize("sizes", [(0.01, 0.05), (0.02, 0.9), (0.5, 0.96)], ids=["tiny", "mixed", "large"])
def test_composite_equals_full_canvas_version(n, sizes, premultiplied):
    maps, z_pres, depth_w, centre, size = _random_scene(n + int(sizes[1] * 100), 2, 9, *sizes)
    for a, b in zip(composite_windowed(maps, z_pres, depth_w, centre, size, n, premultiplied),
                    composite(maps, z_pres, depth_w, centre, size, n, premultiplied)):
        assert torch.allclose(a, b, **CMP_TOL), float((a - b).abs().max())


@pytest.mark.parametrize("n,cx,sz", [(128, 0.3, 0.99), (64, 0.1, 0.999)])
def test_composite_equals_full_canvas_version_for_near_full_size_glimpses(n, cx, sz):
    """size = sigmoid(z_scale) may come close to 1; then the glimpse spans nearly the whole canvas."""
    maps = torch.ones(1, 1, 5, S, S, dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    centre = torch.tensor([[[cx, 0.5]]], dtype=torch.float64)
    size = torch.full((1, 1, 2), sz, dtype=torch.float64)
    a = composite_windowed(maps, one, one, centre, size, n)[0]
    b = composite(maps, one, one, centre, size, n)[0]
    assert torch.allclose(a, b, **CMP_TOL), float((a - b).abs().max())


@pytest.mark.parametrize("n", [32, 64])
def test_composite_gradients_equal_full_canvas_version(n):
    maps, z_pres, depth_w, centre, size = _random_scene(7, 2, 6, 0.05, 0.9)
    z_pres = z_pres.clamp_min(0.05)  # a z_pres of 0 makes d/dmaps zero in both: keep it informative
    w = [torch.randn(2, 1, n, n, dtype=torch.float64), torch.randn(2, 3, n, n, dtype=torch.float64),
         torch.randn(2, 1, n, n, dtype=torch.float64)]
    grads = []
    for fn in (composite_windowed, composite):
        m = maps.clone().requires_grad_()
        zp = z_pres.clone().requires_grad_()
        dw = depth_w.clone().requires_grad_()
        outs = fn(m, zp, dw, centre, size, n)
        sum((o * wi).sum() for o, wi in zip(outs, w)).backward()
        grads.append((m.grad, zp.grad, dw.grad))
    for ga, gb, name in zip(*grads, ("maps", "z_pres", "depth_weight")):
        assert ga.abs().max() > 0, name
        assert torch.allclose(ga, gb, rtol=1e-6, atol=1e-9), (name, float((ga - gb).abs().max()))


@pytest.mark.parametrize("n,c0,s", [(64, (0.5, 0.5), 0.5), (64, (0.3, 0.6), 0.37), (32, (0.8, 0.2), 0.25)])
def test_single_constant_glimpse_paints_its_square(n, c0, s):
    """A glimpse of mask 1 and colour c, size s at centre c0 covers the canvas square
    [c0 - s/2, c0 + s/2]: alpha ~ 1 and mu_fg = c inside, 0 well outside."""
    colour = torch.tensor([0.2, 0.5, 0.9])
    maps = torch.zeros(1, 1, 5, S, S)
    maps[0, 0, 0] = 1
    maps[0, 0, 1:4] = colour[:, None, None]
    centre = torch.tensor([[c0]])
    size = torch.full((1, 1, 2), s)
    alpha, mu, _ = composite_windowed(maps, torch.ones(1, 1), torch.ones(1, 1), centre, size, n)
    pix = (torch.arange(n) + 0.5) / n  # pixel centres
    # Bilinear sampling with zero padding softens half a glimpse pixel at each edge: stay one glimpse
    # pixel (s / S of the image) plus one canvas pixel away from the square's border.
    margin = s / S + 1 / n
    def inside(c):
        return (pix > c - s / 2 + margin) & (pix < c + s / 2 - margin)
    def outside(c):
        return (pix < c - s / 2 - margin) | (pix > c + s / 2 + margin)
    ins = inside(c0[1])[:, None] & inside(c0[0])[None, :]  # rows are y, columns x
    out = outside(c0[1])[:, None] | outside(c0[0])[None, :]
    assert ins.sum() > 0 and out.sum() > 0
    a = alpha[0, 0]
    assert torch.allclose(a[ins], torch.ones(()), atol=1e-5)
    assert a[out].abs().max() == 0
    assert torch.allclose(mu[0][:, ins], colour[:, None].expand(3, int(ins.sum())), atol=1e-5)
    assert mu[0][:, out].abs().max() == 0


def test_composite_front_glimpse_wins_by_depth():
    """Two overlapping opaque glimpses: the one with the larger depth weight (nearer) dominates."""
    n = 32
    maps = torch.zeros(1, 2, 5, S, S)
    maps[0, :, 0] = 1
    maps[0, 0, 1] = 1.0  # red
    maps[0, 1, 3] = 1.0  # blue
    centre = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    size = torch.full((1, 2, 2), 0.5)
    _, mu, _ = composite_windowed(maps, torch.ones(1, 2), torch.tensor([[1.0, math.exp(-8)]]), centre, size, n)
    c = mu[0, :, 16, 16]
    assert c[0] > 0.99 and c[2] < 0.01


# ------------------------------------------------------------------------------------------- extraction


def _coordinate_image(b, n):
    """Channel 0: x of the pixel centre (fraction of the image), channel 1: y, channel 2: image index."""
    pix = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    x = torch.empty(b, 3, n, n, dtype=torch.float64)
    x[:, 0] = pix[None, None, :]
    x[:, 1] = pix[None, :, None]
    x[:, 2] = torch.arange(b, dtype=torch.float64)[:, None, None] + 1
    return x


def test_extract_glimpses_reads_the_expected_quadrants():
    n = 64
    x = _coordinate_image(2, n)
    # Size 0.5 glimpses at quadrant centres: with S=32 and N=64 each glimpse pixel is a canvas pixel.
    centre = torch.tensor([[[0.25, 0.25], [0.75, 0.25]], [[0.25, 0.75], [0.75, 0.75]]], dtype=torch.float64)
    size = torch.full((2, 2, 2), 0.5, dtype=torch.float64)
    g = extract_glimpses(x, centre, size, S)
    assert g.shape == (4, 3, S, S)
    h = n // 2
    expected = [x[0, :, :h, :h], x[0, :, :h, h:], x[1, :, h:, :h], x[1, :, h:, h:]]  # (B, C) order
    for i, e in enumerate(expected):
        assert torch.allclose(g[i], e, atol=1e-12), i


def test_extract_glimpses_interpolates_an_off_grid_box():
    n = 64
    x = _coordinate_image(1, n)
    cx, cy, sx, sy = 0.6, 0.7, 0.3, 0.2
    g = extract_glimpses(x, torch.tensor([[[cx, cy]]], dtype=torch.float64),
                         torch.tensor([[[sx, sy]]], dtype=torch.float64), S)[0]
    u = (torch.arange(S, dtype=torch.float64) + 0.5) / S - 0.5  # glimpse pixel centres in [-0.5, 0.5]
    # Bilinear interpolation of a linear function is exact (the box stays half a pixel inside).
    assert torch.allclose(g[0], (cx + sx * u)[None, :].expand(S, S), atol=1e-9)
    assert torch.allclose(g[1], (cy + sy * u)[:, None].expand(S, S), atol=1e-9)
    assert torch.allclose(g[2], torch.ones((), dtype=torch.float64), atol=1e-12)


# ------------------------------------------------------------------------------------- boundary loss


def _band(width):
    band = torch.ones(S, S)
    band[width:S - width, width:S - width] = 0
    return band


def test_boundary_band_is_the_border_of_width_b():
    for b in (0, 1, 6, 15):
        expected = _band(b) if b else torch.zeros(S, S)
        assert torch.equal(boundary_band(S, b), expected), b


def _boundary(mask, centre, size, n, z_pres=1.0, fn=composite_windowed):
    maps = torch.zeros(1, 1, 5, S, S, dtype=torch.float64)
    maps[0, 0, 0] = mask
    maps[0, 0, 1:4] = 0.5
    maps[0, 0, 4] = _band(6)
    return fn(maps, torch.tensor([[z_pres]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64),
              torch.tensor([[centre]], dtype=torch.float64), torch.tensor([[[size, size]]], dtype=torch.float64),
              n)[2][0].sum()  # the overlap map, summed: the linear boundary loss


@pytest.mark.parametrize("fn", [composite_windowed, composite])
def test_boundary_loss_zero_inside_positive_across_the_band(fn):
    b = 6
    # Aligned: N=64, size 0.5 -> one glimpse pixel per canvas pixel, no interpolation.
    inner = torch.zeros(S, S)
    inner[b:S - b, b:S - b] = 1  # mask exactly the interior
    assert float(_boundary(inner, (0.5, 0.5), 0.5, 64, fn=fn)) == pytest.approx(0, abs=1e-9)
    crossing = torch.zeros(S, S)
    crossing[b - 1:S - b + 1, b - 1:S - b + 1] = 1  # one ring into the band: 4 * (S - 2b + 1) pixels
    assert float(_boundary(crossing, (0.5, 0.5), 0.5, 64, fn=fn)) == pytest.approx(4 * (S - 2 * b + 1), rel=1e-6)
    # Any placement: bilinear sampling blurs by one glimpse pixel, so keep one more pixel of margin.
    inner2 = torch.zeros(S, S)
    inner2[b + 1:S - b - 1, b + 1:S - b - 1] = 1
    full = torch.ones(S, S)
    for centre, size, n in [((0.37, 0.61), 0.43, 64), ((0.1, 0.9), 0.3, 32), ((0.52, 0.48), 0.21, 128)]:
        assert float(_boundary(inner2, centre, size, n, fn=fn)) == pytest.approx(0, abs=1e-9)
        assert float(_boundary(crossing, centre, size, n, fn=fn)) > 1.0
        assert float(_boundary(full, centre, size, n, fn=fn)) > float(_boundary(crossing, centre, size, n, fn=fn))
        # z_pres = 0: the glimpse is absent, its band costs nothing.
        assert float(_boundary(full, centre, size, n, z_pres=0.0, fn=fn)) == 0


# ------------------------------------------------------------------------------------- stick-breaking


@pytest.mark.parametrize("k", [1, 2, 5])
def test_stick_breaking_matches_direct_products(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(2, k, 1, 6, 6, generator=g, dtype=torch.float64) * 3
    m = torch.sigmoid(logits)
    pi = torch.empty_like(m)
    rest = torch.ones_like(m[:, 0])
    for j in range(k):
        pi[:, j] = m[:, j] * rest if j < k - 1 else rest
        rest = rest * (1 - m[:, j])
    log_pi = Background.stick_breaking(logits)
    assert log_pi.shape == logits.shape
    assert torch.allclose(log_pi.exp(), pi, rtol=1e-10, atol=1e-12)
    assert torch.allclose(log_pi.exp().sum(1), torch.ones((), dtype=torch.float64), atol=1e-12)


def test_stick_breaking_stays_finite_for_extreme_logits():
    logits = torch.tensor([60.0, -60.0, 60.0, 0.0]).view(1, 4, 1, 1, 1)
    log_pi = Background.stick_breaking(logits)
    assert torch.isfinite(log_pi).all()
    assert float(log_pi.exp().sum()) == pytest.approx(1, abs=1e-6)
    assert float(log_pi[0, 0].exp()) == pytest.approx(1, abs=1e-6)


# ---------------------------------------------------------------------------------------- where_to_box


@pytest.mark.parametrize("g", [1, 4, 8])
def test_where_to_box_zero_shift_is_the_cell_centre(g):
    z = torch.zeros(2, g, g, 2)
    centre, size = where_to_box(z, z, g, 1.0)
    for i in range(g):  # row
        for j in range(g):  # column
            assert centre[0, i, j].tolist() == pytest.approx([(j + 0.5) / g, (i + 0.5) / g])
    assert torch.allclose(size, torch.full_like(size, 0.5))


@pytest.mark.parametrize("shift_range", [0.5, 1.0, 2.0])
def test_where_to_box_shift_bounded_by_shift_range_cells(shift_range):
    g = 4
    zero = torch.zeros(1, g, g, 2)
    cell, _ = where_to_box(zero, zero, g, shift_range)
    gen = torch.Generator().manual_seed(0)
    z_shift = torch.randn(3, g, g, 2, generator=gen) * 5
    z_scale = torch.randn(3, g, g, 2, generator=gen) * 3
    centre, size = where_to_box(z_scale, z_shift, g, shift_range)
    assert torch.allclose(centre - cell, shift_range * torch.tanh(z_shift) / g, atol=1e-6)
    assert ((centre - cell).abs() <= shift_range / g + 1e-6).all()
    assert torch.allclose(size, torch.sigmoid(z_scale))
    # Saturated shifts reach exactly shift_range cells.
    big = torch.full((1, g, g, 2), 50.0)
    c_hi, _ = where_to_box(zero, big, g, shift_range)
    c_lo, _ = where_to_box(zero, -big, g, shift_range)
    assert torch.allclose(c_hi - cell, torch.full_like(cell, shift_range / g))
    assert torch.allclose(c_lo - cell, torch.full_like(cell, -shift_range / g))


def test_model_centre_and_size_come_from_where_to_box():
    """The boxes SPACE reports are where_to_box of its z_scale and z_shift heads' means (in eval mode, where
    the latents are their means): read off the heads here, independently of the forward pass."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = SPACE(cfg).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, step=0)
        e = model.fg.encoder(x)  # (B, 128, G, G)
        scale_mu = model.fg.z_scale_net(e)[:, :2].permute(0, 2, 3, 1)  # (B, G, G, 2) means, then stds
        shift_mu = model.fg.z_shift_net(e)[:, :2].permute(0, 2, 3, 1)
    centre, size = where_to_box(scale_mu, shift_mu, cfg.grid_size, cfg.shift_range)
    assert torch.allclose(out["fg"]["centre"], centre, atol=1e-6)
    assert torch.allclose(out["fg"]["size"], size, atol=1e-6)
    # and not trivially: the cells' boxes differ from one another
    assert out["fg"]["centre"].flatten(1, 2).std(1).min() > 0.1


# ------------------------------------------------------------------------------ annealing and presets


def test_anneal_at_end_points_and_between():
    a = Anneal(0.1, 0.01, 4000, 10000)
    assert a.at(0) == 0.1
    assert a.at(4000) == 0.1
    assert a.at(7000) == pytest.approx(0.055)
    assert a.at(5500) == pytest.approx(0.1 + 0.25 * (0.01 - 0.1))
    assert a.at(10000) == pytest.approx(0.01)
    assert a.at(10**6) == pytest.approx(0.01)
    # Monotone between the end points.
    vals = [a.at(s) for s in range(0, 12000, 500)]
    assert all(x >= y for x, y in zip(vals, vals[1:]))
    # Rising schedule, and a constant one (m -> m) : (0 -> 0).
    r = Anneal(-1.0, -2.0, 10000, 20000)
    assert r.at(15000) == pytest.approx(-1.5)
    c = Anneal(0.01, 0.01, 0, 0)
    assert c.at(0) == c.at(5) == c.at(10**5) == 0.01
    # A step schedule (start_step == end_step): start up to the step, end after it.
    s = Anneal(1.0, 2.0, 100, 100)
    assert s.at(100) == 1.0 and s.at(101) == 2.0


def test_room3d_large_preset_has_appendix_d2_values():
    m = preset("room3d_large").model
    t = preset("room3d_large").train
    assert (m.z_pres_prior.start, m.z_pres_prior.end, m.z_pres_prior.start_step, m.z_pres_prior.end_step) == \
        (0.1, 0.01, 4000, 10000)
    sp = m.z_scale_prior_mean
    assert (sp.start, sp.end, sp.start_step, sp.end_step) == (-1.0, -2.0, 10000, 20000)
    assert m.z_scale_prior_std.at(0) == m.z_scale_prior_std.at(10**6) == 0.1
    assert (m.z_shift_prior_mean, m.z_shift_prior_std) == (0.0, 1.0)
    assert (m.z_depth_prior_mean, m.z_depth_prior_std) == (0.0, 1.0)
    assert m.fg_sigma == 0.15 and m.bg_sigma == 0.15
    assert m.n_components == 5 and m.tau.at(0) == m.tau.at(10**6) == 2.0
    assert m.fix_alpha_steps == 0  # N/A for 3D-Room
    # D.3 and C
    assert m.image_size == 128 and m.grid_size == 16 and m.glimpse_size == 32
    assert (m.z_what_dim, m.z_mask_dim, m.z_comp_dim, m.z_depth_dim) == (32, 32, 32, 1)
    assert m.lstm_hidden == 64 and m.comp_prior_hidden == 64
    assert m.boundary_width == 6
    # D.2 optimisation
    assert t.fg_lr == 1e-5 and t.bg_lr == 1e-3 and t.clip_norm == 1.0
    assert 12 <= t.batch_size <= 16


def test_room3d_small_preset_is_large_with_an_8x8_grid():
    small, large = preset("room3d_small").to_dict(), preset("room3d_large").to_dict()
    assert small["model"].pop("grid_size") == 8
    large["model"].pop("grid_size")
    assert small == large


def test_the_3d_room_presets_are_the_papers_text_and_what_learned_best_only():
    """The model's defaults are the paper's text; the 3D-Room presets change exactly the LEARNED readings
    (and Small its grid), and the Atari preset none of them."""
    text = Config().to_dict()["model"]
    for name, own in (("room3d_large", set()), ("room3d_small", {"grid_size"})):
        m = preset(name).to_dict()["model"]
        assert {k for k in m if m[k] != text[k]} == set(LEARNED) | own, name
    assert (text["fg_mean"], text["glimpse_colour"], text["glimpse_encoder"]) == ("premultiplied", "paper", "paper")
    atari = preset("atari").to_dict()["model"]
    assert all(atari[k] == text[k] for k in LEARNED)


def test_atari_preset_has_appendix_d2_values():
    m = preset("atari").model
    assert m.n_components == 3 and m.tau.at(0) == m.tau.at(10**6) == 2.5
    assert m.fg_sigma == 0.2 and m.bg_sigma == 0.1
    assert m.fix_alpha_steps == 2000 and m.fix_alpha_value == 0.1
    for step in (0, 1000, 50000):
        assert m.z_pres_prior.at(step) == pytest.approx(0.01)
    assert m.z_scale_prior_mean.at(0) == -2.0
    assert m.z_scale_prior_mean.at(10000) == pytest.approx(-2.25)
    assert m.z_scale_prior_mean.at(20000) == pytest.approx(-2.5)
    assert m.z_scale_prior_std.at(0) == m.z_scale_prior_std.at(10**6) == 0.1


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_and_round_trips(name):
    cfg = preset(name).validate()
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_normalised_fg_mean_is_the_colour_not_darkened_by_alpha():
    """One glimpse of colour c and mask 0.5: premultiplied mu_fg = 0.5 c (algorithm 1), normalised = c."""
    colour = torch.tensor([0.2, 0.5, 0.9])
    maps = torch.zeros(1, 1, 5, S, S)
    maps[0, 0, 0] = 0.5
    maps[0, 0, 1:4] = colour[:, None, None]
    args = (torch.ones(1, 1), torch.ones(1, 1), torch.tensor([[[0.5, 0.5]]]), torch.full((1, 1, 2), 0.5), 32)
    _, pre, _ = composite_windowed(maps, *args)
    _, norm, _ = composite_windowed(maps, *args, premultiplied=False)
    assert torch.allclose(pre[0, :, 16, 16], 0.5 * colour, atol=1e-6)
    assert torch.allclose(norm[0, :, 16, 16], colour, atol=1e-6)


def test_settings_are_type_checked_and_numbers_written_as_text_accepted():
    """YAML 1.1 reads 1e-4 (no dot) as text: it is taken as the number; other wrong types are named."""
    cfg = Config.from_dict({"train": {"fg_lr": "1e-4", "steps": 10.0},
                            "model": {"z_pres_prior": {"start": "1e-1", "end": 0.01, "start_step": 0, "end_step": 5}}})
    assert cfg.train.fg_lr == 1e-4 and isinstance(cfg.train.steps, int)
    assert cfg.model.z_pres_prior.start == 0.1
    for section, name, value in [("train", "steps", "many"), ("train", "steps", 2.5), ("train", "amp", 1),
                                 ("model", "fg_mean", 3), ("model", "z_pres_prior", "often"),
                                 ("model", "tau", [2.5, 0.5])]:
        with pytest.raises(ConfigError, match=f"{section}.{name}"):
            Config.from_dict({section: {name: value}})
    # A YAML flow mapping without spaces ({start:2.5}) reads as keys without values: said so.
    import yaml

    with pytest.raises(ConfigError, match="space after each colon"):
        Config.from_dict({"model": {"tau": yaml.safe_load("{start:2.5,end:0.5,start_step:0,end_step:9}")}})
    # A number where a schedule goes is a constant schedule (the Atari preset's tau: 2.5).
    tau = Config.from_dict({"model": {"tau": 2.5}}).model.tau
    assert (tau.at(0), tau.at(10**6)) == (2.5, 2.5)


def test_unknown_preset_and_setting_are_named():
    with pytest.raises(ConfigError, match="nope"):
        preset("nope")
    with pytest.raises(ConfigError, match="grid_sise"):
        Config.from_dict({"model": {"grid_sise": 4}})


@pytest.mark.parametrize("kw,word", [
    (dict(image_size=48), "image_size"),
    (dict(grid_size=3), "grid_size"),
    (dict(image_size=32, grid_size=16), "grid_size"),
    (dict(glimpse_size=24), "glimpse_size"),
    (dict(tau=0), "tau"),
    (dict(n_components=0), "n_components"),
    (dict(boundary_width=16), "boundary_width"),
    (dict(fix_alpha_value=1.0), "fix_alpha_value"),
    (dict(fg_mean="straight"), "fg_mean"),
    (dict(z_scale_prior_aspect=float("nan")), "z_scale_prior_aspect"),
    (dict(z_shift_prior_mean=float("inf")), "z_shift_prior_mean"),
    (dict(z_scale_prior_mean=Anneal(-1.5, float("nan"))), "z_scale_prior_mean"),
])
def test_model_config_refusals_name_the_setting(kw, word):
    with pytest.raises(ConfigError, match=word):
        ModelConfig(**kw).validate()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_broadcast_add_has_autograds_gradients(layout):
    """The spatial broadcast's first layer with its own backward (sums over rows as stored): the same values
    and gradients as autograd of z[:, :, None, None] + c, and gradcheck's numerical ones."""
    from space.recompute import broadcast_add, sum_over_rows

    torch.manual_seed(0)
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, 4, 6, 7, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    dy = torch.randn(5, 4, 6, 7, dtype=torch.float64).contiguous(memory_format=layout)
    out = broadcast_add(z, c)
    ref = z[:, :, None, None] + c
    assert torch.equal(out, ref)
    got = torch.autograd.grad(out, (z, c), dy)
    want = torch.autograd.grad(ref, (z, c), dy)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(broadcast_add, (z, c))
    assert torch.allclose(sum_over_rows(dy[:, :, ::2]), dy[:, :, ::2].sum(0, keepdim=True))  # neither layout


def test_normalise_with_given_statistics_has_autograds_gradients():
    """The fused BatchNorm-with-given-statistics (gradients to mean and var from dweight and dbias) and the
    fused per-chunk statistics, against torch's numerical gradients (gradcheck, float64)."""
    from space.recompute import _ChunkStats, _NormaliseWith

    torch.manual_seed(0)
    h = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(4, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    weight = torch.randn(4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _NormaliseWith.apply(*a, 1e-5), (h, mean, var, weight, bias))
    assert torch.autograd.gradcheck(lambda x: _ChunkStats.apply(x), (h,))
    # and it is BatchNorm: with the batch's own statistics it equals F.batch_norm in training mode
    var_b, mean_b = torch.var_mean(h, dim=(0, 2, 3), correction=0)
    ref = torch.nn.functional.batch_norm(h, None, None, weight, bias, True, 0.0, 1e-5)
    assert torch.allclose(_NormaliseWith.apply(h, mean_b, var_b, weight, bias, 1e-5), ref, atol=1e-12)


def test_combined_statistics_equal_the_whole_batch():
    """combine_stats over uneven chunks gives the whole batch's mean and biased variance."""
    from space.recompute import chunk_stats, combine_stats

    torch.manual_seed(1)
    h = torch.randn(7, 3, 4, 4, dtype=torch.float64) * 5 + 100  # far from zero: no cancellation allowed
    bn = torch.nn.BatchNorm2d(3).double()
    mean, var = combine_stats([chunk_stats(c) for c in h.split([1, 4, 2])], bn)
    var_ref, mean_ref = torch.var_mean(h, dim=(0, 2, 3), correction=0)
    assert torch.allclose(mean, mean_ref, rtol=1e-14) and torch.allclose(var, var_ref, rtol=1e-12)
    assert int(bn.num_batches_tracked) == 1


# ------------------------------------------------------------- the paper's text and the paper's code


def _forced_z_pres(cfg: ModelConfig, logit: float, seed: int = 0):
    """An eval-mode forward with every z_pres logit set to `logit` (through a hook on the z_pres head)."""
    torch.manual_seed(seed)
    model = SPACE(cfg).eval()
    hook = model.fg.z_pres_net.register_forward_hook(lambda m, i, o: torch.full_like(o, logit))
    with torch.no_grad():
        out = model(torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)))
    hook.remove()
    return out


def test_kl_weighting_charges_absent_cells_only_in_the_codes_reading():
    """Appendix B's reading: z_where's, z_depth's and z_what's KL are weighted by z_pres, so with every cell
    off they vanish. The code's reading charges every cell whatever its z_pres: the same KL on or off,
    equal to the weighted reading's with every cell on."""
    off_text = _forced_z_pres(tiny_cfg(), -50.0)["fg"]
    on_text = _forced_z_pres(tiny_cfg(), 50.0)["fg"]
    off_code = _forced_z_pres(tiny_cfg(kl_weighting="every_cell"), -50.0)["fg"]
    on_code = _forced_z_pres(tiny_cfg(kl_weighting="every_cell"), 50.0)["fg"]
    for k in ("kl_where", "kl_depth", "kl_what"):
        assert float(off_text[k].abs().max()) < 1e-6, k
        assert float(on_code[k].min()) > 0, k
        assert torch.allclose(off_code[k], on_code[k], rtol=1e-5), k
        assert torch.allclose(on_code[k], on_text[k], rtol=1e-5), k


def _mixture_log_lik(out, x, cfg: ModelConfig, per_channel: bool):
    """Equation 1 from torch.distributions: alpha N(fg) + (1 - alpha) sum_k pi_k N(bg_k), per pixel over RGB
    (a product of the channels' densities) or per colour channel."""
    alpha = out["fg"]["alpha"].clamp(1e-6, 1 - 1e-6).double()  # (B, 1, N, N), as the model clamps it
    fg = Normal(out["fg"]["mu_fg"].double(), cfg.fg_sigma).log_prob(x.double())  # (B, 3, N, N)
    bg = Normal(out["bg"]["mu_bg"].double(), cfg.bg_sigma).log_prob(x.double()[:, None])  # (B, K, 3, N, N)
    if not per_channel:
        fg, bg = fg.sum(1, keepdim=True), bg.sum(2, keepdim=True)
    pi = out["bg"]["log_pi"].double().exp()  # (B, K, 1, N, N)
    lik = alpha * fg.exp() + (1 - alpha) * (pi * bg.exp()).sum(1)
    return lik.log().sum((1, 2, 3)).mean()


@pytest.mark.parametrize("mixture", ["pixel", "channel"])
def test_the_likelihood_is_equation_1_mixed_per_pixel_or_per_channel(mixture):
    cfg = tiny_cfg(mixture=mixture, fg_sigma=0.4, bg_sigma=0.4)  # wide: the densities do not underflow
    torch.manual_seed(0)
    model = SPACE(cfg).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    expected = _mixture_log_lik(out, x, cfg, per_channel=mixture == "channel")
    assert float(out["terms"]["log_lik"]) == pytest.approx(float(expected), rel=1e-5)
    other = _mixture_log_lik(out, x, cfg, per_channel=mixture != "channel")
    assert abs(float(out["terms"]["log_lik"]) - float(other)) > 1.0  # the two readings do differ here


def test_the_codes_boundary_loss_is_a_gaussian_penalty_on_the_overlap_and_switches_off():
    from space.model import boundary_loss

    overlap = torch.rand(3, 1, 16, 16, dtype=torch.float64) * 2
    linear = boundary_loss(overlap, tiny_cfg(), step=0)
    assert torch.allclose(linear, overlap.sum((1, 2, 3)))
    cfg = tiny_cfg(boundary_loss="gaussian", boundary_sigma=0.7, boundary_off_step=100)
    nll = -(Normal(0.0, 0.7).log_prob(overlap) - Normal(0.0, 0.7).log_prob(torch.zeros(()))).sum((1, 2, 3))
    assert torch.allclose(boundary_loss(overlap, cfg, step=99), nll)
    assert torch.equal(boundary_loss(overlap, cfg, step=100), torch.zeros(3, dtype=torch.float64))


def test_bounded_z_pres_logits_saturate_at_the_bound():
    out = _forced_z_pres(tiny_cfg(z_pres_logit_bound=8.8), 1e4)
    assert torch.allclose(out["fg"]["z_pres_prob"], torch.sigmoid(torch.tensor(8.8)))
    assert torch.allclose(_forced_z_pres(tiny_cfg(), 1e4)["fg"]["z_pres_prob"], torch.ones(()))


def test_tau_follows_its_schedule_in_the_relaxed_bernoulli():
    """The z_pres sample is sigmoid((logit + logistic noise) / tau) with tau at the step's value."""
    cfg = tiny_cfg(tau=Anneal(2.5, 0.5, 0, 100))
    model = SPACE(cfg).train()
    model.fg.z_pres_net.register_forward_hook(lambda m, i, o: torch.full_like(o, 1.0))
    x = torch.rand(1, 3, 32, 32)
    noise = []
    for step, tau in ((0, 2.5), (50, 1.5), (100, 0.5), (500, 0.5)):
        torch.manual_seed(3)  # the same logistic noise at every step
        z = model(x, step)["fg"]["z_pres"].double()
        noise.append(tau * torch.log(z / (1 - z)) - 1.0)  # sigmoid((logit + noise) / tau) solved for the noise
    for step, n in zip((50, 100, 500), noise[1:]):
        assert torch.allclose(n, noise[0], atol=1e-4), step
    assert float(noise[0].std()) > 0.1  # it is noise, not a constant


# ------------------------------------------------------------------ training schedules not in the paper


def _log_densities(k: int = 3, c: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    log_fg = (torch.randn(2, 1, c, 5, 5, generator=g, dtype=torch.float64) * 6).requires_grad_()
    log_bg = (torch.randn(2, k, c, 5, 5, generator=g, dtype=torch.float64) * 6).requires_grad_()
    return log_fg, log_bg


@pytest.mark.parametrize("channels", [1, 3])
def test_tempered_likelihood_has_the_exact_value_and_at_t1_the_exact_gradient(channels):
    from space.model import tempered_log_likelihood

    log_fg, log_bg = _log_densities(c=channels)
    exact = torch.logsumexp(torch.cat([log_fg, log_bg], 1), 1).sum((1, 2, 3))
    g_exact = torch.autograd.grad(exact.sum(), (log_fg, log_bg))
    for t in (1.0, 4.0):
        value = tempered_log_likelihood(log_fg, log_bg, t)
        assert torch.allclose(value, exact, rtol=1e-12)
    g_t1 = torch.autograd.grad(tempered_log_likelihood(log_fg, log_bg, 1.0).sum(), (log_fg, log_bg))
    assert all(torch.allclose(a, b, rtol=1e-12) for a, b in zip(g_t1, g_exact))


def test_tempered_likelihood_shares_each_pixel_by_tempered_responsibilities():
    """At T, d/d log p_j = softmax(log p / T)_j over the foreground and the background components: closer
    to evens than the exact posterior, and the exact posterior at T = 1."""
    from space.model import tempered_log_likelihood

    log_fg, log_bg = _log_densities()
    t = 4.0
    g_fg, g_bg = torch.autograd.grad(tempered_log_likelihood(log_fg, log_bg, t).sum(), (log_fg, log_bg))
    with torch.no_grad():
        log_p = torch.cat([log_fg, log_bg], 1)
        r = torch.exp(log_p / t) / torch.exp(log_p / t).sum(1, keepdim=True)
        assert torch.allclose(torch.cat([g_fg, g_bg], 1), r, rtol=1e-10)
        exact = torch.softmax(log_p, 1)
        # tempering flattens the shares: the largest is smaller, the smallest larger
        assert bool((r.max(1).values <= exact.max(1).values + 1e-12).all())
        assert bool((r.min(1).values >= exact.min(1).values - 1e-12).all())


def test_kl_what_weight_reweights_z_whats_kl_in_the_loss_only():
    """loss(w) - loss(1) = (w - 1) KL(z_what), the reported terms unchanged, along the weight's schedule."""
    cfg_w = tiny_cfg(kl_what_weight=Anneal(0.0, 1.0, 0, 100))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for step, w in ((0, 0.0), (25, 0.25), (100, 1.0)):
        outs = []
        for cfg in (tiny_cfg(), cfg_w):
            torch.manual_seed(0)
            model = SPACE(cfg).train()
            torch.manual_seed(5)
            outs.append(model(x, step)["terms"])
        paper, weighted = outs
        assert float(weighted["loss"] - paper["loss"]) == pytest.approx((w - 1) * float(paper["kl_what"]), rel=1e-4, abs=1e-3)
        assert float(weighted["elbo"]) == pytest.approx(float(paper["elbo"]), rel=1e-6)


@pytest.mark.parametrize("setting, value", [("mixture_temperature", 0.5), ("kl_what_weight", -1.0)])
def test_schedule_settings_out_of_range_are_named(setting, value):
    with pytest.raises(ConfigError, match=setting):
        tiny_cfg(**{setting: value}).validate()


# --------------------------------------------------- architecture: appendix D.3's tables and the paper's code


@pytest.mark.parametrize("layout, size, sides", [("paper", 32, [32, 16, 16, 13, 6, 3]), ("code", 32, [32, 16, 8, 4, 1]),
                                                ("paper", 16, [16, 16, 16, 13, 6, 3]), ("code", 16, [16, 16, 8, 4, 1])])
def test_glimpse_encoder_feature_maps_follow_the_table_or_the_code(layout, size, sides):
    """Appendix D.3's glimpse encoder (3x3 s1, 4x4 s2, 3x3 s1, 4x4 s1, 4x4 s2, 4x4 s1) or the code's
    32-16-8-4-1, each then one linear layer to z_what's mean and std; a 16-pixel glimpse joins them at
    their 16x16 map."""
    enc = GlimpseEncoder(32, layout, size)
    seen = []
    for block in enc.net[:-1]:
        block.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    mu, sigma = enc(torch.rand(5, 3, size, size))
    assert seen == sides
    assert mu.shape == sigma.shape == (5, 32) and (sigma > 0).all()
    assert enc.head.in_features == 256 * sides[-1] ** 2


def test_a_16_pixel_glimpse_model_trains_and_the_32_pixel_one_is_unchanged():
    """model.glimpse_size=16: the decoder paints 16x16 maps, the whole model runs a step with finite
    gradients; and the 32-pixel networks are built as before (same layers, same random initial weights)."""
    torch.manual_seed(0)
    a = GlimpseDecoder(32, "paper", 32)
    torch.manual_seed(0)
    b = GlimpseDecoder(32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    alpha, o = GlimpseDecoder(32, "paper", 16)(torch.randn(3, 32))
    assert alpha.shape == (3, 1, 16, 16) and o.shape == (3, 3, 16, 16)
    cfg = tiny_cfg(glimpse_size=16, boundary_width=3)
    cfg.validate()
    torch.manual_seed(0)
    m = SPACE(cfg)
    out = m(torch.rand(2, 3, cfg.image_size, cfg.image_size), 0)
    out["terms"]["loss"].backward()
    assert torch.isfinite(out["terms"]["loss"]) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    with pytest.raises(ConfigError, match="glimpse_size"):
        tiny_cfg(glimpse_size=24).validate()


@pytest.mark.parametrize("n,g", [(64, 4), (128, 8), (128, 16)])
def test_the_codes_fg_encoder_orders_celu_before_groupnorm_and_adds_a_lateral_branch(n, g):
    """model.fg_encoder=code: one feature per cell as the table's encoder, each layer conv -> CELU ->
    GroupNorm, and a lateral branch of 3x3 layers at the cells' resolution whose output the heads read."""
    torch.manual_seed(0)
    code, paper = FgImageEncoder(n, g, "code").eval(), FgImageEncoder(n, g, "paper").eval()
    x = torch.rand(2, 3, n, n)
    assert code(x).shape == paper(x).shape == (2, 128, g, g)
    for block in [*code.net, *code.lateral, code.merge]:
        assert [type(m) for m in block] == [torch.nn.Conv2d, torch.nn.CELU, GroupNorm]
    for block in paper.net:
        assert [type(m) for m in block] == [torch.nn.Conv2d, GroupNorm, torch.nn.CELU]

    # The lateral branch works at the cells' resolution, 3x3 with a one-cell border, and its output is used.
    lateral_convs = [block[0] for block in [*code.lateral, code.merge]]
    assert [(c.kernel_size, c.stride, c.padding) for c in lateral_convs] == [((3, 3), (1, 1), (1, 1))] * 3
    assert code.merge[0].in_channels == 256
    code(x).square().sum().backward()
    assert all(c.weight.grad.abs().sum() > 0 for c in lateral_convs)


def test_the_fg_encoder_setting_reaches_the_model_and_is_checked():
    assert SPACE(tiny_cfg(fg_encoder="code")).fg.encoder.lateral is not None
    assert SPACE(tiny_cfg()).fg.encoder.lateral is None
    with pytest.raises(ConfigError, match="fg_encoder"):
        tiny_cfg(fg_encoder="lateral").validate()


def test_the_glimpse_colour_setting_reaches_the_model_and_is_checked():
    assert isinstance(SPACE(tiny_cfg(glimpse_colour="linear")).fg.glimpse_decoder.colour, torch.nn.Linear)
    assert SPACE(tiny_cfg()).fg.glimpse_decoder.colour is None
    with pytest.raises(ConfigError, match="glimpse_colour"):
        tiny_cfg(glimpse_colour="rgb").validate()


def test_the_codes_component_decoder_has_four_hidden_layers_and_a_1x1_output():
    paper, code = CompDecoder(8, 32, "paper"), CompDecoder(8, 32, "code")
    bns = lambda d: [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]  # noqa: E731
    assert len(bns(paper)) == 3 and paper.net[-1].kernel_size == (3, 3)
    assert len(bns(code)) == 4 and code.net[-1].kernel_size == (1, 1)
    assert code(torch.randn(2, 8)).shape == (2, 3, 32, 32)


def test_a_learned_initial_state_starts_at_zeros_and_learns():
    """model.bg_initial_state=learned: h_0, c_0 of both LSTMs and z^m_0 are parameters, zero at first (the
    same background as the zeros reading, weights shared), and the loss reaches them."""
    torch.manual_seed(0)
    zeros = Background(tiny_cfg()).eval()
    learned = Background(tiny_cfg(bg_initial_state="learned")).eval()
    missing = learned.load_state_dict(zeros.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["c0", "h0", "prior_c0", "prior_h0", "z_m0"]
    x = torch.rand(2, 3, 32, 32)
    a, b = zeros(x), learned(x)
    assert torch.allclose(a["log_pi"], b["log_pi"]) and torch.allclose(a["kl_bg_mask"], b["kl_bg_mask"])
    learned.train()
    learned(x)["kl_bg_mask"].sum().backward()
    for name in missing:
        assert getattr(learned, name).grad.abs().sum() > 0, name
    torch.manual_seed(1)
    pi_zeros, _ = zeros.generate(2)
    torch.manual_seed(1)
    pi_learned, _ = learned.generate(2)
    assert torch.allclose(pi_zeros, pi_learned)  # still zeros: the same prior samples


@pytest.mark.parametrize("reading", ["pi", "log_pi"])
def test_the_component_encoder_sees_pi_or_its_log(reading):
    torch.manual_seed(0)
    bg = Background(tiny_cfg(comp_encoder_input=reading)).eval()
    seen = []
    bg.comp_encoder.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        pi = bg(x)["log_pi"].exp().view(4, 1, 32, 32)  # (B*K, 1, N, N)
    expected = pi if reading == "pi" else torch.log(pi + 1e-5)
    assert torch.allclose(seen[0][:, :1], expected, atol=1e-6)
    assert torch.allclose(seen[0][:, 1:], x[:, None].expand(2, 2, 3, 32, 32).reshape(4, 3, 32, 32))


def test_decomposition_grid_has_a_titled_column_per_map_and_a_row_per_image():
    from space.viz import TITLE_HEIGHT, column_titles, decomposition_grid

    torch.manual_seed(0)
    cfg = tiny_cfg(n_components=3)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = SPACE(cfg).eval()(x)
    plain = decomposition_grid(x, out, rows=3, scale=2, titles=False)
    titled = decomposition_grid(x, out, rows=3, scale=2)
    tile, pad = 32 * 2, 2
    assert plain.shape == (pad + 3 * (tile + pad), pad + (6 + 3) * (tile + pad), 3)
    assert (titled[TITLE_HEIGHT:] == plain).all()  # the titles sit above, the maps unchanged
    # the input column is the input image, scaled up by repeating pixels
    first = plain[pad:pad + tile, pad:pad + tile]
    assert (first[::2, ::2] == (x[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).all()
    titles = column_titles(3)
    assert titles[:2] == ["input", "recon"] and titles[-3:] == ["bg 1", "bg 2", "bg 3"]
    for c in range(len(titles)):  # each column's title is drawn over its own tile
        span = titled[:TITLE_HEIGHT, pad + c * (tile + pad): pad + c * (tile + pad) + tile]
        assert (span > 200).any(), titles[c]


@pytest.mark.parametrize("chunk", [0, 2, -2], ids=["whole", "checkpointed", "backward in chunks"])
def test_bf16_autocast_keeps_latents_and_losses_in_float32(chunk):
    """train.amp on the CPU: the networks run in bf16, but every latent's parameters, the likelihood and
    the KL terms are float32 (bf16 KLs drifted by 14% at initialisation), and the loss and its gradients
    stay near float32's. With checkpointing, BatchNorm's chunk statistics are float32 beside bf16 maps."""
    from space.recompute import forward_backward_in_chunks

    torch.manual_seed(0)
    model = SPACE(tiny_cfg(**CODE_BACKGROUND)).train()
    model.set_checkpoint_images(abs(chunk))
    x = torch.rand(4, 3, 32, 32)

    def run(amp):
        torch.manual_seed(1)  # the same latent draws in both passes
        model.zero_grad()
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)  # noqa: E731
        if chunk < 0:  # as train_step: autocast around the forward pieces, the backward passes outside it
            return forward_backward_in_chunks(model, x, 0, -chunk, autocast), \
                {n: p.grad.clone() for n, p in model.named_parameters()}
        with autocast():
            out = model(x)
        out["terms"]["loss"].backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    (ref, g_ref), (low, g_low) = run(False), run(True)
    assert model.bg.comp_decoder(torch.zeros(1, model.cfg.z_comp_dim)).dtype == torch.float32  # autocast left
    for name, value in low["terms"].items():
        assert value.dtype == torch.float32, name
        assert abs(value.item() - ref["terms"][name].item()) <= 0.02 * abs(ref["terms"][name].item()) + 0.5, name
    for key in ("z_pres_prob", "centre", "size", "alpha", "kl_where", "kl_what"):
        assert low["fg"][key].dtype == torch.float32, key
    for key in ("log_pi", "z_mask", "z_comp", "kl_bg_mask", "kl_bg_comp"):
        assert low["bg"][key].dtype == torch.float32, key
    # Gradients point the same way: cosine similarity over all parameters near 1 (0.978 measured here).
    a = torch.cat([g.flatten() for g in g_ref.values()])
    b = torch.cat([g_low[n].flatten().float() for n in g_ref])
    assert torch.isfinite(b).all()
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.95


def test_use_amp_resolves_per_device(capsys, monkeypatch):
    """train.amp: off stays off; on runs on CUDA and on the CPU, with a warning where bf16 is emulated."""
    import space.devices as devices

    assert not devices.use_amp(False, torch.device("cpu"))
    assert not devices.use_amp(True, torch.device("meta"))
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)
    assert devices.use_amp(True, torch.device("cpu"))
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    assert devices.use_amp(True, torch.device("cpu"))
    assert "train.amp=false" in capsys.readouterr().out
