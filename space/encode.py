"""A trained model's latents for every frame of a store split, as a Zarr store for RL and analysis.

Per frame and cell (the foreground's G x G grid): the z_pres probability, the glimpse box from z_where, the
z_depth mean and the z_what mean; per frame and background component: the z^m and z^c means. Every
array names its dimensions, so `xarray.open_zarr(path)` reads the store as one Dataset. Eval mode: means,
no sampling, as `evaluate` scores. `python -m space encode --help`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datagen.store import consolidate

from .data import StoreDataset
from .model import extract_glimpses

# name: (dimensions, what it is); the store's attribute `variables` repeats these for its readers.
VARIABLES = {
    "z_pres_prob": (("frame", "cell_y", "cell_x"), "probability that the cell holds an object (z_pres)"),
    "box": (("frame", "cell_y", "cell_x", "box"),
            "the cell's glimpse from the z_where mean: x_min, y_min, x_max, y_max in pixels (not clipped)"),
    "z_depth": (("frame", "cell_y", "cell_x"), "the z_depth mean: the lower, the nearer the camera"),
    "z_what": (("frame", "cell_y", "cell_x", "z_what_dim"), "the z_what mean: the glimpse's appearance code"),
    "z_mask": (("frame", "component", "z_mask_dim"), "the background's z^m means, component k of K"),
    "z_comp": (("frame", "component", "z_comp_dim"), "the background's z^c means, component k of K"),
}


@torch.no_grad()
def latents(model, x: torch.Tensor, step: int, out: dict | None = None) -> dict[str, torch.Tensor]:
    """Images (B, 3, N, N) -> the VARIABLES of this batch, each batch first (model in eval mode); `out`:
    the model's output on x when the caller has it already."""
    cfg = model.cfg
    b, g, n = x.shape[0], cfg.grid_size, cfg.image_size
    out = model(x, step) if out is None else out
    fg = out["fg"]
    centre, size = fg["centre"], fg["size"]  # (B, G, G, 2) fractions of the image
    # z_what's mean is the glimpse encoder's output on the glimpse the model extracted for the cell
    glimpses = extract_glimpses(x, centre.reshape(b, g * g, 2), size.reshape(b, g * g, 2), cfg.glimpse_size)
    what_mu, _ = model.fg.glimpse_encoder(glimpses)  # (B*G*G, D)
    return {
        "z_pres_prob": fg["z_pres_prob"],  # (B, G, G)
        "box": torch.cat([centre - size / 2, centre + size / 2], -1) * n,  # (B, G, G, 4)
        "z_depth": fg["z_depth"][..., 0],  # (B, G, G)
        "z_what": what_mu.view(b, g, g, -1),  # (B, G, G, D)
        "z_mask": out["bg"]["z_mask"],  # (B, K, Dm)
        "z_comp": out["bg"]["z_comp"],  # (B, K, Dc)
    }


def encode(checkpoint: str | Path, data: str, split: str, out: str | Path, batch_size: int = 32,
           frames: int | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Write the latents of a split's first `frames` frames (all by default) to a new Zarr store at `out`;
    returns its summary (frames, shapes)."""
    import zarr
    from tqdm import tqdm

    from .checkpoints import load_model

    model, cfg, state = load_model(checkpoint, device)
    step = int(state["step"])
    dataset = StoreDataset(data, split, image_size=cfg.model.image_size)
    n = len(dataset) if frames is None else min(frames, len(dataset))
    m = cfg.model
    sizes = {"frame": n, "cell_y": m.grid_size, "cell_x": m.grid_size, "box": 4, "z_what_dim": m.z_what_dim,
             "component": m.n_components, "z_mask_dim": m.z_mask_dim, "z_comp_dim": m.z_comp_dim}
    root = zarr.create_group(str(out), overwrite=False, attributes={
        "checkpoint": str(checkpoint), "step": step, "data": str(data), "split": split,
        "image_size": m.image_size, "variables": {k: v[1] for k, v in VARIABLES.items()},
        "note": "SPACE latents in eval mode (means); frame i is frame i of the split",
    })
    arrays = {name: root.create_array(name, shape=tuple(sizes[d] for d in dims), dtype="float32",
                                      chunks=(min(batch_size, n), *(sizes[d] for d in dims[1:])),
                                      dimension_names=dims, attributes={"description": text})
              for name, (dims, text) in VARIABLES.items()}
    for start in tqdm(range(0, n, batch_size), desc=f"encode {split}", unit="batch", disable=not progress):
        idx = np.arange(start, min(start + batch_size, n))
        for name, value in latents(model, dataset.__getitems__(idx).to(device), step).items():
            arrays[name][start:start + len(idx)] = value.float().cpu().numpy()
    consolidate(out)  # xarray opens it in one read
    return {"out": str(out), "frames": n, "step": step, "shapes": {k: list(a.shape) for k, a in arrays.items()}}
