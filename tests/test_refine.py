"""space/refine.py: the z_pres search against the model's own objective, checked by recomputing that
objective for each configuration independently (one image at a time, z_pres set through the foreground)."""

from __future__ import annotations

import pytest
import torch

from space.config import ModelConfig
from space.model import SPACE
from space.model import extract_glimpses
from space.refine import objective_with, refine_boxes, refine_presence, refined_output


def _model(seed: int = 0) -> SPACE:
    torch.manual_seed(seed)
    model = SPACE(ModelConfig(image_size=32, grid_size=4, n_components=2, glimpse_size=16, boundary_width=3,
                              z_pres_prior=0.3))
    with torch.no_grad():  # spread the untrained z_pres probabilities so that the search has cells to try
        model.fg.z_pres_net.weight.mul_(20)
    return model.eval()


def _objective(model, x1, state) -> float:
    """One image's objective with z_pres fixed to the 0/1 `state` (G, G), computed on its own."""
    with torch.no_grad():
        return float(objective_with(model, x1, 0, state[None].float())["objective"][0])


def test_the_search_lowers_the_objective_and_ends_where_no_open_cell_lowers_it_further():
    model = _model()
    x = torch.rand(3, 3, 32, 32)
    present, prob, flips = refine_presence(model, x, 0, candidates=0.05, batch_size=5)
    assert present.shape == prob.shape == (3, 4, 4) and present.dtype == torch.bool
    assert int(flips.sum()) > 0  # the test would check nothing otherwise
    for i in range(3):
        start = prob[i] > 0.5
        changed = present[i] != start
        assert int(changed.sum()) == int(flips[i])  # each cell flips at most once
        assert _objective(model, x[i:i + 1], present[i]) < _objective(model, x[i:i + 1], start) or not flips[i]
        # Local optimum: no cell the search could still flip lowers this image's objective.
        here = _objective(model, x[i:i + 1], present[i])
        for r, c in torch.nonzero((prob[i] > 0.05) & ~changed).tolist():
            other = present[i].clone()
            other[r, c] = ~other[r, c]
            assert _objective(model, x[i:i + 1], other) >= here - 1e-3
        assert not (changed & (prob[i] <= 0.05)).any()  # only candidates flip


def test_fixed_cells_take_their_value_and_the_rest_keep_the_encoders():
    model = _model()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        free = model(x, 0)["fg"]["z_pres_prob"]
        fixed = torch.full((2, 4, 4), float("nan"))
        fixed[0, 1, 2], fixed[1, 3, 3] = 1.0, 0.0
        out = objective_with(model, x, 0, fixed)
    prob = out["fg"]["z_pres_prob"]
    assert prob[0, 1, 2] == pytest.approx(1.0) and prob[1, 3, 3] == pytest.approx(0.0, abs=1e-9)
    keep = torch.isnan(fixed)
    assert torch.equal(prob[keep], free[keep])
    assert model.fg.z_pres_fixed is None  # left as found
    assert out["objective"].shape == (2,)


def test_the_objective_per_image_is_what_the_loss_averages():
    model = _model()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, 0)
    assert float(out["objective"].mean()) == pytest.approx(float(out["terms"]["loss"]), rel=1e-5)


def test_the_search_needs_eval_mode():
    model = _model().train()
    with pytest.raises(RuntimeError, match="eval mode"):
        refine_presence(model, torch.rand(1, 3, 32, 32), 0)


def test_by_default_the_search_only_switches_cells_off():
    model = _model()
    x = torch.rand(3, 3, 32, 32)
    present, prob, flips = refine_presence(model, x, 0)
    start = prob > 0.5
    assert int(flips.sum()) > 0  # the test would check nothing otherwise
    assert not (present & ~start).any()  # nothing the encoder left off is switched on
    assert int((start & ~present).sum()) == int(flips.sum())


def test_a_background_computed_once_gives_the_same_objective():
    model = _model()
    x = torch.rand(3, 3, 32, 32)
    fixed = torch.full((3, 4, 4), float("nan"))
    fixed[0, 0, 0], fixed[2, 1, 1] = 1.0, 0.0
    with torch.no_grad():
        bg = model(x, 0)["bg"]
        which = torch.tensor([2, 0])  # a batch of other images, the background indexed to them
        cached = objective_with(model, x[which], 0, fixed[which], {k: v[which] for k, v in bg.items()})
        fresh = objective_with(model, x[which], 0, fixed[which])
    assert torch.allclose(cached["objective"], fresh["objective"], rtol=1e-5)


def test_the_foregrounds_cells_computed_once_give_the_same_output():
    """The search computes each cell's latents and glimpse maps once per frame (they do not depend on
    z_pres) and composites them anew for every try: the same objective, composite and KLs as a fresh pass."""
    model = _model()
    x = torch.rand(3, 3, 32, 32)
    fixed = torch.full((3, 4, 4), float("nan"))
    fixed[0, 0, 0], fixed[1, 2, 3], fixed[2, 1, 1] = 1.0, 0.0, 1.0
    with torch.no_grad():
        cells = model.fg.infer_cells(x)
        which = torch.tensor([2, 0])
        cached = objective_with(model, x[which], 0, fixed[which], None,
                                {k: v[which] if torch.is_tensor(v) else v for k, v in cells.items()})
        fresh = objective_with(model, x[which], 0, fixed[which])
    assert torch.allclose(cached["objective"], fresh["objective"], rtol=1e-6)
    for k in ("alpha", "mu_fg", "overlap", "kl_pres", "kl_where", "kl_what", "z_pres_prob"):
        assert torch.allclose(cached["fg"][k], fresh["fg"][k], rtol=1e-6, atol=1e-7), k


