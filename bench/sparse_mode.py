"""Sparse mode on a trained run: step time, glimpses decoded, loss and box AP at several thresholds.

    python bench/sparse_mode.py --run results/runs/space_room3d_small/seeds/0 --data results/data/room3d_small.zarr

`model.sparse_threshold` skips the glimpses of cells whose z_pres probability is below it. For each
threshold (0 is the exact model) this measures, side by side in one process on the same weights:
- the median time of a training step (forward, backward, clipping, both optimiser steps) on real
  training batches, the thresholds taking turns step by step so that machine noise hits them alike;
- the share of glimpses decoded;
- on validation frames in eval mode: the loss (-ELBO per image) and MSE;
- box AP (class-agnostic COCO AP over IoU 0.5:0.95 and at IoU 0.5, `space.metrics.coco_ap`), with one
  detection per cell scored by its z_pres probability (cells below the threshold have no glimpse and
  are dropped).
The last line printed is one JSON object; --out also writes it to a results file, and --from prints the
table of one instead of measuring (--markdown: the table alone, as bench/tables.py reads it):

    python bench/sparse_mode.py --from bench/results/sparse_mode_demo_2026-11-25.json --markdown
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import add_from_flags, machine, print_from  # noqa: E402
from space.config import Config  # noqa: E402
from space.data import StoreDataset  # noqa: E402
from space.metrics import detect  # noqa: E402
from space.metrics import coco_ap  # noqa: E402
from space.checkpoints import load_checkpoint, load_model  # noqa: E402
from space.train import optimisers, train_step  # noqa: E402


def box_ap(model, data, step: int, batch: int, gt_boxes: list) -> dict:
    """Class-agnostic COCO AP (space.metrics.coco_ap, tested equal to pycocotools) of every kept cell's box
    scored by its z_pres probability, with the loss and MSE on the same frames."""
    th = model.cfg.sparse_threshold
    dets, loss, mse = [], [], []
    with torch.no_grad():
        for start in range(0, len(data), batch):
            idx = np.arange(start, min(start + batch, len(data)))
            out = model(data.__getitems__(idx), step)
            loss.append(float(-out["terms"]["elbo"]) * len(idx))
            mse.append(float(out["mse"].sum()))
            # Every cell is a detection, except those sparse mode skipped (no glimpse below the threshold).
            dets += [(b[p >= th], p[p >= th]) for b, p in detect(out, model.cfg.image_size, 0.0)]
    boxes, scores = [d[0] for d in dets], [d[1] for d in dets]
    return {"ap": round(coco_ap(gt_boxes, boxes, scores), 4), "ap50": round(coco_ap(gt_boxes, boxes, scores, 0.5), 4),
            "val_loss": round(sum(loss) / len(data), 1), "val_mse": round(sum(mse) / len(data), 6)}


def percent(share: float) -> str:
    return f"{100 * share:.1f}".rstrip("0").rstrip(".") + "%"


def table(results: dict) -> str:
    """One row per threshold: step time, speed-up over the first (exact) row, glimpses decoded, AP, loss.
    Markdown."""
    lines = ["| threshold | s/step | speed-up | glimpses decoded | AP50 | AP50:95 | val loss (-ELBO) | val MSE |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        th = f"{r['threshold']:g}" + (" (exact)" if r["threshold"] == 0 else "")
        lines.append(f"| {th} | {r['median_s']:.3f} | {r['speedup_vs_first']:.2f}x | {percent(r['glimpse_share'])} "
                     f"| {r['ap50']:.3f} | {r['ap']:.3f} | {r['val_loss']:.1f} | {r['val_mse']:.5f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a trained run directory (checkpoints/last.pt)")
    p.add_argument("--data", help="the store it was trained on")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    p.add_argument("--batch", type=int, default=0, help="training batch (default: the run's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per threshold")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--val-frames", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", metavar="JSON", help="also write the results here")
    add_from_flags(p)
    ns = p.parse_args(argv)
    if print_from(ns, table):
        return 0
    if not (ns.run and ns.data):
        p.error("--run and --data are needed to measure (or give --from RESULTS.json)")
    if ns.threads:
        torch.set_num_threads(ns.threads)

    state = load_checkpoint(Path(ns.run) / "checkpoints" / "last.pt")
    base = Config.from_dict(state["config"])
    step0 = int(state["step"])
    batch = ns.batch or base.train.batch_size
    train_set = StoreDataset(ns.data, "train", image_size=base.model.image_size)
    val_set = StoreDataset(ns.data, "val", image_size=base.model.image_size)
    val_n = min(ns.val_frames, len(val_set))
    gt_all = val_set.store.read("val", "boxes", slice(0, val_n))  # (N, K, 4) NaN-padded
    gt_boxes = [g[~np.isnan(g[:, 0])].astype(np.float64) for g in gt_all]

    class First:  # the first val_n validation frames
        def __len__(self):
            return val_n

        def __getitems__(self, idx):
            return val_set.__getitems__(idx)

    runs = {}
    for th in ns.thresholds:
        model, cfg, _ = load_model(Path(ns.run) / "checkpoints" / "last.pt", sparse_threshold=th)
        model = model.to(memory_format=torch.channels_last)
        opts = optimisers(model, cfg.train)
        model.eval()
        quality = box_ap(model, First(), step0, 32, gt_boxes)
        model.train()
        runs[th] = {"model": model, "opt": opts, "times": [], "glimpses": [], "quality": quality, "train": cfg.train}

    rng = np.random.default_rng(0)
    for i in range(ns.warmup + ns.steps):
        x = train_set.__getitems__(np.sort(rng.choice(len(train_set), batch, replace=False)))
        x = x.contiguous(memory_format=torch.channels_last)
        for th, r in runs.items():  # the thresholds take turns on the same batch
            t = time.perf_counter()
            out, _, _ = train_step(r["model"], x, step0 + i, *r["opt"], r["train"])  # the trainer's own step
            if i >= ns.warmup:
                r["times"].append(time.perf_counter() - t)
                r["glimpses"].append(out["fg"]["glimpses_decoded"])

    cells = batch * base.model.grid_size**2
    exact = statistics.median(runs[ns.thresholds[0]]["times"])
    rows = []
    for th, r in runs.items():
        med = statistics.median(r["times"])
        row = {"threshold": th, "median_s": round(med, 3), "speedup_vs_first": round(exact / med, 2),
               "glimpse_share": round(float(np.mean(r["glimpses"])) / cells, 3), **r["quality"]}
        rows.append(row)
        print(f"threshold {th:g}: {med:.3f} s/step ({exact / med:.2f}x), glimpses {row['glimpse_share']:.1%}, "
              f"AP {row['ap']:.3f}, AP50 {row['ap50']:.3f}, val loss {row['val_loss']:.1f}, MSE {row['val_mse']:.5f}")
    results = {"run": ns.run, "step": step0, "batch": batch, "grid": base.model.grid_size,
               "image": base.model.image_size, "threads": torch.get_num_threads(), "machine": machine(),
               "date": time.strftime("%Y-%m-%d %H:%M"),
               "command": " ".join(["python bench/sparse_mode.py", *(sys.argv[1:] if argv is None else argv)]),
               "rows": rows}
    if ns.out:
        Path(ns.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
