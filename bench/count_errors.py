"""Where a trained model's object-count error comes from: each detection classed, each miss counted.

    python -m space evaluate --run RUN --data STORE --split val --out EVAL     # writes EVAL/detections.json
    python bench/count_errors.py --data STORE --split val --detections EVAL/detections.json

Table 1's count error is mean |detected - true| / true over frames, so duplicates and misses in one frame
cancel and neither shows where they come from. Here each detection (z_pres probability above --threshold,
highest first) is one of:
- found: the first to box an object at IoU --iou or more;
- duplicate: at least half of it inside an object that another detection already found (two cells
  explaining one object);
- poor box: overlapping an object otherwise;
- background: overlapping no object; of these, how many touch the frame's border (a background that cannot
  paint part of the frame, e.g. the sky beyond the walls, leaves it to the foreground).
Objects no detection found are misses. The count error is split into what frames with too many
detections and frames with too few contribute (the two add up to it). `--table duplicates` shows where
the duplicates sit: their offset from the detection that found the object, and the objects' sizes.
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

from space.metrics import iou_matrix  # noqa: E402

KINDS = ("found", "duplicate", "poor box", "background", "at the border", "missed")


def _inside_share(det, objs) -> np.ndarray:
    """The share of box `det` inside each of `objs`, all (x0, y0, x1, y1): (m,)."""
    o = np.asarray(objs, dtype=np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(det[2], o[:, 2]) - np.maximum(det[0], o[:, 0]), 0, None)
    h = np.clip(np.minimum(det[3], o[:, 3]) - np.maximum(det[1], o[:, 1]), 0, None)
    return w * h / max((det[2] - det[0]) * (det[3] - det[1]), 1e-9)


def classify(objects: list, detections: list, side: int, min_iou: float = 0.5) -> dict:
    """Per frame: `objects[i]` its true (x0, y0, x1, y1) boxes, `detections[i]` its (score, box) pairs
    above the threshold; `side` the frame's size in pixels. Counts of each kind of KINDS, and the count
    error with its over- and under-count parts. IoU is the evaluation's (space.metrics.iou_matrix)."""
    tally = dict.fromkeys(KINDS, 0)
    over = under = 0.0
    pairs = []  # per duplicate: (|dx|, |dy|) from the detection that found its object, that object's (w, h)
    for objs, dets in zip(objects, detections):
        found = np.zeros(len(objs), dtype=bool)
        finder: dict[int, list] = {}  # object -> the detection that found it
        boxes = [box for _, box in sorted(dets, key=lambda d: -d[0])]
        ious = iou_matrix(boxes, objs)  # (detections by score, objects)
        for box, iou in zip(boxes, ious):
            free = np.where(~found & (iou >= min_iou), iou, -1.0)
            inside = _inside_share(box, objs) if objs else np.zeros(0)
            if free.max(initial=-1.0) >= 0:
                k = int(free.argmax())
                found[k] = True
                finder[k] = box
                tally["found"] += 1
            elif np.any(found & (inside >= 0.5)):
                tally["duplicate"] += 1
                k = int(np.argmax(np.where(found, inside, -1.0)))
                f, o = finder[k], objs[k]
                pairs.append((abs((box[0] + box[2]) - (f[0] + f[2])) / 2, abs((box[1] + box[3]) - (f[1] + f[3])) / 2,
                              o[2] - o[0], o[3] - o[1]))
            elif np.any(iou > 0):
                tally["poor box"] += 1
            else:
                tally["background"] += 1
                tally["at the border"] += bool(min(box[0], box[1]) <= 0 or max(box[2], box[3]) >= side)
        tally["missed"] += int((~found).sum())
        error = (len(dets) - len(objs)) / max(len(objs), 1)
        over += max(error, 0.0)
        under += max(-error, 0.0)
    n = max(len(objects), 1)
    sizes = np.array([(o[2] - o[0], o[3] - o[1]) for objs in objects for o in objs]).reshape(-1, 2)
    pr = np.array(pairs).reshape(-1, 4)
    med = (lambda a: float(np.median(a)) if a.size else float("nan"))  # noqa: E731
    duplicates = {"offset_dx": med(pr[:, 0]), "offset_dy": med(pr[:, 1]),
                  "vertical_share": float(np.mean(pr[:, 1] > pr[:, 0])) if len(pr) else float("nan"),
                  "object_w": med(pr[:, 2]), "object_h": med(pr[:, 3]),
                  "all_objects_w": med(sizes[:, 0]), "all_objects_h": med(sizes[:, 1])}
    return {**tally, "objects": sum(len(o) for o in objects), "detections": sum(len(d) for d in detections),
            "count_error": (over + under) / n, "from_too_many": over / n, "from_too_few": under / n,
            "duplicates": duplicates}


def read(store, split: str, detections: list, threshold: float) -> tuple[list, list, int]:
    """The objects (boxes of objects with a visible mask) and detections above `threshold` of each frame."""
    n = store.array(split, "boxes").shape[0]
    boxes = store.read(split, "boxes", slice(0, n))
    masks = store.read(split, "masks", slice(0, n))
    objects = [[b.tolist() for k, b in enumerate(boxes[i]) if not np.isnan(b[0]) and (masks[i] == k + 1).any()]
               for i in range(n)]
    dets: list = [[] for _ in range(n)]
    for d in detections:
        if d["score"] > threshold:
            x, y, w, h = d["bbox"]  # COCO
            dets[d["image_id"]].append((d["score"], [x, y, x + w, y + h]))
    return objects, dets, masks.shape[1]


def table(results: dict) -> str:
    cols = [*KINDS, "objects", "detections", "count_error", "from_too_many", "from_too_few"]
    lines = ["| detections | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for label, row in results["rows"].items():
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def duplicates_table(results: dict) -> str:
    """Where the duplicates sit: the median offset of a duplicate from the detection that found its object
    (pixels), the share offset more up-down than sideways, and the duplicated objects' median size
    against all objects'."""
    lines = ["| detections | duplicates | offset x | offset y | more up-down | their objects (w x h) | "
             "all objects (w x h) |", "|---|---|---|---|---|---|---|"]
    for label, row in results["rows"].items():
        d = row.get("duplicates")
        if d is None:  # a results file written before this table
            continue
        lines.append(f"| {label} | {row['duplicate']} | {d['offset_dx']:.1f} | {d['offset_dy']:.1f} | "
                     f"{d['vertical_share']:.2f} | {d['object_w']:.1f} x {d['object_h']:.1f} | "
                     f"{d['all_objects_w']:.1f} x {d['all_objects_h']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_detection_flags(p)
    p.add_argument("--table", choices=("kinds", "duplicates"), default="kinds",
                   help="which table: each detection's kind (default), or where the duplicates sit")
    ns = p.parse_args(argv)
    if ns.source:
        results = json.loads(Path(ns.source).read_text())
    else:
        _, rows = score_detections(p, ns, lambda store, dets: classify(*read(store, ns.split, dets, ns.threshold),
                                                                        ns.iou))
        results = {"data": ns.data, "split": ns.split, "threshold": ns.threshold, "iou": ns.iou, "rows": rows,
                   "machine": machine(), "command": " ".join(sys.argv)}
    emit(results, (duplicates_table if ns.table == "duplicates" else table)(results), None if ns.source else ns.out,
         ns.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