def test_a_cell_cost_ends_where_no_switch_off_lowers_the_objective_plus_the_cost():
    model = _model()
    x = torch.rand(3, 3, 32, 32)
    free, _, _ = refine_presence(model, x, 0)
    here = [_objective(model, x[i:i + 1], free[i]) for i in range(3)]
    # A cost between the smallest and the largest saving of switching one kept cell off, so that it matters.
    savings = sorted(_objective(model, x[i:i + 1], _off(free[i], r, c)) - here[i]
                     for i in range(3) for r, c in torch.nonzero(free[i]).tolist())
    cost = savings[len(savings) // 2]
    present, prob, flips = refine_presence(model, x, 0, cell_cost=cost)
    assert int(present.sum()) < int(free.sum())
    assert not (present & ~(prob > 0.5)).any()  # still only switched off
    for i in range(3):
        total = _objective(model, x[i:i + 1], present[i]) + cost * int(present[i].sum())
        for r, c in torch.nonzero(present[i]).tolist():  # no further switch-off pays for its cost
            assert _objective(model, x[i:i + 1], _off(present[i], r, c)) + cost * (int(present[i].sum()) - 1) \
                >= total - 1e-3
    with pytest.raises(ValueError, match="cell_cost"):
        refine_presence(model, x, 0, cell_cost=-1.0)


def _off(state, r, c):
    other = state.clone()
    other[r, c] = False
    return other


def test_refined_boxes_lower_each_images_objective_and_move_only_the_cells_on():
    model = _model()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():  # each image's two likeliest cells on
        prob = model(x, 0)["fg"]["z_pres_prob"].flatten(1)  # (3, 16)
    present = torch.zeros_like(prob, dtype=torch.bool).scatter_(1, prob.topk(2, 1).indices, True).view(3, 4, 4)
    with torch.no_grad():
        bg, cells = model.bg(x), model.fg.infer_cells(x)
        before = objective_with(model, x, 0, present.float(), bg, cells)["objective"]
    moved = refine_boxes(model, x, 0, present, cells, bg, steps=8, lr=0.1)
    with torch.no_grad():
        after = objective_with(model, x, 0, present.float(), bg, moved)["objective"]
    assert (after <= before).all() and (after < before - 1e-3).any()
    assert all(p.grad is None for p in model.parameters())  # the weights are not trained
    off = ~present
    for k in ("scale_mu", "shift_mu", "centre", "size", "maps", "kl_what"):
        a, b = moved[k].reshape(3, 16, -1), cells[k].reshape(3, 16, -1)
        assert torch.equal(a[off.view(3, 16)], b[off.view(3, 16)]), k  # cells off keep the encoder's boxes and maps
    assert not torch.equal(moved["centre"][present], cells["centre"][present])
    # Each cell on holds the glimpse read at its new box, encoded and decoded, as a one-cell pass computes it.
    for i, r, c in torch.nonzero(present).tolist():
        centre, size = moved["centre"][i, r, c].view(1, 1, 2), moved["size"][i, r, c].view(1, 1, 2)
        with torch.no_grad():
            maps, kl_what = model.fg.glimpse_maps(extract_glimpses(x[i:i + 1], centre, size, 16))
        assert torch.allclose(moved["maps"][i, r * 4 + c], maps[0], atol=1e-5)
        assert torch.allclose(moved["kl_what"][i, r, c], kl_what[0], rtol=1e-5)
    # The boxes follow the latents' means through the paper's mapping.
    from space.model import where_to_box
    centre, size = where_to_box(moved["scale_mu"], moved["shift_mu"], 4, model.cfg.shift_range)
    assert torch.allclose(centre, moved["centre"]) and torch.allclose(size, moved["size"])


def test_refined_output_with_box_steps_searches_again_with_the_moved_boxes():
    model = _model()
    x = torch.rand(3, 3, 32, 32)
    plain = refined_output(model, x, 0, candidates=0.05)
    out, present, prob, flips = refined_output(model, x, 0, candidates=0.05, box_steps=8)
    assert torch.equal(prob, plain[2])  # the candidates and scores stay the amortised ones
    assert (out["objective"] <= plain[0]["objective"] + 1e-4).all()
    assert torch.equal(out["fg"]["z_pres_prob"] > 0.5, present)


def test_each_round_of_boxes_and_search_leaves_the_objective_plus_the_cost_no_higher():
    model = _model()
    x = torch.rand(3, 3, 32, 32)
    totals = []
    for rounds in (1, 2):
        out, present, _, _ = refined_output(model, x, 0, candidates=0.05, cell_cost=5.0, box_steps=6, box_rounds=rounds)
        totals.append(out["objective"] + 5.0 * present.flatten(1).sum(1))
    assert (totals[1] <= totals[0] + 1e-3).all()
