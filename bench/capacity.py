"""Gradient-step latency against decomposition capacity (the paper's figure 5, right).

    python bench/capacity.py --grids 4 8 16 32 --components 1 3 5 8 --batch 16

For each foreground grid (HxW cells) it times one training step of SPACE, whose cells are all inferred at
once (equation 7), and of the same model with a sequential-inference pass in the manner of SPAIR added:
cells visited one at a time in raster order, each cell's z_pres and z_where conditioned on the latents
already inferred for its left, upper-left, upper and upper-right neighbours, and its glimpse encoded
before the next cell is visited. The sequential model runs that loop and then SPACE's own pass (decoding,
compositing, the KL terms), so the difference of the two times is the cost of inferring cell by cell. For each K it times SPACE's step with that many background
components. The two models take turns step by step in one process. The last line printed is one JSON
object; `--markdown` also prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import machine  # noqa: E402
from space.config import Config, merge, PRESETS  # noqa: E402
from space.memory import exec_with_tcmalloc, set_host_allocator  # noqa: E402
from space.model import SPACE, Foreground, extract_glimpses, normal_params  # noqa: E402
from space.devices import checkpoint_images  # noqa: E402
from space.train import optimisers, train_step  # noqa: E402


class SequentialForeground(Foreground):
    """SPAIR-style inference: one cell after another, each conditioned on its inferred neighbours.

    Per cell: [cell features (128), neighbours' z_pres and z_where (4 x 5)] -> z_pres logit, z_where
    (mean, std), z_depth; then its glimpse is read and encoded to z_what. The rest (decoding, compositing,
    KL terms) is SPACE's, so only the order of inference differs.
    """

    NEIGHBOURS = ((0, -1), (-1, -1), (-1, 0), (-1, 1))  # left, upper-left, upper, upper-right (row, col)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.cell_head = nn.Sequential(nn.Linear(128 + 5 * len(self.NEIGHBOURS), 128), nn.CELU(),
                                       nn.Linear(128, 1 + 8 + 2 * cfg.z_depth_dim))

    def infer(self, x, z_scale_prior_mean: float, z_scale_prior_std: float, z_pres_prior: float, tau: float):
        cfg = self.cfg
        b, g = x.shape[0], cfg.grid_size
        feats = self.encoder(x).permute(0, 2, 3, 1)  # (B, G, G, 128)
        done = {}  # (row, col) -> (B, 5): z_pres and z_where of an inferred cell
        heads = []
        for r in range(g):
            for c in range(g):
                ctx = [done.get((r + dr, c + dc), feats.new_zeros(b, 5)) for dr, dc in self.NEIGHBOURS]
                h = self.cell_head(torch.cat([feats[:, r, c], *ctx], 1))  # (B, 1 + 8 + 2 Dd)
                pres = torch.sigmoid(h[:, :1])
                where_mu, where_sd = normal_params(h[:, 1:9], 4)
                z_where = where_mu + where_sd * torch.randn_like(where_sd)
                done[(r, c)] = torch.cat([pres, z_where], 1)
                # This cell's glimpse is read and encoded now, as the next cell's inference waits on it.
                centre = (torch.tensor([c + 0.5, r + 0.5], device=x.device) + torch.tanh(z_where[:, 2:])) / g
                size = torch.sigmoid(z_where[:, :2])
                self.glimpse_encoder(extract_glimpses(x, centre[:, None], size[:, None], cfg.glimpse_size))
                heads.append(h)
        # The cell-by-cell loop above is the sequential cost; everything after it is SPACE's own pass.
        out = super().infer(x, z_scale_prior_mean, z_scale_prior_std, z_pres_prior, tau)
        out["kl_pres"] = out["kl_pres"] + 0 * torch.stack(heads).sum()  # keep the loop in the graph
        return out


def build(preset: str, grid: int, k: int, sequential: bool):
    cfg = Config.from_dict(merge(PRESETS[preset], {"model": {"grid_size": grid, "n_components": k}})).validate()
    torch.manual_seed(0)
    model = SPACE(cfg.model)
    if sequential:
        model.fg = SequentialForeground(cfg.model)
    model = model.to(memory_format=torch.channels_last)
    # as training runs it on this device (train.checkpoint_images; 2 images a chunk on CPU)
    model.set_checkpoint_images(checkpoint_images(cfg.train.checkpoint_images, torch.device("cpu")))
    return model, optimisers(model, cfg.train), cfg


def step(model, opts, x, t_cfg):
    train_step(model, x, 0, *opts, t_cfg)  # the trainer's own step


def time_side_by_side(variants: dict, x, steps: int, warmup: int) -> dict:
    times = {name: [] for name in variants}
    for i in range(warmup + steps):
        for name, (model, opts, cfg) in variants.items():
            t = time.perf_counter()
            step(model, opts, x, cfg.train)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def markdown(grid_rows: list, k_rows: list, k_grid: int) -> str:
    """The two tables: latency against the grid (SPACE beside sequential inference), and against K."""
    lines = ["| grid | cells | SPACE s/step | sequential s/step | sequential part | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['grid']}x{r['grid']} | {r['cells']} | {r['space_s']:.2f} | {r['sequential_s']:.2f} | "
              f"{r['sequential_extra_s']:.2f} | {r['sequential_s'] / r['space_s']:.2f}x |" for r in grid_rows]
    lines += ["", f"| K | SPACE s/step (grid {k_grid}x{k_grid}) |", "|---|---|"]
    lines += [f"| {r['components']} | {r['space_s']:.2f} |" for r in k_rows]
    return "\n".join(lines)


def plot(path: str, grid_rows: list, k_rows: list, title: str) -> None:
    """Figure 5's right panel: step latency against the number of cells, SPACE beside sequential inference,
    and against the number of background components."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    cells = [r["cells"] for r in grid_rows]
    a.plot(cells, [r["space_s"] for r in grid_rows], "o-", label="SPACE (parallel cells)")
    a.plot(cells, [r["sequential_s"] for r in grid_rows], "s--", label="sequential inference (SPAIR-style)")
    a.set_xscale("log", base=2)
    a.set_xlabel("cells (H x W)")
    a.set_ylabel("s per training step")
    a.legend()
    if k_rows:
        b.plot([r["components"] for r in k_rows], [r["space_s"] for r in k_rows], "o-")
    a.set_ylim(bottom=0)
    b.set_ylim(bottom=0)
    b.set_xlabel("background components K")
    b.set_ylabel("s per training step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="room3d_large", choices=sorted(PRESETS))
    p.add_argument("--grids", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--components", type=int, nargs="+", default=[1, 3, 5, 8])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    p.add_argument("--plot", metavar="PNG", help="draw latency against cells (SPACE and sequential) and against K")
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="measure nothing: plot (--plot) or tabulate (--markdown) the JSON lines of earlier runs, "
                        "merged by grid and K (a later file's row wins)")
    ns = p.parse_args()
    if ns.from_json:
        rows = [json.loads(open(f).read().strip().splitlines()[-1]) for f in ns.from_json]
        grids = {r["grid"]: r for run in rows for r in run["grids"]}  # a later file's row wins
        ks = {r["components"]: r for run in rows for r in run["components"]}
        grid_rows, k_rows = [grids[g] for g in sorted(grids)], [ks[k] for k in sorted(ks)]
        if ns.markdown:
            print(markdown(grid_rows, k_rows, Config.from_dict(PRESETS[rows[0]["preset"]]).model.grid_size))
        if ns.plot or not ns.markdown:
            plot(ns.plot or "capacity.png", grid_rows, k_rows,
                 f"{rows[0]['preset']}, batch {rows[0]['batch']}, {rows[0]['threads']} CPU threads")
        return
    t = Config.from_dict(PRESETS[ns.preset]).train
    exec_with_tcmalloc(t.host_allocator)  # preloaded as `python -m space train` does
    set_host_allocator(t.host_allocator, t.malloc_mmap_threshold_mib)  # as training
    if ns.threads:
        torch.set_num_threads(ns.threads)
    n = PRESETS[ns.preset].get("model", {}).get("image_size", 128)
    x = torch.rand(ns.batch, 3, n, n).contiguous(memory_format=torch.channels_last)
    k_default = Config.from_dict(PRESETS[ns.preset]).model.n_components

    grid_rows = []
    for g in ns.grids:
        med = time_side_by_side({"space": build(ns.preset, g, k_default, False),
                                 "sequential": build(ns.preset, g, k_default, True)}, x, ns.steps, ns.warmup)
        grid_rows.append({"grid": g, "cells": g * g, "space_s": round(med["space"], 3),
                          "sequential_s": round(med["sequential"], 3),
                          "sequential_extra_s": round(med["sequential"] - med["space"], 3)})
        print(f"grid {g}x{g}: SPACE {med['space']:.2f} s, sequential {med['sequential']:.2f} s", flush=True)
    k_rows = []
    g_default = Config.from_dict(PRESETS[ns.preset]).model.grid_size
    for k in ns.components:
        med = time_side_by_side({"space": build(ns.preset, g_default, k, False)}, x, ns.steps, ns.warmup)
        k_rows.append({"components": k, "space_s": round(med["space"], 3)})
        print(f"K={k}: SPACE {med['space']:.2f} s", flush=True)
    if ns.markdown:
        print("\n" + markdown(grid_rows, k_rows, g_default))
    if ns.plot:
        plot(ns.plot, grid_rows, k_rows, f"{ns.preset}, batch {ns.batch}, {torch.get_num_threads()} CPU threads")
    print(json.dumps({"preset": ns.preset, "batch": ns.batch, "image": n, "threads": torch.get_num_threads(),
                      "machine": machine(), "grids": grid_rows, "components": k_rows}))


if __name__ == "__main__":
    main()
