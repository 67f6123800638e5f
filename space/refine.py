"""Which cells hold an object, refined against the model's own objective (not in the paper).

SPACE infers every cell's z_pres in one amortised pass (equation 7). On the CPU reference most extra
boxes are a second glimpse on an object another glimpse already explains (BENCHMARKS.md, "Where the count
error comes from"), and switching such a cell off often lowers the training objective (-ELBO plus appendix
C's boundary loss): the encoder keeps cells on that its own objective would drop. This module searches the
hard z_pres configurations of each image for a lower objective, the other latents at their posterior means
as evaluation has them:

    start from the amortised decisions, z_pres = 1 where its probability is above `threshold`, else 0;
    repeat: of the cells whose probability is above `candidates` (each may change once), flip the one whose
    flip lowers the image's objective most; stop when no flip lowers it.

The objective may charge `cell_cost` nats more for every cell on (default 0: the model's objective alone),
a stricter prior on z_pres at inference time: a cell stays on only if it lowers the rest by more than that.

`candidates` defaults to `threshold`, so the search only switches cells off; a lower value lets it switch
cells on too. At no cost that added more boxes than it removed on the reference's validation split; with
60 nats a cell it found more objects and fewer extra boxes (BENCHMARKS.md, "The reference experiment").
No labels are used: it is inference, a search for the posterior's mode over z_pres, and evaluation runs it
only on request (`python -m space evaluate --refine`). The background and each cell's glimpse networks
run once per frame; each try of a round composites the glimpses anew and recomputes the objective.

The encoder's boxes are amortised too, and a glimpse often sits on part of an object. With `box_steps`
(`--refine-box-steps`) the search is followed by gradient steps on the posterior means of z_scale and
z_shift of the cells on, z_pres held, each glimpse read and encoded anew at its moved box (semi-amortised
inference: the encoder's guess, then a few steps on the same objective), and the search runs again from
its decisions: a box grown over its whole object leaves the cell on the rest of it nothing to explain.
`box_rounds` (`--refine-box-rounds`) repeats boxes-then-search, so that the boxes left after one round's
switches move again.
"""

from __future__ import annotations

import torch

from .model import extract_glimpses, where_to_box


def objective_with(model, x, step: int, fixed, bg: dict | None = None, fg_cells: dict | None = None):
    """The model's output on x (B, 3, N, N) with z_pres fixed to `fixed` (B, G, G): 0 or 1, NaN = inferred.
    bg, fg_cells: the background's output and the foreground's per-cell inference (`Foreground.infer_cells`)
    on x, if already computed: neither depends on z_pres."""
    model.fg.z_pres_fixed = fixed
    try:
        return model(x, step, bg=bg, fg_cells=fg_cells)
    finally:
        model.fg.z_pres_fixed = None


def _rows(d: dict | None, which):
    """A dict of batch-first tensors (and other values, kept) at the rows `which`."""
    if d is None:
        return None
    return {k: v[which] if torch.is_tensor(v) else v for k, v in d.items()}


@torch.no_grad()
def refined_output(model, x, step: int, threshold: float = 0.5, candidates: float | None = None,
                   cell_cost: float = 0.0, box_steps: int = 0, box_lr: float = 0.1, box_rounds: int = 1):
    """The search below, then the model's output on x with z_pres at the decisions it settled on (1 or 0;
    the background reused): (out, present (B, G, G) bool, prob (B, G, G) amortised, flips (B,)).
    box_steps > 0: then, `box_rounds` times, the boxes of the cells on are refined (`refine_boxes`) and the
    search runs again from its decisions with the new boxes (a cell switched on in one round has its box
    refined in the next)."""
    present, prob, flips, bg, cells = _search(model, x, step, threshold, candidates, cell_cost)
    for _ in range(box_rounds if box_steps > 0 and cells is not None else 0):
        cells = refine_boxes(model, x, step, present, cells, bg, box_steps, box_lr)
        present, _, more, bg, cells = _search(model, x, step, threshold, candidates, cell_cost,
                                              cells=cells, bg=bg, start=present, prob=prob)
        flips = flips + more
    return objective_with(model, x, step, present.float(), bg, cells), present, prob, flips


