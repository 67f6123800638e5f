"""COCO-style JSON of one split's ground truth, so the usual detection tools (pycocotools) read it."""

from __future__ import annotations

import numpy as np

from .store import Store


def to_coco(store: Store, split: str) -> dict:
    g = store.split(split)
    n = int(g.attrs["n_frames"])
    h, w = store.attrs["image_size"]
    boxes = g["boxes"][:]  # (N, K, 4) xyxy, NaN-padded
    labels = g["labels"][:]  # (N, K)
    vis = g["visibility"][:]  # (N, K)
    counts = g["n_objects"][:]  # (N,)
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
