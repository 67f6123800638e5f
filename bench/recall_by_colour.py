"""Which 3D-Room objects a trained model finds: recall by object colour and by size.

    python -m space evaluate --run RUN --data STORE --split val --out EVAL     # writes EVAL/detections.json
    python bench/recall_by_colour.py --data STORE --split val --detections EVAL/detections.json

Each ground-truth object's colour is read from the frame itself (the mean RGB under its instance mask) and
named after the nearest colour of the generator's palette in chromaticity (RGB / (R + G + B)), which
shading changes little; its size is its box's area as a share of the frame; with --grid G, whether its box
centre has a cell of the model's GxG grid to itself or shares one with another object's. An object is found when a
detection with z_pres probability above --threshold overlaps its box at IoU --iou or more. AP averages
over all objects; this shows where the misses are (the CPU demo's foreground once kept to warm colours).
With --checkpoint it also shows, per colour, what that model does with each object (eval mode, the first
--frames frames): the z_pres probability of the cell holding the object's box centre, the share of that
glimpse where alpha is above 0.5, and the colour its decoder paints there against the object's own; and
the colour it paints from the mean z_what of all objects of that colour (what the code carries of it), and
how well a linear probe tells the colours apart from z_what.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import add_detection_flags, emit, machine, score_detections  # noqa: E402

from datagen.coco import box_cells  # noqa: E402
from datagen.config import OBJECT_COLORS  # noqa: E402
from datagen.store import Store  # noqa: E402

PALETTE = {"red": 0, "green": 1, "blue": 2, "yellow": 3, "magenta": 4, "cyan": 5, "orange": 6, "white": 7}


def colour_name(rgb: np.ndarray) -> str:
    chroma = lambda c: np.asarray(c, float) / max(float(np.sum(c)), 1e-6)  # noqa: E731
    dists = {name: np.linalg.norm(chroma(rgb) - chroma(OBJECT_COLORS[i])) for name, i in PALETTE.items()}
    return min(dists, key=dists.get)


def iou(a, b) -> float:
    """a: (x0, y0, x1, y1); b: COCO (x, y, w, h)."""
    bx1, by1 = b[0] + b[2], b[1] + b[3]
    w = max(0.0, min(a[2], bx1) - max(a[0], b[0]))
    h = max(0.0, min(a[3], by1) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + b[2] * b[3] - inter + 1e-9)


def recall(store: Store, split: str, detections: list, threshold: float, min_iou: float, small: float,
           grid: int | None = None) -> dict:
    """Recall per colour name and size; with `grid`, also for objects with a GxG cell of their own against
    those whose box centre shares a cell with another's (a SPACE cell explains one object)."""
    n = store.array(split, "boxes").shape[0]
    boxes = store.read(split, "boxes", slice(0, n))
    images = store.read(split, "images", slice(0, n))
    masks = store.read(split, "masks", slice(0, n))
    found = {}
    for d in detections:
        if d["score"] > threshold:
            found.setdefault(d["image_id"], []).append(d["bbox"])
    counts: dict = {}
    side = images.shape[1]
    for i in range(n):
        cells = box_cells(boxes[i], side, grid).tolist() if grid else []  # (K,) each slot's cell
        for k, box in enumerate(boxes[i]):
            if np.isnan(box[0]):
                continue
            mask = masks[i] == k + 1
            if not mask.any():
                continue
            hit = any(iou(box, d) >= min_iou for d in found.get(i, []))
            share = (box[2] - box[0]) * (box[3] - box[1]) / side**2
            keys = [colour_name(images[i][mask].mean(0)), "small" if share < small else "large"]
            if grid:
                keys.append(f"{'shared' if cells.count(cells[k]) > 1 else 'own'} {grid}x{grid} cell")
            for key in keys:
                c = counts.setdefault(key, [0, 0])
                c[0] += hit
                c[1] += 1
    return {k: {"recall": h / t, "objects": t} for k, (h, t) in sorted(counts.items())}