def refine_boxes(model, x, step: int, present, cells: dict, bg: dict, steps: int, lr: float) -> dict:
    """The posterior means of z_scale and z_shift of the cells on (present (B, G, G) bool), moved by Adam to
    lower each image's objective, z_pres fixed: a glimpse on part of an object can grow to cover it. Each
    cell's glimpse is read anew at its box and encoded, so z_what follows the box. `cells` is
    `Foreground.infer_cells`'s output; returns it with the boxes, maps and z_what KLs of the cells on
    replaced, at the step where each image's objective was lowest."""
    b, g = present.shape[:2]
    s = model.cfg.glimpse_size
    on = torch.nonzero(present.flatten())[:, 0]  # (M,) flat (image, cell) indices
    if on.numel() == 0 or steps <= 0:
        return cells
    img = on // (g * g)  # (M,)
    fixed = present.float()

    def with_boxes(d_scale, d_shift):  # (M, 2) each -> cells with the cells on moved
        scale_mu = cells["scale_mu"].reshape(-1, 2).index_add(0, on, d_scale).view_as(cells["scale_mu"])
        shift_mu = cells["shift_mu"].reshape(-1, 2).index_add(0, on, d_shift).view_as(cells["shift_mu"])
        centre, size = where_to_box(scale_mu, shift_mu, g, model.cfg.shift_range)  # (B, G, G, 2) each
        c_on, s_on = centre.reshape(-1, 2)[on], size.reshape(-1, 2)[on]  # (M, 2)
        glimpses = extract_glimpses(x[img], c_on[:, None], s_on[:, None], s)  # (M, 3, S, S)
        maps_on, kl_on = model.fg.glimpse_maps(glimpses)  # (M, 5, S, S), (M,)
        maps = cells["maps"].reshape(-1, 5, s, s).index_copy(0, on, maps_on).view_as(cells["maps"])
        kl_what = cells["kl_what"].reshape(-1).index_copy(0, on, kl_on).view_as(cells["kl_what"])
        return {**cells, "scale_mu": scale_mu, "shift_mu": shift_mu, "centre": centre, "size": size,
                "maps": maps, "kl_what": kl_what}

    d_scale = torch.zeros(on.numel(), 2, device=x.device, requires_grad=True)
    d_shift = torch.zeros(on.numel(), 2, device=x.device, requires_grad=True)
    best = torch.full((b,), float("inf"), device=x.device)
    best_scale, best_shift = d_scale.detach().clone(), d_shift.detach().clone()
    opt = torch.optim.Adam([d_scale, d_shift], lr=lr)
    for i in range(steps + 1):
        with torch.enable_grad():
            out = objective_with(model, x, step, fixed, bg, with_boxes(d_scale, d_shift))
            value = out["objective"]  # (B,) detached
            better = value < best  # keep each image's lowest so far
            best = torch.where(better, value, best)
            keep = better[img]  # (M,)
            best_scale[keep] = d_scale.detach()[keep]
            best_shift[keep] = d_shift.detach()[keep]
            if i == steps:
                break
            # the images' objectives are independent, so their sum's gradient is each one's own
            total = b * (out["terms"]["boundary_loss"] - out["terms"]["elbo"])
            # only the boxes' gradients: the model's weights get none
            d_scale.grad, d_shift.grad = torch.autograd.grad(total, [d_scale, d_shift])
        opt.step()
    with torch.no_grad():
        return with_boxes(best_scale, best_shift)


@torch.no_grad()
def refine_presence(model, x, step: int, threshold: float = 0.5, candidates: float | None = None,
                    cell_cost: float = 0.0, batch_size: int = 64):
    """x (B, 3, N, N) -> (present (B, G, G) bool, prob (B, G, G) the amortised z_pres probability,
    flips (B,) how many cells the search changed). The model must be in eval mode."""
    return _search(model, x, step, threshold, candidates, cell_cost, batch_size)[:3]


def _search(model, x, step: int, threshold: float, candidates: float | None, cell_cost: float = 0.0,
            batch_size: int = 64, cells: dict | None = None, bg: dict | None = None, start=None, prob=None):
    """refine_presence's search; also returns the background's output on x and the foreground's per-cell
    inference (dicts; the latter None in sparse mode), each computed once for every try. cells, bg, start
    (B, G, G) bool and prob (B, G, G): a search again from decisions `start` with cells already inferred
    (and moved by `refine_boxes`), the candidates still chosen by the amortised `prob`."""
    if model.training:
        raise RuntimeError("refine_presence: put the model in eval mode first (model.eval())")
    if cell_cost < 0:
        raise ValueError(f"cell_cost: 0 or more nats a cell, got {cell_cost}")
    candidates = threshold if candidates is None else candidates
    bg = model.bg(x) if bg is None else bg
    # Each cell's latents, glimpse and decoded maps do not depend on z_pres: a try only composites them
    # anew. Not in sparse mode, where the cells decoded depend on the ones switched on.
    if cells is None and model.cfg.sparse_threshold == 0:
        cells = model.fg.infer_cells(x)
    if prob is None:
        prob = model(x, step, bg=bg, fg_cells=cells)["fg"]["z_pres_prob"]  # (B, G, G)
    b, g = prob.shape[0], prob.shape[1]
    state = (prob > threshold).float() if start is None else start.float()  # (B, G, G) the current hard decisions

    def cost(decisions):  # (T, G, G) -> (T,) the objective's charge for the cells on
        return cell_cost * decisions.flatten(1).sum(1)

    best = objective_with(model, x, step, state, bg, cells)["objective"] + cost(state)  # (B,)
    open_ = prob > candidates  # (B, G, G) cells that may still flip
    flips = torch.zeros(b, dtype=torch.long, device=x.device)
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    while active.any():
        # Every (image, cell) flip to try this round, one forward pass each.
        img, cell = torch.nonzero(open_.flatten(1) & active[:, None], as_tuple=True)  # (T,), (T,)
        if img.numel() == 0:
            break
        tried = state[img].flatten(1).clone()  # (T, G*G)
        rows = torch.arange(img.numel(), device=x.device)
        tried[rows, cell] = 1 - tried[rows, cell]
        tried = tried.view(-1, g, g)
        value = []
        for i in range(0, img.numel(), batch_size):
            which = img[i:i + batch_size]  # the images of these tries
            value.append(objective_with(model, x[which], step, tried[i:i + batch_size], _rows(bg, which),
                                        _rows(cells, which))["objective"])
        value = torch.cat(value) + cost(tried)  # (T,)
        # Per image, the flip with the lowest objective, if it is below the image's current one.
        gain = torch.full((b,), float("inf"), device=x.device)
        gain.scatter_reduce_(0, img, value, reduce="amin")
        improved = gain < best
        for i in torch.nonzero(improved)[:, 0].tolist():
            k = int(torch.nonzero((img == i) & (value == gain[i]))[0, 0])
            state[i] = tried[k]
            open_[i].view(-1)[cell[k]] = False
            best[i] = gain[i]
            flips[i] += 1
        active &= improved
    return state > 0.5, prob, flips, bg, cells
