"""COCO-style JSON of one split's ground truth, so the usual detection tools (pycocotools) read it."""

from __future__ import annotations

import numpy as np

from .store import Store, StoreError


def to_coco(store: Store, split: str) -> dict:
    """Every object of every frame; StoreError (never fewer boxes) when the store cannot give them all."""
    n = store.n_frames(split)
    h, w = store.attrs["image_size"]
    # Store.read raises for a missing or damaged file instead of reading fill values (no boxes).
    boxes = store.read(split, "boxes", slice(None))  # (N, K, 4) xyxy, NaN-padded
    labels = store.read(split, "labels", slice(None))  # (N, K)
    vis = store.read(split, "visibility", slice(None))  # (N, K)
    counts = store.read(split, "n_objects", slice(None))  # (N,)
    k_max = boxes.shape[1]
    bad = [i for i in range(n) if not 0 <= counts[i] <= k_max or not np.isfinite(boxes[i, : counts[i]]).all()]
    if bad:
        raise StoreError(
            f"{store.path}: {split} frames {bad[:5]}{' ...' if len(bad) > 5 else ''} have n_objects that do not "
            f"match their boxes (counts outside 0..{k_max}, or NaN boxes among the objects); the store is damaged: "
            f"regenerate it: rerun the command that made it with --overwrite"
        )
    images = [{"id": i, "file_name": f"{split}/{i:06d}.png", "width": int(w), "height": int(h)} for i in range(n)]
    annotations = []
    for i in range(n):
        for k in range(int(counts[i])):
            x0, y0, x1, y1 = (float(v) for v in boxes[i, k])
            bw, bh = x1 - x0, y1 - y0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(labels[i, k]) + 1,  # COCO ids start at 1
                    "bbox": [x0, y0, bw, bh],  # COCO: x, y, width, height
                    "area": bw * bh,
                    "iscrowd": 0,
                    "visibility": None if np.isnan(vis[i, k]) else float(vis[i, k]),
                }
            )
    categories = [{"id": c + 1, "name": name, "supercategory": "object"} for c, name in enumerate(store.categories)]
    return {
        "info": {
            "description": f"{store.path} split {split}",
            "generator": store.attrs["generator"],
            "generator_version": store.attrs.get("generator_version"),
            "seed": store.attrs["seed"],
        },
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def box_cells(boxes, image_size, grid: int):
    """The cell of a GxG grid (SPACE's z_pres grid) that holds each box's centre, as row * grid + column;
    -1 for NaN padding. boxes (..., 4) xyxy in pixels; image_size a side or (height, width)."""
    boxes = np.asarray(boxes, dtype=float)
    height, width = (image_size, image_size) if np.isscalar(image_size) else image_size[:2]
    present = ~np.isnan(boxes[..., 0])  # (...)
    cx = np.where(present, (boxes[..., 0] + boxes[..., 2]) / 2 / width, 0)  # (...), in [0, 1]
    cy = np.where(present, (boxes[..., 1] + boxes[..., 3]) / 2 / height, 0)
    # a centre on the far edge belongs to the last cell
    row = np.clip((cy * grid).astype(int), 0, grid - 1)
    col = np.clip((cx * grid).astype(int), 0, grid - 1)
    return np.where(present, row * grid + col, -1)