def decoded_colours(checkpoint: str, store: Store, split: str, frames: int) -> tuple[dict, dict]:
    """The probes of z_what ({"colour" or a colour name: held-out accuracy and its floor}), and per colour
    name: objects, mean z_pres probability of their cells, mean alpha > 0.5 share of their glimpses, the
    decoded colour, the colour decoded from their mean z_what, and the true mean colour (RGB in [0, 1])."""
    import torch

    from space.checkpoints import load_model

    model, cfg, state = load_model(Path(checkpoint))
    n = min(frames, store.array(split, "boxes").shape[0])
    images = store.read(split, "images", slice(0, n))
    boxes = store.read(split, "boxes", slice(0, n))
    masks = store.read(split, "masks", slice(0, n))
    from space.model import extract_glimpses

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out = model(x, int(state["step"]))
        fg = out["fg"]
        glimpses = extract_glimpses(x, fg["centre"].reshape(n, -1, 2), fg["size"].reshape(n, -1, 2),
                                    cfg.model.glimpse_size)
        z_what = model.fg.glimpse_encoder(glimpses)[0].view(n, -1, cfg.model.z_what_dim)  # (B, C, D) means
    g, side = cfg.model.grid_size, images.shape[1]
    maps = fg["glimpse_maps"]  # (B, C, 5, S, S)
    prob = fg["z_pres_prob"].reshape(n, -1)  # (B, C)
    rows: dict = {}
    for i in range(n):
        for k, box in enumerate(boxes[i]):
            mask = masks[i] == k + 1
            if np.isnan(box[0]) or not mask.any():
                continue
            cell = int(box_cells(box, side, g))
            glimpse = maps[i, cell]
            solid = glimpse[0] > 0.5
            painted = glimpse[1:4][:, solid].mean(1).numpy() if solid.any() else np.full(3, np.nan)
            true = images[i][mask].mean(0) / 255
            rows.setdefault(colour_name(true * 255), []).append(
                (prob[i, cell].item(), solid.float().mean().item(), painted, true, z_what[i, cell]))

    def mean_code_paints(r) -> list:
        """The colour the decoder paints from the mean z_what of a colour's objects: what the code says."""
        with torch.no_grad():
            alpha, o_att = model.fg.glimpse_decoder(torch.stack([x[4] for x in r]).mean(0, keepdim=True))
        solid = alpha[0, 0] > 0.5
        return np.round(o_att[0][:, solid].mean(1).numpy(), 2).tolist() if solid.any() else [float("nan")] * 3

    from space.probe import linear_probe_accuracy

    # Does z_what tell the colours apart? A linear probe of the colour name, and of each colour against the
    # rest, held out (space.probe, as `space evaluate` probes categories); the floor is always the commonest.
    names = sorted(rows)
    codes = np.concatenate([np.stack([x[4].numpy() for x in rows[c]]) for c in names])
    labels = np.concatenate([[i] * len(rows[c]) for i, c in enumerate(names)])
    floor = lambda y: float(np.bincount(y).max() / len(y))  # noqa: E731
    probe = {"colour": {"accuracy": linear_probe_accuracy(codes, labels), "floor": floor(labels)}}
    for i, c in enumerate(names):
        one = (labels == i).astype(np.int64)
        probe[c] = {"accuracy": linear_probe_accuracy(codes, one), "floor": floor(one)}
    return probe, {name: {"objects": len(r), "z_pres_prob": float(np.mean([x[0] for x in r])),
                   "alpha_share": float(np.mean([x[1] for x in r])),
                   "decoded_rgb": np.round(np.nanmean([x[2] for x in r], 0), 2).tolist(),
                   "mean_code_rgb": mean_code_paints(r),
                   "true_rgb": np.round(np.mean([x[3] for x in r], 0), 2).tolist()} for name, r in sorted(rows.items())}


def tables(results: dict) -> str:
    """Recall per colour and size, one row per detections file; and, when a checkpoint was read, what it
    paints per colour. Markdown."""
    rows, decoded = results["rows"], results.get("decoded")
    keys = sorted({k for r in rows.values() for k in r})
    first = next(iter(rows.values()))
    lines = ["| detections | " + " | ".join(f"{k} ({first[k]['objects']})" for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{r[k]['recall']:.2f}" if k in r else "" for k in keys) + " |")
    if decoded:
        rgb = lambda v: " ".join(f"{c:.2f}" for c in v) if v else ""  # noqa: E731
        lines += ["", "| colour | objects | z_pres probability | alpha > 0.5 share | decoded RGB | "
                  "decoded from the mean z_what | the object's RGB |", "|---|---|---|---|---|---|---|"]
        for name, d in decoded.items():
            lines.append(f"| {name} | {d['objects']} | {d['z_pres_prob']:.2f} | {d['alpha_share']:.2f} | "
                         f"{rgb(d['decoded_rgb'])} | {rgb(d.get('mean_code_rgb'))} | {rgb(d['true_rgb'])} |")
    probe = results.get("probe")
    if probe:
        lines += ["", "| z_what tells apart | held-out accuracy | always the commonest |", "|---|---|---|"]
        lines += [f"| {'every colour' if k == 'colour' else k + ' from the rest'} | {v['accuracy']:.3f} | "
                  f"{v['floor']:.3f} |" for k, v in probe.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_detection_flags(p)
    p.add_argument("--small", type=float, default=0.025, help="box area share of the frame below which an "
                                                              "object is small (default 0.025)")
    p.add_argument("--grid", type=int, help="also recall of objects with a GxG cell of their own against those "
                                            "sharing one (the model's grid_size)")
    p.add_argument("--checkpoint", help="a trained model's checkpoint: also show what it paints per colour")
    p.add_argument("--frames", type=int, default=64, help="frames for --checkpoint (default 64)")
    ns = p.parse_args(argv)
    if ns.source:
        results = json.loads(Path(ns.source).read_text())
    else:
        store, rows = score_detections(p, ns, lambda store, dets: recall(store, ns.split, dets, ns.threshold, ns.iou,
                                                                          ns.small, ns.grid))
        probe, decoded = decoded_colours(ns.checkpoint, store, ns.split, ns.frames) if ns.checkpoint else (None, None)
        results = {"data": ns.data, "split": ns.split, "threshold": ns.threshold, "iou": ns.iou, "rows": rows,
                   "decoded": decoded, "probe": probe, "frames": ns.frames, "machine": machine(),
                   "command": " ".join(sys.argv)}
    emit(results, tables(results), None if ns.source else ns.out, ns.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
