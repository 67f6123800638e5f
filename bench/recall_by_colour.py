"""Which 3D-Room objects a trained model finds: recall by object colour and by size.

    python -m space evaluate --run RUN --data STORE --split val --out EVAL     # writes EVAL/detections.json
    python bench/recall_by_colour.py --data STORE --split val --detections EVAL/detections.json

Each ground-truth object's colour is read from the frame itself (the mean RGB under its instance mask) and
named after the nearest colour of the generator's palette in chromaticity (RGB / (R + G + B)), which
shading changes little; its size is its box's area as a share of the frame. An object is found when a
detection with z_pres probability above --threshold overlaps its box at IoU --iou or more. AP averages
over all objects; this shows where the misses are (the CPU demo's foreground once kept to warm colours).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def recall(store: Store, split: str, detections: list, threshold: float, min_iou: float, small: float) -> dict:
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
        for k, box in enumerate(boxes[i]):
            if np.isnan(box[0]):
                continue
            mask = masks[i] == k + 1
            if not mask.any():
                continue
            hit = any(iou(box, d) >= min_iou for d in found.get(i, []))
            share = (box[2] - box[0]) * (box[3] - box[1]) / side**2
            for key in (colour_name(images[i][mask].mean(0)), "small" if share < small else "large"):
                c = counts.setdefault(key, [0, 0])
                c[0] += hit
                c[1] += 1
    return {k: {"recall": h / t, "objects": t} for k, (h, t) in sorted(counts.items())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the 3D-Room store the detections are of")
    p.add_argument("--split", default="val", help="its split (default: val)")
    p.add_argument("--detections", nargs="+", required=True, help="detections.json files of `space evaluate`")
    p.add_argument("--threshold", type=float, default=0.5, help="z_pres probability of a detection (default 0.5)")
    p.add_argument("--iou", type=float, default=0.5, help="least IoU of a hit (default 0.5)")
    p.add_argument("--small", type=float, default=0.025, help="box area share of the frame below which an "
                                                              "object is small (default 0.025)")
    ns = p.parse_args()
    store = Store(ns.data)
    try:
        store.array(ns.split, "masks")
    except Exception:  # noqa: BLE001 - the store reader names a missing array in its own way
        raise SystemExit(f"error: {ns.data} has no instance masks in {ns.split!r}; this reads 3D-Room stores") from None
    rows = {}
    for path in ns.detections:
        rows[path] = recall(store, ns.split, json.loads(Path(path).read_text()), ns.threshold, ns.iou, ns.small)
    keys = sorted({k for r in rows.values() for k in r})
    print("| detections | " + " | ".join(f"{k} ({next(iter(rows.values()))[k]['objects']})" for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    for path, r in rows.items():
        print(f"| {path} | " + " | ".join(f"{r[k]['recall']:.2f}" if k in r else "" for k in keys) + " |")
    print(json.dumps({"data": ns.data, "split": ns.split, "threshold": ns.threshold, "iou": ns.iou, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
