"""Sparse mode (model.sparse_threshold): glimpses decoded only where z_pres is likely.

An approximation, off by default: a cell whose z_pres probability is below the threshold contributes
nothing to the foreground (zero maps, so no alpha, colour or boundary band) and pays no z_what KL, instead
of an almost-zero share. At a threshold below every cell's probability it is the exact model (tested).
"""

from __future__ import annotations


def sparse_cells(glimpse_maps, glimpses, pres_prob, threshold: float):
    """glimpse_maps (the Foreground's: glimpses (M, 3, S, S) -> maps (M, 5, S, S), KL (M,)) applied only to
    the cells with pres_prob (M,) at or above threshold. Returns maps (M, 5, S, S) and z_what's KL (M,),
    zero at the skipped cells, and how many glimpses were decoded."""
    keep = (pres_prob >= threshold).nonzero().squeeze(1)  # (M',)
    m, _, s, _ = glimpses.shape
    maps, kl_what = glimpses.new_zeros(m, 5, s, s), glimpses.new_zeros(m)
    if keep.numel():
        kept_maps, kept_kl = glimpse_maps(glimpses[keep])
        maps = maps.index_copy(0, keep, kept_maps)
        kl_what = kl_what.index_copy(0, keep, kept_kl)
    return maps, kl_what, int(keep.numel())
