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
"""

from __future__ import annotations

import torch


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
                   cell_cost: float = 0.0):
    """The search below, then the model's output on x with z_pres at the decisions it settled on (1 or 0;
    the background reused): (out, present (B, G, G) bool, prob (B, G, G) amortised, flips (B,))."""
    present, prob, flips, bg, cells = _search(model, x, step, threshold, candidates, cell_cost)
    return objective_with(model, x, step, present.float(), bg, cells), present, prob, flips


@torch.no_grad()
def refine_presence(model, x, step: int, threshold: float = 0.5, candidates: float | None = None,
                    cell_cost: float = 0.0, batch_size: int = 64):
    """x (B, 3, N, N) -> (present (B, G, G) bool, prob (B, G, G) the amortised z_pres probability,
    flips (B,) how many cells the search changed). The model must be in eval mode."""
    return _search(model, x, step, threshold, candidates, cell_cost, batch_size)[:3]


def _search(model, x, step: int, threshold: float, candidates: float | None, cell_cost: float = 0.0,
            batch_size: int = 64):
    """refine_presence's search; also returns the background's output on x and the foreground's per-cell
    inference (dicts; the latter None in sparse mode), each computed once for every try."""
    if model.training:
        raise RuntimeError("refine_presence: put the model in eval mode first (model.eval())")
    if cell_cost < 0:
        raise ValueError(f"cell_cost: 0 or more nats a cell, got {cell_cost}")
    candidates = threshold if candidates is None else candidates
    bg = model.bg(x)
    # Each cell's latents, glimpse and decoded maps do not depend on z_pres: a try only composites them
    # anew. Not in sparse mode, where the cells decoded depend on the ones switched on.
    cells = model.fg.infer_cells(x) if model.cfg.sparse_threshold == 0 else None
    out = model(x, step, bg=bg, fg_cells=cells)
    prob = out["fg"]["z_pres_prob"]  # (B, G, G)
    b, g = prob.shape[0], prob.shape[1]
    state = (prob > threshold).float()  # (B, G, G) the current hard decisions

    def cost(decisions):  # (T, G, G) -> (T,) the objective's charge for the cells on
        return cell_cost * decisions.flatten(1).sum(1)

    best = objective_with(model, x, step, state, bg, cells)["objective"] + cost(state)  # (B,)
    open_ = prob > candidates  # (B, G, G) cells that may still flip
    flips = torch.zeros(b, dtype=torch.long)
    active = torch.ones(b, dtype=torch.bool)
    while active.any():
        # Every (image, cell) flip to try this round, one forward pass each.
        img, cell = torch.nonzero(open_.flatten(1) & active[:, None], as_tuple=True)  # (T,), (T,)
        if img.numel() == 0:
            break
        tried = state[img].flatten(1).clone()  # (T, G*G)
        rows = torch.arange(img.numel())
        tried[rows, cell] = 1 - tried[rows, cell]
        tried = tried.view(-1, g, g)
        value = []
        for i in range(0, img.numel(), batch_size):
            which = img[i:i + batch_size]  # the images of these tries
            value.append(objective_with(model, x[which], step, tried[i:i + batch_size], _rows(bg, which),
                                        _rows(cells, which))["objective"])
        value = torch.cat(value) + cost(tried)  # (T,)
        # Per image, the flip with the lowest objective, if it is below the image's current one.
        gain = torch.full((b,), float("inf"))
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
